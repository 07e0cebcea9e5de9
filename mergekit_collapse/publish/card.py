"""The mergeability card: a Hugging Face model card (README.md) for a merged model.

It is rendered with `huggingface_hub.ModelCard` from a Jinja template. The default template ships
inside the package (`mergekit_collapse/publish/templates/`, shipped as package data); `hub_cards/`
at the repository root links to that same file, so there is one source of truth. The YAML metadata
carries `base_model`, `base_model_relation: merge`, tags, a `model-index` from the evaluation, and a
`mergeability:` block with the guard's numbers, so the Hub (and `ModelCard.load`) can read them
back.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from mergekit_collapse._console import one_line
from mergekit_collapse._constants import REPORT_DIR, SHIPPED_DIR
from mergekit_collapse._io import write_all
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.evaluate.observed import Evaluation
from mergekit_collapse.guard.report import GuardReport, fmt, is_hub_id, relative_inside

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

#: folder (relative to the merged model) holding the guard's outputs
DEFAULT_TEMPLATE = "mergeability_card.md.j2"
TAGS = ["merge", "mergekit", "mergekit-collapse"]
#: an absolute POSIX path of two parts or more, not inside a URL or a relative path
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"`|,;:()\[\]{}<>]+/)+[^\s/'\"`|,;:()\[\]{}<>]*")


def default_template_path() -> Path:
    """The packaged default template (the file `hub_cards/mergeability_card.md.j2` links to).

    Returns:
        The template's path inside the installed package.
    """
    return Path(str(resources.files("mergekit_collapse.publish") / "templates" / DEFAULT_TEMPLATE))


def _num(x: float | None) -> float | None:
    """YAML-safe numbers: NaN has no stable round trip, so it becomes None; inf stays (.inf)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def local_hub_ids(folder: Path) -> list[str]:
    """The Hub ids a local checkpoint records: its config's `_name_or_path` (the id it was loaded
    from before it was saved), else its model card's `base_model`, else a LoRA's
    `base_model_name_or_path` (the base it adapts). Local paths found there are left out.

    Args:
        folder: a local model or adapter folder.

    Returns:
        Hub ids, possibly empty.
    """
    from huggingface_hub import metadata_load

    readme = folder / "README.md"
    try:
        card = (metadata_load(readme) or {}) if readme.is_file() else {}
    except (OSError, ValueError):  # a broken front matter is no lineage
        card = {}
    sources = [_json(folder / "config.json").get("_name_or_path"), card.get("base_model"),
               _json(folder / "adapter_config.json").get("base_model_name_or_path")]
    for found in sources:
        ids = [i for i in (found if isinstance(found, list) else [found])
               if isinstance(i, str) and is_hub_id(i)]
        if ids:
            return ids
    return []


def _ref_hub_ids(ref: str) -> list[str]:
    """Hub ids for a reference (`model` or `model+lora`): its Hub ids, or what its local folders
    record."""
    ids: list[str] = []
    for part in ref.split("+"):
        path = part.strip().partition("@")[0]
        if is_hub_id(path):
            ids.append(part.strip())
        elif Path(path).expanduser().is_dir():
            ids += local_hub_ids(Path(path).expanduser())
    return ids


def hub_base_models(report: GuardReport) -> list[str]:
    """The Hub ids this merge derives from: the constituents (both parts of `model+lora`), else the
    base.

    Local folders stand for the Hub ids their own metadata records (`local_hub_ids`), so a merge of
    downloaded models still links to its parents; local paths themselves never appear.

    Args:
        report: the guard's report.

    Returns:
        Unique Hub model ids, in config order; empty when none is known.
    """
    ids = [i for name in report.names for i in _ref_hub_ids(name)]
    if not ids and report.base_model:
        ids = _ref_hub_ids(report.base_model)
    return list(dict.fromkeys(ids))


