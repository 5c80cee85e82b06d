"""The purpose registry (purposes.yaml): the purposes published in privacy notices, their hierarchy, and roles' default purposes.

A purpose is a dotted name (``marketing`` > ``marketing.email``); a rule written
for a parent purpose covers its children.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from proxy.policy import vocabulary as v
from proxy.policy.problems import Collector
from proxy.policy.sources import YamlMap, load_yaml

FILE = "purposes.yaml"
TOP_KEYS = ("purposes", "defaults")
PURPOSE_KEYS = ("description", "original", "source", "opt_in", "withdrawable")
TEXT_KEYS = ("description", "original", "source")


@dataclass(frozen=True, slots=True)
class Purpose:
    """One purpose of use, as published: ``description`` in any language, ``original`` wording, ``source`` notice."""

    name: str
    description: str
    source: str
    original: str = ""
    line: int | None = None
    # Rows of data subjects are used under this purpose only if they consented to it (or
    # to a purpose above it); see the consent section of catalog.yaml. A purpose under an
    # opt-in purpose is opt-in too.
    opt_in: bool = False
    # False: data subjects cannot withdraw this purpose (e.g. a legal obligation), so no
    # consent filtering applies under it or under the purposes below it.
    withdrawable: bool = True


@dataclass(frozen=True, slots=True)
class Purposes:
    purposes: Mapping[str, Purpose]
    defaults: Mapping[str, str]  # role -> purpose used when none is declared
    file: str = FILE
    default_lines: Mapping[str, int] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.purposes

    def is_opt_in(self, name: str) -> bool:
        """Whether ``name`` or a purpose above it is marked ``opt_in``.

        >>> p = parse_purposes(EXAMPLE)
        >>> p.is_opt_in("marketing.email"), p.is_opt_in("billing")
        (True, False)
        """
        return any(self.purposes[a].opt_in for a in v.ancestors(name) if a in self.purposes)

    def is_withdrawable(self, name: str) -> bool:
        """Whether consent to ``name`` can be withdrawn (no purpose from it upwards says ``withdrawable: false``).

        >>> parse_purposes(EXAMPLE).is_withdrawable("billing"), parse_purposes(EXAMPLE).is_withdrawable("marketing")
        (False, True)
        """
        return all(self.purposes[a].withdrawable for a in v.ancestors(name) if a in self.purposes)

    def descendants(self, name: str) -> tuple[str, ...]:
        """The purpose and every purpose under it, sorted.

        >>> parse_purposes(EXAMPLE).descendants("marketing")
        ('marketing', 'marketing.email')
        """
        return tuple(sorted(p for p in self.purposes if p == name or p.startswith(name + ".")))


EXAMPLE = """
purposes:
  billing: {description: Billing for the service, source: notice 1, withdrawable: false}
  marketing: {description: Announcements and advertising, original: 宣伝物等のご提供, source: notice 1, opt_in: true}
  marketing.email: {description: Announcements by e-mail, source: notice 2}
defaults:
  billing_batch: billing
"""


def parse_purposes(text: str, file: str = FILE) -> Purposes:
    """Parse purposes.yaml text; every problem found raises one ``PolicyError``.

    >>> p = parse_purposes(EXAMPLE)
    >>> "marketing.email" in p, p.defaults["billing_batch"], p.purposes["marketing"].original
    (True, 'billing', '宣伝物等のご提供')
    >>> parse_purposes("purposes:\\n  a.b: {description: x, source: y}\\n")
    Traceback (most recent call last):
    ...
    proxy.policy.problems.PolicyError: purposes.yaml:2: purpose 'a.b': its parent purpose 'a' is not defined
    """
    c = Collector(file)
    doc = load_yaml(text, file)
    if doc is None:
        doc = YamlMap()
    if not isinstance(doc, YamlMap):
        c.error(1, "purposes.yaml must be a mapping with 'purposes' and 'defaults'")
        c.raise_if_any()
    for key in doc:
        if key not in TOP_KEYS:
            c.error(doc.line_of(key), f"unknown key {key!r} (expected one of: {', '.join(TOP_KEYS)})")
    node = doc.get("purposes")
    if not isinstance(node, YamlMap) or not node:
        c.error(doc.line_of("purposes") if "purposes" in doc else 1, "'purposes' must be a non-empty mapping")
        node = YamlMap()
    purposes: dict[str, Purpose] = {}
    for name, body in node.items():
        line = node.line_of(name)
        if not v.is_dotted_name(name):
            c.error(line, f"purpose name {name!r} must be lower-case words joined by dots (e.g. marketing.email)")
            continue
        if v.depth(name) > v.MAX_DEPTH:
            c.error(line, f"purpose {name!r} is nested deeper than {v.MAX_DEPTH} levels")
            continue
        if not isinstance(body, YamlMap):
            c.error(line, f"purpose {name!r} must be a mapping with description and source")
            continue
        for key in body:
            if key not in PURPOSE_KEYS:
                c.error(body.line_of(key), f"purpose {name!r}: unknown key {key!r} "
                                           f"(expected one of: {', '.join(PURPOSE_KEYS)})")
        values = {}
        flags = {}
        for key, default in (("opt_in", False), ("withdrawable", True)):
            flags[key] = body.get(key, default)
            if not isinstance(flags[key], bool):
                c.error(body.line_of(key), f"purpose {name!r}: {key} must be true or false")
                flags[key] = default
        if flags["opt_in"] and not flags["withdrawable"]:
            c.error(line, f"purpose {name!r}: an opt_in purpose is always withdrawable")
        for key in TEXT_KEYS:
            value = body.get(key, "")
            if not isinstance(value, str):
                c.error(body.line_of(key), f"purpose {name!r}: {key} must be text")
                value = ""
            values[key] = value.strip()
        for key in ("description", "source"):
            if not values[key]:
                c.error(line, f"purpose {name!r} needs a {key}")
        purposes[name] = Purpose(name, values["description"], values["source"], values["original"], line,
                                 flags["opt_in"], flags["withdrawable"])
    for name, purpose in purposes.items():
        p = v.parent(name)
        if p is not None and p not in purposes:
            c.error(purpose.line, f"purpose {name!r}: its parent purpose {p!r} is not defined")
    defaults: dict[str, str] = {}
    default_lines: dict[str, int] = {}
    dnode = doc.get("defaults")
    if dnode is not None and not isinstance(dnode, YamlMap):
        c.error(doc.line_of("defaults"), "'defaults' must be a mapping role: purpose")
        dnode = None
    for role, purpose in (dnode or {}).items():
        line = dnode.line_of(role)
        if not isinstance(role, str) or not v.is_subject_name(role):
            c.error(line, f"defaults: {role!r} is not a valid role name")
            continue
        if not isinstance(purpose, str) or purpose not in purposes:
            c.error(line, f"defaults: role {role!r} has unknown default purpose {purpose!r}")
            continue
        defaults[role] = purpose
        default_lines[role] = line
    c.raise_if_any()
    return Purposes(purposes, defaults, file, default_lines)
