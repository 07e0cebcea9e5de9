"""Where things are in a mergekit YAML: the line and column of each model reference and of any key.

PyYAML's node graph keeps positions (comments, flow style and block style alike). An alias
(`*name`) normally resolves to the anchored node itself, whose position is where the anchor was
defined; our loader keeps the position of the *use* instead, so a model pulled in with `- *a` or
`<<: *common` is reported on the line under `models:` that pulls it in.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mergekit_collapse.guard.config import parse_ref

__all__ = ["ModelSite", "Span", "locate_key", "locate_message", "model_sites", "parse_ref",
           "same_model"]


@dataclass(frozen=True)
class Span:
    """A 1-based line/column range in the YAML text."""

    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(frozen=True)
class ModelSite:
    """One model reference as written: its value, its position, and where in the config it sits."""

    value: Any  # the reference as written: a string, or a mapping ({model: {path: ...}, lora: ...})
    span: Span
    where: str  # "models[0]", "slices[1].sources[0]", "modules.m.models[2]", "base_model"


class _Loader(yaml.SafeLoader):
    """A SafeLoader whose aliases carry the position where they are used, not where they are
    defined."""

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        event = self.peek_event()
        node = copy.copy(super().compose_node(parent, index))
        node.start_mark, node.end_mark = event.start_mark, event.end_mark
        node.alias = True  # type: ignore[attr-defined]
        return node


#: a node, and the node whose position reports it when that is not its own (inside an alias)
_Entry = tuple[Node, "Node | None"]


def _compose(source: str) -> Node | None:
    loader = _Loader(source)
    try:
        return loader.get_single_node()
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()


def _span(node: Node) -> Span:
    s, e = node.start_mark, node.end_mark
    return Span(s.line + 1, s.column + 1, e.line + 1, e.column + 1)


def _child(parent: _Entry, node: Node, at: Node | None = None) -> _Entry:
    """Below an alias (or a merge key), everything is reported where the alias is used."""
    if parent[1] is not None:
        return node, parent[1]
    if at is not None:
        return node, at
    return node, node if getattr(node, "alias", False) else None


def _where(entry: _Entry) -> Span:
    return _span(entry[1] if entry[1] is not None else entry[0])


def _fields(entry: _Entry | None) -> dict[str, _Entry]:
    """A mapping's keys -> entries, merge keys (`<<: *a`) flattened; the keys written win."""
    if entry is None or not isinstance(entry[0], MappingNode):
        return {}
    own: dict[str, _Entry] = {}
    merged: dict[str, _Entry] = {}
    for key, value in entry[0].value:
        if key.tag == "tag:yaml.org,2002:merge":
            sources = value.value if isinstance(value, SequenceNode) else [value]
            for src in sources:
                for name, (node, _) in _fields((src, None)).items():
                    merged.setdefault(name, _child(entry, node, at=src))
        elif isinstance(key, ScalarNode):
            own[key.value] = _child(entry, value)
    return {**merged, **own}


def _items(entry: _Entry | None) -> list[_Entry]:
    if entry is None or not isinstance(entry[0], SequenceNode):
        return []
    return [_child(entry, node) for node in entry[0].value]


def _python(node: Node) -> Any:
    if isinstance(node, ScalarNode):
        return node.value
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def model_sites(source: str) -> list[ModelSite]:
    """Every model reference of a mergekit YAML with its position, in the order written.

    Covers `base_model`, `models:`, `slices:` (`sources:`) and `modules:`; comments, flow style,
    anchors/aliases and merge keys are handled. Malformed YAML yields no sites.

    Args:
        source: the YAML text.

    Returns:
        The sites; a model listed in several slices appears once per slice.
    """
    root = _compose(source)
    if not isinstance(root, MappingNode):
        return []
    top = _fields((root, None))
    sites: list[ModelSite] = []

    def add(entry: _Entry | None, where: str) -> None:
        if entry is not None:
            sites.append(ModelSite(_python(entry[0]), _where(entry), where))

    def models(entry: _Entry | None, where: str) -> None:
        for i, item in enumerate(_items(entry)):
            add(_fields(item).get("model"), f"{where}[{i}]")

    def slices(entry: _Entry | None, where: str) -> None:
        for i, item in enumerate(_items(entry)):
            models(_fields(item).get("sources"), f"{where}[{i}].sources")

    add(top.get("base_model"), "base_model")
    models(top.get("models"), "models")
    slices(top.get("slices"), "slices")
    for name, module in _fields(top.get("modules")).items():
        models(_fields(module).get("models"), f"modules.{name}.models")
        slices(_fields(module).get("slices"), f"modules.{name}.slices")
    return sites