def public_text(report: GuardReport, root: Path | None = None) -> Callable[[str], str]:
    """A function that makes text fit to publish: model references become their display names
    and any other absolute local path becomes relative to the config's folder (or its last part).

    Args:
        report: the guard's report (its models, base and config folder).
        root: the folder paths are shown relative to (default: the report's config's folder).
    """
    shown = report.displays()
    root = root or (Path(report.config).parent if report.config else None)
    refs = sorted((r for r in shown if _ABS_PATH.search(r)), key=len, reverse=True)
    pattern = "|".join(f"(?<![\\w/.-]){re.escape(r)}(?![\\w.-])" for r in refs)
    known = re.compile(pattern) if refs else None

    def short(m: re.Match) -> str:
        rel = relative_inside(m.group(0), root) if root is not None else None
        return rel or Path(m.group(0)).name or m.group(0)

    def clean(text: str) -> str:
        if known is not None:
            text = known.sub(lambda m: shown[m.group(0)], text)
        return _ABS_PATH.sub(short, text)

    return clean


def public_text_for(out_dir: str | Path) -> Callable[[str], str]:
    """`public_text` for a merged folder: from its report when it has one, else every absolute
    local path becomes its last part."""
    try:
        return public_text(GuardReport.read(Path(out_dir) / REPORT_DIR))
    except (OSError, ValueError):
        return lambda text: _ABS_PATH.sub(lambda m: Path(m.group(0)).name or m.group(0), text)


def _public(value: Any, clean: Callable[[str], str]) -> Any:
    """`value` (JSON-like) with every string, keys included, passed through `clean`."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {_public(k, clean): _public(v, clean) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v, clean) for v in value]
    return value


def _first_error(e: ValueError) -> str:
    """A pydantic error (or a JSON one) in one line: how many, and the first with where it is."""
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        n = e.error_count()
        return f"{n} error{'s' if n != 1 else ''}; {loc + ': ' if loc else ''}{first['msg']}"
    return one_line(str(e))


def read_evaluation(path: Path) -> Evaluation | None:
    """Read evaluation.json if it exists.

    Args:
        path: the evaluation.json path.

    Returns:
        The parsed evaluation, or None when the file is absent.

    Raises:
        BadInputError: the file is not valid JSON or does not have evaluation.json's shape.
    """
    if not path.is_file():
        return None
    try:
        return Evaluation.model_validate_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (byte {e.start}): "
                            "not a valid evaluation.json") from None
    except ValidationError as e:
        raise BadInputError(f"{path}: not a valid evaluation.json ({e.error_count()} errors: "
                            f"{e.errors()[0]['msg']})") from None


def mergeability_metadata(report: GuardReport, evaluation: Evaluation | None = None, *,
                          history: GuardReport | None = None) -> dict[str, Any]:
    """The card's `mergeability:` metadata block, in plain YAML-safe types.

    Args:
        report: the guard's report on the merge shipped.
        evaluation: the evaluation, if one was run.
        history: the report on the config as written, when an action re-organised it.

    Returns:
        A dict with the budget, bounds, verdict, per-model scores, probes, layer, pooling, actions,
        the tool version, the risk score when the report has one, and the observed losses if
        evaluated. Models go by their display names; no absolute local path is left in it
        (`public_text`).
    """
    from mergekit_collapse._version import __version__

    b = report.bounds
    shown = report.displays()
    block: dict[str, Any] = {
        "schema_version": report.schema_version,
        "tool_version": report.tool_version,
        "card_tool_version": __version__,
        "verdict": report.verdict,
        "decided_by": report.decided_by,
        "merge_method": report.merge_method,
        "budget": {"mode": report.budget.mode, "value": _num(report.budget.value),
                   "absolute": _num(report.budget.absolute), "scale": _num(report.budget.scale),
                   "scale_source": report.budget.scale_source},
        "bounds": {"diameter": _num(b.diameter), "converse": _num(b.converse),
                   "exact": _num(b.exact), "jung": _num(b.jung), "jung_n": b.jung_n,
                   "jung_dim": b.jung_dim, "uniform": _num(b.uniform), "planned": _num(b.planned)},
        "models": _models_block(report, shown),
        "probes": {"sha256": report.probes.sha256, "count": report.probes.count,
                   "k": report.probes.k, "seed": report.probes.seed,
                   "chat_template": report.probes.chat_template},
        "layer": report.layer,
        "pooling": report.pooling,
        "actions": [{"action": a.action, "changed": a.changed, "reason": a.reason}
                    for a in report.actions],
    }
    if report.risk is not None:
        block["risk"] = report.risk.model_dump(mode="json")
    if report.rehearsal is not None:
        block["rehearsal"] = report.rehearsal.model_dump(mode="json")
    if evaluation is not None:
        block["observed"] = _observed_block(evaluation, shown)
    if history is not None:
        names = history.displays()
        block["history"] = {"verdict": history.verdict, "decided_by": history.decided_by,
                            "models": [names[m.name] for m in history.models]}
    return _public(block, public_text(report))


def _models_block(report: GuardReport, shown: dict[str, str]) -> list[dict[str, Any]]:
    """The block's per-model scores: geometry, weight, risk and rehearsal."""
    return [{"name": shown[m.name], "task": m.task, "mds": _num(m.mds),
             "distortion": _num(m.distortion_optimal),
             "distortion_planned": _num(m.distortion_planned),
             "retention": _num(m.retention), "weight": _num(report.weights.get(m.name)),
             "risk_score": _num(m.risk_score), "risk_band": m.risk_band,
             "predicted_retention": _num(m.predicted_retention),
             "rehearsal_band": m.rehearsal_band}
            for m in report.models]


