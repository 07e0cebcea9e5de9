"""Geometry against hand-computed values, an independent enclosing-ball solve, and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mergekit_collapse.guard import geometry as g

# 4 models, 2 probes, d = 1: model i's hidden states at (probe 1, probe 2)
HAND = np.array([[[0.0], [0.0]], [[3.0], [1.0]], [[0.0], [4.0]], [[1.0], [1.0]]])


def test_hand_computed_four_models():
    geo = g.analyse(HAND)
    dist = geo.distances
    # dmean: 1-2: (3+1)/2, 1-3: (0+4)/2, 1-4: 1, 2-3: 3, 2-4: (2+0)/2, 3-4: (1+3)/2
    assert dist.mean[0, 1] == pytest.approx(2) and dist.mean[1, 2] == pytest.approx(3)
    assert dist.mean[0, 3] == pytest.approx(1) and dist.mean[1, 3] == pytest.approx(1)
    np.testing.assert_allclose(dist.sq, [[0, 5, 8, 1], [5, 0, 9, 2], [8, 9, 0, 5], [1, 2, 5, 0]])
    # Eq. 2: (3 - dmean) / (3 - 1)
    np.testing.assert_allclose(geo.hidden_sim, [[1, .5, .5, 1], [.5, 1, 0, 1], [.5, 0, 1, .5],
                                                [1, 1, .5, 1]])
    np.testing.assert_allclose(geo.mds, [1.5, 2.0, 3.0, 1.2])  # Eq. 3
    assert geo.diameter == pytest.approx(3.0)
    assert geo.converse == pytest.approx(2.25)
    assert geo.jung_n == 2  # points p_i live in R^(P*d) = R^2
    assert geo.jung == pytest.approx(2 / 6 * 9)
    # circumcircle of (0,0), (3,1), (0,4): centre (1,2), R^2 = 5; p_i scaled by 1/sqrt(2)
    assert geo.exact == pytest.approx(2.5, abs=1e-9)
    np.testing.assert_allclose(geo.ball.weights, [1 / 4, 1 / 3, 5 / 12, 0], atol=1e-7)
    np.testing.assert_allclose(geo.optimal, [2.5, 2.5, 2.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(geo.uniform, [1.625, 2.125, 3.625, 0.125])


def test_paper_dimension_is_hidden_size():
    geo = g.analyse(np.random.default_rng(0).normal(size=(3, 4, 8)), jung_dim="hidden")
    assert geo.jung_n == 8
    assert geo.jung == pytest.approx(8 / 18 * geo.diameter**2)


@pytest.mark.parametrize("n", [1, 2])
def test_hidden_sim_undefined_for_fewer_than_two_pairs(n):
    geo = g.analyse(np.random.default_rng(n).normal(size=(n, 3, 5)))
    assert geo.hidden_sim is None and geo.mds is None
    assert "undefined" in geo.hidden_sim_note
    if n == 2:  # two models: r*^2 = D/4 exactly, alpha = (1/2, 1/2)
        assert geo.exact == pytest.approx(geo.converse)
        np.testing.assert_allclose(geo.ball.weights, [0.5, 0.5], atol=1e-9)
    else:
        assert geo.exact == 0.0 and geo.diameter == 0.0


def test_hidden_sim_undefined_when_all_pairs_equal():
    simplex = np.eye(3)[:, None, :]  # equilateral triangle
    geo = g.analyse(simplex)
    assert geo.hidden_sim is None and "equal" in geo.hidden_sim_note
    # equilateral: r*^2 = Delta^2 / 3 = Jung bound with n = 2
    assert geo.exact == pytest.approx(geo.jung)


def test_mds_infinite_when_mean_similarity_zero():
    sim = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1.0]])
    np.testing.assert_array_equal(g.mds(sim), [np.inf, 2.0, 2.0])  # (0 + 1) / 2


def test_nan_rejected():
    bad = np.zeros((2, 2, 2))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        g.analyse(bad)


def _coordinate_meb(points: np.ndarray) -> float:
    """Independent oracle: min t s.t. ||c - p_i||^2 <= t, over centre coordinates c."""
    n, dim = points.shape
    x0 = np.append(points.mean(axis=0), ((points - points.mean(axis=0)) ** 2).sum(1).max())
    cons = [{"type": "ineq", "fun": (lambda x, p=p: x[-1] - ((x[:-1] - p) ** 2).sum())}
            for p in points]
    res = minimize(lambda x: x[-1], x0, constraints=cons, method="SLSQP",
                   options={"ftol": 1e-14, "maxiter": 2000})
    return float(res.x[-1])


@pytest.mark.parametrize("seed", range(8))
def test_exact_radius_matches_coordinate_solve(seed):
    rng = np.random.default_rng(seed)
    n, probes, dim = rng.integers(2, 9), rng.integers(1, 4), rng.integers(1, 5)
    hidden = rng.normal(size=(n, probes, dim)) * rng.uniform(0.1, 10)
    geo = g.analyse(hidden)
    points = hidden.reshape(n, -1) / np.sqrt(probes)
    assert geo.exact == pytest.approx(_coordinate_meb(points), rel=1e-6, abs=1e-9)
    assert geo.ball.kkt_residual < 1e-8


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 10), probes=st.integers(1, 4), dim=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1), spread=st.floats(1e-3, 1e3))
def test_bounds_sandwich_and_ranges(n, probes, dim, seed, spread):
    hidden = np.random.default_rng(seed).normal(size=(n, probes, dim)) * spread
    geo = g.analyse(hidden)
    tol = 1e-7 * max(geo.diameter**2, 1e-12)
    assert geo.converse - tol <= geo.exact <= geo.jung + tol  # Theorem 1, exact in between
    assert geo.exact <= geo.uniform.max() + tol  # uniform is one convex merge
    assert geo.optimal.max() == pytest.approx(geo.exact, rel=1e-6, abs=tol)
    assert np.all(geo.ball.weights >= 0) and geo.ball.weights.sum() == pytest.approx(1)
    d = geo.distances
    assert np.all(d.mean <= d.rms + 1e-9)  # mean <= rms (Jensen)
    if geo.hidden_sim is not None:
        s = geo.hidden_sim
        assert np.all((s >= 0) & (s <= 1)) and np.allclose(s, s.T)
        assert np.all(geo.mds >= 1)


def test_base_anchored_matches_coordinates():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(4, 6))  # p_0 (base), p_1..p_3
    w = np.array([0.4, 0.4, 0.4])  # task arithmetic: affine, not convex
    sq = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    ba = g.base_anchored(sq, w)
    v = pts[1:] - pts[0]
    pm = pts[0] + w @ v
    np.testing.assert_allclose(ba.shift, (v**2).sum(1))
    np.testing.assert_allclose(ba.retention, v @ (pm - pts[0]) / (v**2).sum(1))
    np.testing.assert_allclose(ba.distortion, ((pm - pts[1:]) ** 2).sum(1))
    np.testing.assert_allclose(ba.relative_distortion, ((pm - pts[1:]) ** 2).sum(1) / (v**2).sum(1))
    # observed retention with the true merged point equals the linearised one
    obs = g.observed_retention(pts[0][None], pm[None], pts[1:, None])
    np.testing.assert_allclose(obs, ba.retention)


def test_affine_distortion_identity():
    rng = np.random.default_rng(5)
    pts = rng.normal(size=(5, 3))
    b = np.array([1.5, -0.2, 0.1, -0.6, 0.2])  # sums to 1
    sq = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    np.testing.assert_allclose(g.distortions(sq, b), ((b @ pts - pts) ** 2).sum(1))
