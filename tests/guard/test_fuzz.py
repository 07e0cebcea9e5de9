"""Property-based fuzzing (hypothesis): the `guard:` section, whole mergekit configs, and the
geometry.

Valid inputs parse / compute; invalid ones raise a one-line BadInputError (ConfigError for configs),
never another exception type. No model is loaded: configs name Hub ids that are never fetched.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mergekit_collapse.errors import BadInputError, ConfigError
from mergekit_collapse.guard import geometry as g
from mergekit_collapse.guard.config import (
    BUILTIN_ACTIONS,
    GuardSettings,
    action_names,
    parse_config,
)

#: examples per property; FUZZ_EXAMPLES=2000 for a long local run
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
MODELS = ["org/model-a", "org/model-b", "org/model-c", "org/model-d"]
BASE = "org/base"


def one_line(e: BaseException) -> bool:
    text = str(e)
    return bool(text.strip()) and "\n" not in text and "Traceback" not in text


def parses_or_config_error(source: str):
    """parse_config's result, or None when it raised a one-line ConfigError (anything else
    fails)."""
    try:
        return parse_config(source)
    except ConfigError as e:
        assert one_line(e), repr(str(e))
        return None


# --- (a) the guard: section -------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
positive = st.floats(min_value=1e-6, max_value=1e6)
budgets = st.one_of(st.just({}), st.builds(lambda x: {"relative": x}, positive),
                    st.builds(lambda x: {"absolute": x}, positive))


@st.composite
def valid_guards(draw, models: list[str] = MODELS[:2]):
    """A guard section every field of which is within its documented range."""
    fields = {
        "k": st.integers(1, 50), "seed": st.integers(-2**31, 2**31), "layer": st.integers(-40, 40),
        "pooling": st.sampled_from(["mean", "last"]), "chat_template": st.booleans(),
        "max_length": st.integers(8, 4096), "batch_size": st.integers(1, 256), "budget": budgets,
        "jung_dim": st.sampled_from(["affine", "hidden"]),
        "action": st.sampled_from(BUILTIN_ACTIONS),
        "weights": st.sampled_from(["none", "suggest", "apply"]),
        "rehearse": st.sampled_from(["auto", "on", "off", True, False]),  # YAML on/off: booleans
        "rehearse_max_gb": positive, "answer_tokens": st.integers(1, 512),
        "base": st.sampled_from([BASE, "org/other-base"]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True))
    guard = {k: draw(fields[k]) for k in chosen}
    names = st.text("abcdefghij_-", min_size=1, max_size=12)
    probes = st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4)
    guard["tasks"] = {m: {"name": draw(names), "probes": draw(probes)}
                      for m in draw(st.lists(st.sampled_from(models), unique=True))}
    if draw(st.booleans()):
        guard["candidates"] = {draw(names): draw(st.lists(st.sampled_from(MODELS), max_size=3))}
    return guard


def config_text(guard, method: str = "task_arithmetic", models=MODELS[:2], base: str | None = BASE):
    cfg = {"merge_method": method, "models": [{"model": m, "parameters": {"weight": 0.5}}
                                              for m in models], "dtype": "float32", "guard": guard}
    if base:
        cfg["base_model"] = base
    return yaml.safe_dump(cfg, allow_unicode=True)


@FUZZ
@given(guard=valid_guards())
def test_a_valid_guard_section_parses(guard):
    text = config_text(guard)
    cfg = parse_config(text)
    expected = GuardSettings.model_validate(yaml.safe_load(text)["guard"])  # what YAML reads
    assert cfg.guard == expected
    assert [str(m) for m in cfg.models] == MODELS[:2]
    assert cfg.base is not None  # guard.base, else base_model


# values of the wrong type or out of range, per field (each one alone makes the section invalid)
BAD = {
    "k": st.one_of(st.integers(max_value=0), st.text("abc xyz", min_size=1)),
    "max_length": st.integers(max_value=7), "batch_size": st.integers(max_value=0),
    "pooling": st.text().filter(lambda s: s not in ("mean", "last")),
    "jung_dim": st.text().filter(lambda s: s not in ("affine", "hidden")),
    "action": st.text().filter(lambda s: s not in action_names()),
    "weights": st.text().filter(lambda s: s not in ("none", "suggest", "apply")),
    "rehearse": st.one_of(st.integers(2),
                          st.text().filter(lambda s: s not in ("auto", "on", "off"))),
    "rehearse_max_gb": st.floats(max_value=0), "answer_tokens": st.one_of(st.integers(max_value=0),
                                                                          st.integers(513)),
    "budget": st.one_of(
        st.builds(lambda x: {"relative": x}, st.one_of(st.floats(max_value=0), st.just(math.inf))),
        st.builds(lambda x: {"absolute": x}, st.floats(max_value=0)),
        st.builds(lambda x, y: {"relative": x, "absolute": y}, positive, positive),
        st.builds(lambda x: {"relativ": x}, positive), st.lists(positive, min_size=1)),
    "tasks": st.one_of(st.lists(st.text(), min_size=1), st.just({MODELS[0]: {"nme": "x"}}),
                       st.just({"org/not-in-this-merge": {"name": "x"}}),
                       st.just({MODELS[0]: {"name": "x", "probes": {"fle": "p.txt"}}})),
    # blank: mergekit's parse accepts it; found by this test
    "base": st.sampled_from(["", " ", "\t"]),
}


@FUZZ
@given(guard=valid_guards(), data=st.data())
def test_an_invalid_guard_field_is_a_one_line_config_error(guard, data):
    key = data.draw(st.sampled_from(sorted(BAD)))
    guard[key] = data.draw(BAD[key])
    with pytest.raises(ConfigError) as e:
        parse_config(config_text(guard))
    assert one_line(e.value), str(e.value)


@FUZZ
@given(guard=valid_guards(), key=st.text(min_size=1, max_size=20), value=st.integers())
def test_an_unknown_guard_key_is_named(guard, key, value):
    assume(key not in GuardSettings.model_fields)
    guard[key] = value
    with pytest.raises(ConfigError, match="unknown key") as e:
        parse_config(config_text(guard))
    assert one_line(e.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=20)


@FUZZ
@given(guard=json_values | st.dictionaries(st.sampled_from([*GuardSettings.model_fields, "x"]),
                                           json_values, max_size=6))
def test_any_guard_value_parses_or_is_a_config_error(guard):
    parses_or_config_error(config_text(guard))


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_parses_or_is_a_config_error(text):
    parses_or_config_error(text)


# --- (b) whole mergekit configs with a guard section --------------------------------------------

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"]
# a parameter value: a number, a gradient (list), or a filtered list as mergekit writes them
params = st.one_of(finite, st.lists(finite, min_size=1, max_size=4),
                   st.lists(st.fixed_dictionaries({"filter": st.sampled_from(["self_attn", "mlp"]),
                                                    "value": finite}), min_size=1, max_size=2),
                   st.text(max_size=5))
param_names = st.sampled_from(["weight", "density", "epsilon", "lambda", "t", "normalize",
                               "int8_mask", "rescale"])


@st.composite
def merge_configs(draw):
    method = draw(st.sampled_from(METHODS))
    models = draw(st.lists(st.sampled_from(MODELS), min_size=0, max_size=4, unique=True))
    base = draw(st.sampled_from([None, BASE, *models]) if models else st.sampled_from([None, BASE]))
    cfg = {"merge_method": method,
           "models": [{"model": m, **({"parameters": draw(st.dictionaries(param_names, params,
                                                                         max_size=3))}
                                      if draw(st.booleans()) else {})} for m in models]}
    if base:
        cfg["base_model"] = base
    for key, strategy in (("parameters", st.dictionaries(param_names, params, max_size=3)),
                          ("dtype", st.sampled_from(["float32", "bfloat16", "float16", "int3"])),
                          ("tokenizer_source", st.sampled_from(["base", "union", BASE])),
                          ("guard", st.one_of(valid_guards(models or MODELS[:1]), json_values))):
        if draw(st.booleans()):
            cfg[key] = draw(strategy)
    return cfg


@FUZZ
@given(cfg=merge_configs())
def test_a_mergekit_config_parses_or_is_a_config_error(cfg):
    loaded = parses_or_config_error(yaml.safe_dump(cfg, allow_unicode=True))
    if loaded is not None:
        assert loaded.merge.merge_method == cfg["merge_method"]
        listed = {m["model"] for m in cfg["models"]}
        assert {str(m) for m in loaded.models} <= listed | {BASE}
        assert set(loaded.guard.tasks) <= {str(m) for m in loaded.models}  # keys name models


# --- (c) the geometry from distance matrices ----------------------------------------------------

@st.composite
def point_sets(draw):
    """N points in R^dim: random, with duplicates, on a line, or in clusters of mixed scale."""
    n = draw(st.integers(1, 9))
    dim = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "duplicates", "collinear", "clusters", "simplex"]))
    if kind == "normal":
        pts = rng.normal(size=(n, dim))
    elif kind == "duplicates":
        pts = rng.normal(size=(max(1, n // 2), dim))[rng.integers(0, max(1, n // 2), n)]
    elif kind == "collinear":
        pts = rng.normal(size=(n, 1)) * rng.normal(size=(1, dim)) + rng.normal(size=(1, dim))
    elif kind == "clusters":
        pts = (rng.normal(size=(n, dim)) * 1e-4
               + rng.integers(0, 2, size=(n, 1)) * rng.normal(size=dim))
    else:  # a regular simplex (the Jung-extremal case when n = dim + 1)
        pts = np.eye(max(n, dim))[:n, :dim] if n <= dim else rng.normal(size=(n, dim))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e6]))
    return pts * scale


def squared(points: np.ndarray) -> np.ndarray:
    return ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)


@FUZZ
@given(points=point_sets())
def test_the_bounds_sandwich_the_exact_radius(points):
    """converse Δ²/4 ≤ exact r*² ≤ Jung, and r*² is the worst distortion of its own weights."""
    n, dim = points.shape
    sq = squared(points)
    ball = g.enclosing_ball(sq)
    diameter = math.sqrt(sq.max())
    converse, jung = diameter**2 / 4, g.jung_bound(diameter, g.jung_dimension(n, dim, dim))
    tol = 1e-7 * max(sq.max(), 1e-300)
    assert converse - tol <= ball.radius_sq <= jung + tol
    assert np.all(ball.weights >= 0) and ball.weights.sum() == pytest.approx(1.0)
    assert g.distortions(sq, ball.weights).max() == pytest.approx(ball.radius_sq, rel=1e-6, abs=tol)
    assert ball.radius_sq <= g.distortions(sq, np.full(n, 1 / n)).max() + tol  # the uniform merge
    # the same geometry from the points as hidden states (one probe), and no spurious note
    geo = g.analyse(points[:, None, :])
    assert geo.exact == pytest.approx(ball.radius_sq, rel=1e-6, abs=tol)
    assert geo.converse - tol <= geo.exact <= geo.jung + tol
    assert not any("not Euclidean" in note for note in geo.notes)


@st.composite
def invalid_matrices(draw):
    """A valid D broken one way: asymmetric, negative, NaN/inf, non-zero diagonal, not square."""
    points = draw(point_sets().filter(lambda p: len(p) >= 2))
    sq = squared(points)
    assume(sq.max() > 0)
    n = len(sq)
    i, j = draw(st.sampled_from([(a, b) for a in range(n) for b in range(n) if a != b]))
    how = draw(st.sampled_from(["asymmetric", "negative", "nan", "inf", "diagonal", "shape"]))
    big = sq.max()
    if how == "asymmetric":
        sq[i, j] += big * draw(st.floats(1e-3, 10))
    elif how == "negative":
        sq[i, j] = sq[j, i] = -big * draw(st.floats(1e-3, 10))
    elif how == "nan":
        sq[i, j] = np.nan
    elif how == "inf":
        sq[i, j] = sq[j, i] = draw(st.sampled_from([np.inf, -np.inf]))
    elif how == "diagonal":
        sq[i, i] = big * draw(st.floats(1e-3, 10))
    else:
        sq = sq[:, :-1]
    return how, sq


@FUZZ
@given(case=invalid_matrices())
def test_an_invalid_distance_matrix_is_a_clear_bad_input_error(case):
    how, sq = case
    with pytest.raises(BadInputError) as e:
        g.enclosing_ball(sq)
    assert one_line(e.value)
    words = {"asymmetric": "not symmetric", "negative": "negative", "nan": "NaN", "inf": "inf",
             "diagonal": "diagonal", "shape": "square"}
    assert words[how] in str(e.value)


@FUZZ
@given(n=st.integers(1, 5), probes=st.integers(1, 3), dim=st.integers(1, 4),
       bad=st.sampled_from([np.nan, np.inf, -np.inf]), data=st.data())
def test_non_finite_hidden_states_are_a_bad_input_error(n, probes, dim, bad, data):
    hidden = np.zeros((n, probes, dim))
    hidden[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, probes - 1)),
           data.draw(st.integers(0, dim - 1))] = bad
    with pytest.raises(BadInputError, match="NaN or inf"):
        g.analyse(hidden)