def _observed_block(evaluation: Evaluation, shown: dict[str, str]) -> dict[str, Any]:
    """The block's `observed:` part: the evaluation's merging losses, task by task."""
    return {
        "limit": evaluation.limit,
        "dtype": evaluation.dtype,
        "mean_loss": _num(evaluation.mean_loss),
        "tasks": [{"model": shown.get(t.model, t.model), "task": t.task, "eval": t.eval,
                   "metric": t.metric,
                   "constituent": _num(t.constituent), "merged": _num(t.merged),
                   "base": _num(t.base), "loss": _num(t.loss),
                   **({"observed_retention": _num(t.observed_retention)}
                      if t.observed_retention is not None else {})}
                  for t in evaluation.tasks],
    }


def card_data(report: GuardReport, evaluation: Evaluation | None, *, model_name: str,
              history: GuardReport | None = None):
    """The card's metadata as a `huggingface_hub.ModelCardData`.

    Args:
        report: the guard's report on the merge shipped.
        evaluation: the evaluation, or None.
        model_name: the name `model-index` uses.
        history: the report on the config as written, when an action re-organised it.

    Returns:
        A `ModelCardData` with base_model, base_model_relation, tags, library_name, model-index
        (when evaluated) and mergeability.
    """
    from huggingface_hub import EvalResult, ModelCardData

    base = hub_base_models(report)
    eval_results = [
        EvalResult(task_type="text-generation", task_name=t.task, dataset_type=t.eval,
                   dataset_name=t.eval, metric_type=t.metric, metric_value=_num(t.merged),
                   metric_name=f"{t.metric} (merged; constituent {fmt(t.constituent)})")
        for t in (evaluation.tasks if evaluation else []) if t.merged is not None
    ]
    kwargs: dict[str, Any] = {}
    if base:
        kwargs = {"base_model": base if len(base) > 1 else base[0], "base_model_relation": "merge"}
    return ModelCardData(
        library_name="transformers",
        tags=list(TAGS),
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        mergeability=mergeability_metadata(report, evaluation, history=history),
        **kwargs,
    )


def _rows(report: GuardReport, evaluation: Evaluation | None) -> list[dict[str, Any]]:
    by_model = {t.model: t for t in (evaluation.tasks if evaluation else [])}
    shown = report.displays()
    rows = []
    for m in report.models:
        row: dict[str, Any] = {"name": shown[m.name], "task": m.task, "mds": m.mds,
                               "distortion": m.distortion_optimal, "retention": m.retention,
                               "weight": report.weights.get(m.name), "risk_score": m.risk_score,
                               "risk_band": m.risk_band, "rehearsal_band": m.rehearsal_band,
                               "predicted_retention": m.predicted_retention}
        t = by_model.get(m.name)
        if t is not None:
            row.update(eval=t.eval, metric=t.metric, constituent=t.constituent, merged=t.merged,
                       base=t.base, loss=t.loss)
        rows.append(row)
    return rows


