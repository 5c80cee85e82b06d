"""What a new version of a policy would stop protecting, compared with the version in force.

A policy file caught half written is often valid: a catalog cut before ``schemas:``
lists no table, a policy.csv cut at a line's end lacks its last rules, purposes.yaml
cut inside a block loses ``withdrawable``. Each reads as a policy that protects less.
``dropped_protections`` lists such losses, so that the file watcher can leave a change
that makes them to a deliberate reload (SIGHUP) instead of putting it in force by
itself. It compares only what a truncation can remove; what a change adds (an allow
rule, a purpose) is not its business.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.analysis.model import Column
from proxy.policy import vocabulary as v
from proxy.policy.engine import Policy

_RESTRICTIVE = frozenset({v.DENY, v.MASK, v.AGGREGATE})


def dropped_protections(old: Policy, new: Policy, limit: int = 8) -> list[str]:
    """What ``new`` no longer protects that ``old`` does, in words (at most ``limit`` items, then a count).

    >>> from proxy.devtools.sample import policies_dir
    >>> from proxy.policy.engine import Policy
    >>> p = Policy.load(policies_dir())
    >>> dropped_protections(p, p)
    []
    """
    found: list[str] = []
    found += _catalog_losses(old, new)
    found += _consent_losses(old, new)
    found += _rule_losses(old, new)
    found += _purpose_losses(old, new)
    if old.model_text != new.model_text:  # what the rules mean: no comparison short of every decision
        found.append("model.conf changed")
    if len(found) > limit:
        found = found[:limit] + [f"and {len(found) - limit} more"]
    return found


def _catalog_losses(old: Policy, new: Policy) -> list[str]:
    """Columns whose categories shrink, subjects and defaults that go.

    >>> from proxy.policy.catalog import EXAMPLE, parse_catalog
    >>> from dataclasses import replace
    >>> class P:  # a policy as far as these checks read one
    ...     def __init__(self, catalog): self.catalog = catalog
    >>> cat = parse_catalog(EXAMPLE)
    >>> _catalog_losses(P(cat), P(replace(cat, tables={})))
    ['crm.members: no longer catalogued']
    """
    out = []
    oc, nc = old.catalog, new.catalog
    for table, entry in sorted(oc.tables.items(), key=lambda kv: str(kv[0])):
        now = nc.tables.get(table)
        if now is None:
            out.append(f"{table}: no longer catalogued")
            continue
        if entry.subject and now.subject != entry.subject:
            out.append(f"{table}: subject {entry.subject} dropped")
        if entry.personal_by_default and now.personal_by_default != entry.personal_by_default:
            out.append(f"{table}: personal_by_default {entry.personal_by_default} dropped")
        for col in sorted(entry.columns):
            column = Column(table.schema, table.name, col)
            lost = set(oc.categories_of(column)) - set(nc.categories_of(column))
            if lost:
                out.append(f"{column}: category {', '.join(sorted(lost))} dropped")
    for schema, default in sorted(oc.schema_defaults.items()):
        if nc.schema_defaults.get(schema) != default:
            out.append(f"schema {schema}: personal_by_default {default} dropped")
    for name, fn in sorted(oc.functions.items()):
        now_fn = nc.functions.get(name)
        if now_fn is not None and not set(fn.reads) <= set(now_fn.reads):
            out.append(f"function {name}: reads dropped")
        if now_fn is not None and not set(fn.writes) <= set(now_fn.writes):
            out.append(f"function {name}: writes dropped")
    return out


def _consent_losses(old: Policy, new: Policy) -> list[str]:
    oc, nc = old.catalog.consent, new.catalog.consent
    if oc is None:
        return []
    if nc is None:
        return ["the consent section"]
    keep = ("table", "subject", "purpose", "status", "withdrawn", "granted", "recorded_at", "barrier")
    changed = [k for k in keep if getattr(oc, k, None) != getattr(nc, k, None)]
    out = [f"consent: {', '.join(changed)} changed"] if changed else []
    now = {f.table: replace(f, line=None) for f in nc.further}
    for source in oc.further:  # a further source gone or changed may withdraw less (or nothing)
        if source.table not in now:
            out.append(f"consent: further source {source.table} dropped")
        elif now[source.table] != replace(source, line=None):
            out.append(f"consent: further source {source.table} changed")
    return out


def _rule_losses(old: Policy, new: Policy) -> list[str]:
    """Deny, mask and aggregate rules and group memberships that are gone (an allow rule gone protects more)."""
    def fields(rule) -> tuple:
        return rule.sub, rule.purpose, rule.category, rule.act, rule.effect, rule.option

    kept = {fields(r) for r in new.ruleset.rules}
    out = [f"rule {old.ruleset.file}:{r.line}: p, {', '.join(x for x in fields(r) if x)}"
           for r in old.ruleset.rules if r.effect in _RESTRICTIVE and fields(r) not in kept]
    members = {(g.role, g.group) for g in new.ruleset.groupings}
    out += [f"grouping {old.ruleset.file}:{g.line}: g, {g.role}, {g.group}"
            for g in old.ruleset.groupings if (g.role, g.group) not in members]
    return out


def _purpose_losses(old: Policy, new: Policy) -> list[str]:
    """Default purposes that change, and consent filters that go: a purpose no longer opt-in, or no longer
    withdrawable. (A purpose or a default that goes is refused to the sessions using it, which protects.)"""
    out = []
    for role, default in sorted(old.purposes.defaults.items()):
        now = new.purposes.defaults.get(role)
        if now is not None and now != default:  # (a cut line can name a purpose above it: hunt 22)
            out.append(f"default purpose of {role} changed to {now}")
    for name in sorted(old.purposes.purposes):
        if name not in new.purposes.purposes:
            continue
        if old.purposes.is_opt_in(name) and not new.purposes.is_opt_in(name):
            out.append(f"purpose {name}: opt_in dropped")
        if old.purposes.is_withdrawable(name) and not new.purposes.is_withdrawable(name):
            out.append(f"purpose {name}: withdrawable dropped")
    return out