def same_model(value: Any, name: str) -> bool:
    """Does a reference as written denote the model the report calls `name`?"""
    if value == name:
        return True
    a, b = parse_ref(value), parse_ref(name)
    return a is not None and a == b


def locate_model(source: str, name: str) -> Span | None:
    """The position of the model `name`: its first listing as a constituent, else `base_model`
    (a slerp endpoint may be named only there)."""
    sites = sorted(model_sites(source), key=lambda s: s.where == "base_model")
    return next((s.span for s in sites if same_model(s.value, name)), None)


def locate_key(source: str, dotted: str) -> Span | None:
    """The position of a key given as a dotted path (`guard.tasks.org/m.nmae`; keys may hold dots).

    Args:
        source: the YAML text.
        dotted: the path; list indices are numbers (`guard.tasks.x.probes.0`).

    Returns:
        The span of the deepest key found on the path (None when not even the first is there).
    """
    root = _compose(source)
    entry: _Entry | None = (root, None) if root is not None else None
    rest, found = dotted, None
    while entry is not None and rest:
        if isinstance(entry[0], SequenceNode):
            head, _, tail = rest.partition(".")
            items = _items(entry)
            if not head.isdigit() or int(head) >= len(items):
                break
            entry, rest = items[int(head)], tail
            found = _where(entry)
            continue
        keys = _key_nodes(entry)
        match = max((k for k in keys if rest == k or rest.startswith(k + ".")), key=len,
                    default=None)
        if match is None:
            break
        key_node, entry = keys[match]
        found = _span(key_node)
        rest = rest[len(match) + 1:]
    return found


def _key_nodes(entry: _Entry) -> dict[str, tuple[Node, _Entry]]:
    """Key name -> (the node to report the key at, its value's entry)."""
    if not isinstance(entry[0], MappingNode):
        return {}
    keys = {k.value: k for k, _ in entry[0].value if isinstance(k, ScalarNode)}
    out = {}
    for name, sub in _fields(entry).items():
        # inside an alias, or merged in with `<<:`, a key is reported where that is written
        node = sub[1] if sub[1] is not None and sub[1] is not sub[0] else keys.get(name, sub[0])
        out[name] = (node, sub)
    return out


_LINE = re.compile(r"\bat line (\d+)")
_QUOTED = re.compile(r"'([^']+)'")
_GUARD_PATH = re.compile(r"invalid (guard\..+?): ")


def locate_message(source: str, message: str) -> Span | None:
    """Best-effort position for an error message: its `at line N`, a quoted key or model reference.

    Args:
        source: the YAML text.
        message: one of our one-line error messages.

    Returns:
        A span, or None when the message names nothing that can be found.
    """
    m = _LINE.search(message)
    if m:
        line = int(m.group(1))
        return Span(line, 1, line, 1)
    sites = sorted(model_sites(source), key=lambda s: s.where == "base_model")  # constituents first
    for quoted in _GUARD_PATH.findall(message) + _QUOTED.findall(message):
        if quoted.startswith("guard."):
            span = locate_key(source, quoted)
            if span is not None:
                return span
        for site in sites:
            if isinstance(site.value, str) and quoted in (site.value, *site.value.split("+")):
                return site.span
        span = locate_key(source, f"guard.tasks.{quoted}")
        if span is not None and span != locate_key(source, "guard.tasks"):
            return span
    return None