def render_card(out_dir: str | Path, *, template: Path | None = None,
                config_path: Path | None = None, model_name: str | None = None) -> ModelCard:
    """Render the mergeability card of a merged model directory.

    Args:
        out_dir: the merged model directory (mergekit's output) with `mergeability/report.json`,
            and optionally `mergeability/evaluation.json`, `hidden_sim.png`,
            `predicted_vs_observed.png` and `mergeability/shipped/` (the guard's report on the
            config an action re-organised: it heads the card, and the config as written follows as
            its history).
        template: a Jinja template of your own (same context as the default; see its header).
        config_path: the mergekit YAML to show; defaults to `out_dir/mergekit_config.yml` if
            present.
        model_name: the card's title and `model-index` name; defaults to the directory's name.

    Returns:
        The rendered `huggingface_hub.ModelCard` (not yet written; see `write_card`).

    Raises:
        BadInputError: no report in `out_dir`, an unreadable report, evaluation or template.
    """
    from huggingface_hub import ModelCard

    from mergekit_collapse._version import __version__

    out = Path(out_dir)
    mdir = out / REPORT_DIR
    report, history = _card_reports(out, mdir)
    evaluation = read_evaluation(mdir / "evaluation.json")
    name = model_name or out.resolve().name

    config_file, mergekit_config = _card_config(out, config_path)
    tpl = Path(template) if template is not None else default_template_path()
    if not tpl.is_file():
        raise BadInputError(f"card template not found: {tpl}")
    data = card_data(report, evaluation, model_name=name, history=history)
    clean = public_text(report, None if report.config else config_file.resolve().parent)

    with _template_errors(tpl):
        card = ModelCard.from_template(
            data, template_str=tpl.read_text(encoding="utf-8"),
            model_name=name, report=_public(report.model_dump(mode="json"), clean),
            mergeability=data["mergeability"],
            history=(_public(history.model_dump(mode="json"), public_text(history))
                     if history else None),
            evaluation=_public(evaluation.model_dump(mode="json"), clean) if evaluation else None,
            rows=_public(_rows(report, evaluation), clean),
            heatmap=_heatmap(mdir, history is not None),
            scatter=(f"{REPORT_DIR}/predicted_vs_observed.png"
                     if (mdir / "predicted_vs_observed.png").is_file() else None),
            mergekit_config=clean(mergekit_config) if mergekit_config else None, fmt=fmt,
            planned=_public(planned_summary(mergekit_config), clean),
            tool_version=__version__,
        )
    _restore_metadata(card, data)
    return card


def _card_reports(out: Path, mdir: Path) -> tuple[GuardReport, GuardReport | None]:
    """(the report the card heads with, the report on the config as written or None).

    The shipped re-check heads the card when there is one; the config as written is its history.
    """
    if not (mdir / "report.json").is_file():
        raise BadInputError(f"{out}: no {REPORT_DIR}/report.json (run `mergekit-collapse check` "
                            "with this output folder first)")
    written = _read_report(mdir)
    has_shipped = (mdir / SHIPPED_DIR / "report.json").is_file()
    shipped = _read_report(mdir / SHIPPED_DIR) if has_shipped else None
    return (shipped, written) if shipped is not None else (written, None)


def _card_config(out: Path, config_path: Path | None) -> tuple[Path, str | None]:
    """The mergekit config the card shows: its path and text (None: no such file in `out`)."""
    config_file = Path(config_path) if config_path is not None else out / "mergekit_config.yml"
    if config_path is not None and not config_file.is_file():
        raise BadInputError(f"mergekit config not found: {config_file}")
    return config_file, (config_file.read_text(encoding="utf-8") if config_file.is_file()
                         else None)


