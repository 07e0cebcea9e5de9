"""SARIF 2.1.0 for code-scanning uploads: one result per flagged model (or broken config), located
at its line in the YAML."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from mergekit_collapse.ci.results import ConfigResult, findings

__all__ = ["RULES", "to_sarif"]

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"

#: rule id -> (name, short description, default level)
RULES: dict[str, tuple[str, str, str]] = {
    "collapse-band": ("CollapseBand",
                      "A model's calibrated risk score is in the collapse band: its "
                      "task is predicted to collapse in this merge.", "error"),
    "elevated-band": ("ElevatedBand", "A model's calibrated risk score is in the elevated band.",
                      "warning"),
    "over-budget": ("OverBudget", "The set is over its distortion budget (Theorem 1 bounds / exact "
                    "enclosing-ball radius); the outlier is flagged.", "error"),
    "not-mergeable": ("NotMergeable", "The guard could not call the set mergeable.", "error"),
    "bad-config": ("BadConfig", "The config could not be checked (malformed YAML, invalid mergekit "
                   "or guard section, missing models or probes).", "error"),
}


def _location(f: Any) -> dict[str, Any]:
    region = ({"startLine": f.span.line, "startColumn": f.span.column, "endLine": f.span.end_line,
               "endColumn": f.span.end_column} if f.span is not None else {"startLine": 1})
    # RFC 3986: a space, `#`, `%`, `,`, `:` or a newline percent-encoded
    uri = quote(f.file, safe="/")
    return {"physicalLocation": {"artifactLocation": {"uri": uri, "uriBaseId": "%SRCROOT%"},
                                 "region": region}}


def to_sarif(results: list[ConfigResult]) -> dict[str, Any]:
    """A SARIF 2.1.0 log with one run of mergekit-collapse over the configs.

    Args:
        results: from `check_config`.

    Returns:
        The log as a JSON-serialisable dict (`json.dumps` it).
    """
    from mergekit_collapse._version import __version__

    ids = list(RULES)
    out = []
    for r in results:
        for f in findings(r):
            props: dict[str, Any] = {"config": r.display}
            if f.model is not None and r.report is not None:
                m = next(m for m in r.report.models if m.name == f.model)
                props.update(model=m.name, task=m.task, risk_band=m.risk_band,
                             risk_score=m.risk_score, verdict=r.report.verdict,
                             decided_by=r.report.decided_by)
            fingerprint = f"{r.display}:{f.rule}:{f.model}"
            out.append({"ruleId": f.rule, "ruleIndex": ids.index(f.rule), "level": f.level,
                        "message": {"text": f"{f.title}: {f.message}"},
                        "locations": [_location(f)],
                        "partialFingerprints": {"mergekitCollapse/v1": fingerprint},
                        "properties": props})
    rules = [{"id": i, "name": name, "shortDescription": {"text": text},
              "defaultConfiguration": {"level": level}} for i, (name, text, level) in RULES.items()]
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "mergekit-collapse", "version": __version__,
                                "semanticVersion": __version__, "rules": rules}},
            "originalUriBaseIds": {"%SRCROOT%": {"description": {"text": "the repository root"}}},
            "results": out,
            "invocations": [{"executionSuccessful": all(r.exit_code in (0, 3) for r in results)}],
        }],
    }
