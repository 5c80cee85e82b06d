"""Reading policy source text: YAML that remembers line numbers and refuses duplicate keys, and CSV lines.

PyYAML silently keeps the last of two equal keys; in a catalog that would drop a
table's columns without a word, so duplicates are errors here.
"""

from __future__ import annotations

import csv
from typing import Any

import yaml

from proxy.policy.problems import PolicyError, Problem


class YamlMap(dict):
    """A YAML mapping that knows its own line and the line of each key (1-based)."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class YamlList(list):
    """A YAML sequence that knows its own line and the line of each item (1-based)."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> YamlMap:
    loader.flatten_mapping(node)
    out = YamlMap()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise _DuplicateKey(None, None, "a mapping key must be a plain value", key_node.start_mark) from None
        if key in out:
            raise _DuplicateKey(None, None, f"duplicate key {key!r} (first on line {out.key_lines[key]})",
                                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_list(loader: _Loader, node: yaml.SequenceNode) -> YamlList:
    out = YamlList()
    out.line = node.start_mark.line + 1
    for item in node.value:
        out.append(loader.construct_object(item, deep=True))
        out.item_lines.append(item.start_mark.line + 1)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_list)


def load_yaml(text: str, file: str) -> Any:
    """Parse YAML ``text``; syntax errors and duplicate keys raise ``PolicyError`` naming ``file`` and line.

    >>> doc = load_yaml("a: 1\\nb:\\n  - x\\n", "t.yaml")
    >>> doc["a"], doc.line_of("b"), doc["b"].line_of(0)
    (1, 2, 3)
    >>> load_yaml("a: 1\\na: 2\\n", "t.yaml")
    Traceback (most recent call last):
    ...
    proxy.policy.problems.PolicyError: t.yaml:2: duplicate key 'a' (first on line 1)
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise PolicyError([Problem(file, exc.problem_mark.line + 1, exc.problem)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context and exc.context_mark is not None:
            what += f" ({exc.context.removeprefix('while ')} on line {exc.context_mark.line + 1})"
        raise PolicyError([Problem(file, line, f"YAML: {what}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(file, None, f"YAML: {exc}")]) from None


def split_csv_line(line: str) -> list[str]:
    """Split one policy.csv line into stripped fields (Casbin's CSV: commas, optional quotes).

    >>> split_csv_line("p, app, billing, contact, read, allow")
    ['p', 'app', 'billing', 'contact', 'read', 'allow']
    >>> split_csv_line('p, "a,b", x')
    ['p', 'a,b', 'x']
    """
    row = next(csv.reader([line], skipinitialspace=True), [])
    return [field.strip() for field in row]


def line_of(node: Any, key: Any = None, default: int | None = None) -> int | None:
    """Line of ``key`` in a YamlMap (or of the node itself), else ``default``."""
    if isinstance(node, YamlMap):
        return node.line_of(key) if key is not None else node.line
    if isinstance(node, YamlList):
        return node.line_of(key) if isinstance(key, int) else node.line
    return default