@contextmanager
def _template_errors(tpl: Path) -> Iterator[None]:
    """Turn a template's Jinja, front-matter YAML or decoding error into one BadInputError."""
    import jinja2

    try:
        yield
    except jinja2.TemplateError as e:
        raise BadInputError(f"card template {tpl}: {type(e).__name__}: {e}") from None
    except yaml.YAMLError as e:  # the rendered front matter
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 2}" if mark else ""  # +1: 1-based, +1: the opening ---
        problem = getattr(e, "problem", None) or type(e).__name__
        raise BadInputError(f"card template {tpl}: its front matter (the --- block) is not valid "
                            f"YAML{at}: {problem}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"card template {tpl}: {' '.join(str(e).split())}") from None


def _restore_metadata(card: ModelCard, data: ModelCardData) -> None:
    """A custom template may leave metadata out: put ours back, without overriding what it set."""
    present = card.data.to_dict()
    for key, value in data.to_dict().items():
        if key in present:
            continue
        if key == "model-index":
            card.data.eval_results, card.data.model_name = data.eval_results, data.model_name
        else:
            card.data[key] = value


def _heatmap(mdir: Path, shipped: bool) -> str | None:
    """The repo-relative path of the heatmap of the merge the card describes, or None."""
    folder = f"{REPORT_DIR}/{SHIPPED_DIR}" if shipped else REPORT_DIR
    return (f"{folder}/hidden_sim.png" if (mdir.parent / folder / "hidden_sim.png").is_file()
            else None)


def _read_report(folder: Path) -> GuardReport:
    try:
        return GuardReport.read(folder)
    except (ValidationError, ValueError) as e:
        raise BadInputError(f"{folder / 'report.json'}: not a valid guard report "
                            f"({_first_error(e)})"
                            ) from None


def planned_summary(mergekit_config: str | None) -> dict[str, Any] | None:
    """The config's `guard.planned` (how `mergekit-collapse plan` chose it), or None."""
    try:
        raw = yaml.safe_load(mergekit_config) if mergekit_config else None
    except yaml.YAMLError:
        return None
    planned = ((raw or {}).get("guard") or {}).get("planned") if isinstance(raw, dict) else None
    return planned if isinstance(planned, dict) else None


def write_card(out_dir: str | Path, *, template: Path | None = None,
               config_path: Path | None = None, model_name: str | None = None) -> Path:
    """Render the mergeability card and write it as `out_dir/README.md` (replacing mergekit's
    README), with the evaluation also as `.eval_results/*.yaml` (see `publish.eval_results`).

    Args:
        out_dir: the merged model directory.
        template: a Jinja template of your own.
        config_path: the mergekit YAML to show.
        model_name: the card's title and `model-index` name.

    Returns:
        The README.md path.

    Raises:
        BadInputError: see `render_card`; or a file cannot be written (then none is changed).
    """
    from mergekit_collapse.publish.eval_results import plan_eval_results, tidy_eval_results

    card = render_card(out_dir, template=template, config_path=config_path, model_name=model_name)
    path = Path(out_dir) / "README.md"
    changes = plan_eval_results(out_dir,
                                read_evaluation(Path(out_dir) / REPORT_DIR / "evaluation.json"))
    changes[path] = str(card).encode("utf-8")  # what ModelCard.save writes
    try:
        write_all(changes)  # the card and its .eval_results files: all or nothing
    except OSError as e:
        raise BadInputError(f"cannot write the card in {one_line(str(out_dir))}: "
                            f"{e.strerror or e}; nothing was changed") from None
    tidy_eval_results(out_dir)
    return path


def load_card_metadata(path: str | Path) -> dict[str, Any]:
    """Read a card's metadata back (what the Hub sees), as a plain dict.

    Args:
        path: a README.md.

    Returns:
        The YAML metadata as a dict (`model-index` included, as written).
    """
    from huggingface_hub import ModelCard

    return ModelCard.load(Path(path)).data.to_dict()

