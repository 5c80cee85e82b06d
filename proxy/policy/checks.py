"""Static checks of a loaded policy: findings a loader cannot reject outright but a reviewer must see.

``check_policy`` reports purposes nobody may declare, default purposes a role may
not declare, rules that never decide anything (shadowed by a deny or covered by
another rule) or can never take effect, names that are not database roles,
catalog entries that do not match the database schema, and code the database runs
implicitly (triggers, casts, operators...) that the catalog does not declare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Iterable

from proxy.analysis.model import Column, Table
from proxy.analysis.schema import VIEW
from proxy.policy import vocabulary as v
from proxy.policy.engine import Policy
from proxy.policy.problems import ERROR, WARNING, PolicyError, Problem


def table_columns(schema: Any, table: Table) -> set[str] | None:
    """The column names of ``table`` in ``schema``, or None when the table does not exist.

    ``schema`` is the analysis' ``Schema`` (anything with ``relation(schema, name)``
    returning an object with ``columns``, or None), an object with ``columns(table)``
    returning names or None, or a mapping from ``Table`` (or ``"schema.table"``) to
    column names (or to a mapping keyed by column name).

    >>> table_columns({"crm.members": ["member_id", "email"]}, Table("crm", "members")) == {"member_id", "email"}
    True
    >>> table_columns({Table("crm", "members"): {"email": "text"}}, Table("crm", "nope")) is None
    True
    """
    if callable(getattr(schema, "relation", None)):
        rel = schema.relation(table.schema, table.name)
        return None if rel is None else set(rel.columns)
    if callable(getattr(schema, "columns", None)):
        found = schema.columns(table)
        return None if found is None else set(found)
    mapping = schema
    if not isinstance(mapping, Mapping):
        raise TypeError("schema must map tables to column names (see proxy.policy.checks.table_columns)")
    for key in (table, str(table)):
        if key in mapping:
            return set(mapping[key])
    return None


def _schema_problems(policy: Policy, schema: Any) -> list[Problem]:
    out: list[Problem] = []
    cat = policy.catalog
    for table, entry in sorted(cat.tables.items()):
        cols = table_columns(schema, table)
        if cols is None:
            out.append(Problem(cat.file, entry.line, f"table {table} is not in the database schema"))
            continue
        for col in sorted(set(entry.columns) - cols):
            out.append(Problem(cat.file, entry.column_lines.get(col, entry.line),
                               f"column {table}.{col} is not in the database schema"))
        if entry.subject and entry.subject not in cols:
            out.append(Problem(cat.file, entry.line, f"subject column {table}.{entry.subject} is not in the "
                                                     f"database schema"))
        for col in sorted(cols - set(entry.columns)):
            if not cat.categories_of(Column(table.schema, table.name, col)):
                out.append(Problem(cat.file, entry.line, f"column {table}.{col} is not in the catalog and no "
                                                         f"personal_by_default covers it: it is treated as not "
                                                         f"personal", WARNING))
    for fn in sorted(cat.functions.values(), key=lambda f: f.name):
        for col in fn.reads + fn.writes:
            cols = table_columns(schema, Table(col.schema, col.table))
            if cols is None or col.name not in cols:
                out.append(Problem(cat.file, fn.line, f"function {fn.name}: column {col} is not in the database "
                                                      f"schema"))
    consent = cat.consent
    if consent is not None:
        cols = table_columns(schema, consent.table)
        if cols is None:
            out.append(Problem(cat.file, consent.line, f"consent table {consent.table} is not in the database schema"))
        else:
            for key in ("subject", "purpose", "status", "recorded_at"):
                name = getattr(consent, key)
                if name is not None and name not in cols:
                    out.append(Problem(cat.file, consent.line, f"consent: {key} column {consent.table}.{name} is not "
                                                               f"in the database schema"))
        for further in consent.further:
            cols = table_columns(schema, further.table)
            if cols is None:
                out.append(Problem(cat.file, further.line, f"consent: further source {further.table} is not in the "
                                                           f"database schema"))
                continue
            for key, name in further.columns().items():
                if name not in cols:
                    out.append(Problem(cat.file, further.line, f"consent: further source {further.table}: {key} "
                                                               f"column {name} is not in the database schema"))
    return out


def _implicit_code_problems(policy: Policy, schema: Any) -> list[Problem]:
    """Code PostgreSQL runs without a statement naming it (the loaded ``Schema``'s casts, operators,
    triggers, defaults, policies...) that the catalog does not declare: the proxy refuses every
    statement that may run it, which a reviewer should learn here rather than from refusals.

    >>> from proxy.analysis.schema import Schema
    >>> from proxy.devtools.sample import policies_dir
    >>> s = Schema(on_write={("crm", "members"): {"crm.audit_row": "runs in a trigger on crm.members"}})
    >>> [p.message for p in _implicit_code_problems(Policy.load(policies_dir()), s)]  # doctest: +NORMALIZE_WHITESPACE
    ['function crm.audit_row runs in a trigger on crm.members, and it is not declared in the catalog,
      so the proxy refuses statements that write crm.members']
    """
    declared = policy.catalog.functions
    everywhere = "every statement on this database"
    found: dict[tuple[str, str], dict[str, set[str]]] = {}  # (function, why) -> refused statements -> relations

    def note(fn: str, why: str, refused: str, relation: str = "") -> None:
        if fn.lower() not in declared:
            found.setdefault((fn, why), {}).setdefault(refused, set()).add(relation)

    for fn, why in getattr(schema, "implicit", {}).items():
        note(fn, why, everywhere)
    for fn in getattr(schema, "casts", ()):
        note(fn, "is behind a cast", everywhere)
    for symbol, fns in getattr(schema, "operators", {}).items():
        for fn in fns:
            note(fn, f"is behind the operator {symbol}", f"statements using {symbol}")
    for scope, refused in ((getattr(schema, "on_write", {}), "statements that write"),
                           (getattr(schema, "on_read", {}), "statements that read or write")):
        for (sname, rname), fns in scope.items():
            for fn, why in fns.items():
                note(fn, why, refused, f"{sname}.{rname}")
    out = []
    anywhere = {fn for (fn, _), refused in found.items() if everywhere in refused}
    for (fn, why), refused in sorted(found.items()):
        if fn in anywhere and everywhere not in refused:
            continue  # said once, in the widest terms
        what = everywhere if everywhere in refused else "; ".join(
            f"{kind} {', '.join(sorted(rels))}".strip() for kind, rels in sorted(refused.items()))
        out.append(Problem(policy.catalog.file, None, f"function {fn} {why}, and it is not declared in the catalog, "
                                                      f"so the proxy refuses {what}", WARNING))
    for (sname, rname), with_rules in getattr(schema, "rules", {}).items():
        out.append(Problem(policy.catalog.file, None, f"{sname}.{rname}: a write reaches relations with rules "
                                                      f"({', '.join(with_rules)}), so the proxy refuses writes to it",
                           WARNING))
    return out


def _role_problems(policy: Policy, roles: set[str]) -> list[Problem]:
    out: list[Problem] = []
    rs = policy.ruleset
    for rule in rs.rules:
        if rule.sub not in roles and rule.sub not in policy.groups:
            # A deny, mask or aggregate rule that never matches leaves whatever else applies in force:
            # a misspelled role ('analysts') kept a deny from ever applying (hunt 20). An error.
            out.append(Problem(rs.file, rule.line, f"rule for {rule.sub!r}, which is neither a database role nor a "
                                                   f"group: it can never match",
                               WARNING if rule.effect == v.ALLOW else ERROR))
    for g in rs.groupings:
        if g.role not in roles and g.role not in policy.groups:
            out.append(Problem(rs.file, g.line, f"{g.role!r} is neither a database role nor a group", WARNING))
    for role, line in policy.purposes.default_lines.items():
        if role not in roles:
            out.append(Problem(policy.purposes.file, line, f"default purpose for {role!r}, which is not a database "
                                                           f"role", WARNING))
    return out


def _members(policy: Policy, sub: str) -> list[str]:
    rm = policy.enforcer.get_role_manager()
    return [s for s in policy.subjects if rm.has_link(s, sub)]


def _rule_problems(policy: Policy) -> list[Problem]:
    out: list[Problem] = []
    decisive = {rule for d in policy.table.values() for rule in d.rules}
    everyone = sorted(policy.purposes.purposes)
    for rule in policy.ruleset.rules:
        if rule.act != v.DECLARE and rule.effect != v.DENY:
            purposes = everyone if rule.purpose == v.ANY else policy.purposes.descendants(rule.purpose)
            members = _members(policy, rule.sub)
            if not any(policy.may_declare(s, p).allowed for s in members for p in purposes):
                out.append(Problem(rule.file, rule.line,
                                   f"rule can never take effect: no role it covers may declare purpose "
                                   f"{rule.purpose!r}" + ("" if rule.purpose == v.ANY else " or one under it"),
                                   WARNING))
                continue
        if str(rule) in decisive:
            continue
        cells = policy.applies_at(rule)
        if not cells:
            out.append(Problem(rule.file, rule.line, "rule can never match any request", WARNING))
            continue
        deciders = sorted({r for cell in cells for r in policy.table[cell].rules})
        rules = [policy.rule_named(d) for d in deciders]
        if rules and all(r is not None and r.effect == v.DENY for r in rules):
            what = "shadowed by deny " + "; ".join(r.text + f" (line {r.line})" for r in rules[:3])
        else:
            what = "every request it applies to is decided by " + "; ".join(
                (r.text + f" (line {r.line})") if r else "?" for r in rules[:3])
        out.append(Problem(rule.file, rule.line, f"rule never decides anything: {what}", WARNING))
    return out


def _purpose_problems(policy: Policy) -> list[Problem]:
    out: list[Problem] = []
    pf = policy.purposes
    for name, purpose in sorted(pf.purposes.items()):
        if not any(policy.may_declare(s, name).allowed for s in policy.subjects):
            out.append(Problem(pf.file, purpose.line, f"purpose {name!r} cannot be declared by any role "
                                                      f"(no declare rule covers it)", WARNING))
    for role, purpose in sorted(pf.defaults.items()):
        d = policy.may_declare(role, purpose)
        if not d.allowed:
            out.append(Problem(pf.file, pf.default_lines.get(role), f"role {role!r} has default purpose "
                                                                     f"{purpose!r} but may not declare it: {d.why}",
                               ERROR))
    return out


def _consent_problems(policy: Policy) -> list[Problem]:
    """Consent decisions any purpose may rewrite, and tables the consent filter matches by a subject of
    another kind than the consent table's.

    The filter compares a table's ``subject`` column with the consent table's: both must
    name the same people. A table whose subject column is not classified like the consent
    table's (say ``participant_id`` against ``member_id``) and that a withdrawable purpose
    may read would hide the rows of the wrong people and show those who withdrew.
    """
    consent = policy.catalog.consent
    if consent is None:
        return []
    source = consent.table
    own = set(policy.categories_of(Column(source.schema, source.name, consent.subject)))
    out: list[Problem] = []
    # The decisions themselves: unclassified, every purpose may write them, and a purpose
    # could grant itself every consent the filter checks (UPDATE ... SET status = 'granted').
    loose = [c for c in (consent.purpose, consent.status, consent.recorded_at)
             if c and not policy.categories_of(Column(source.schema, source.name, c))]
    if loose:
        out.append(Problem(policy.catalog.file, consent.line, (
            f"consent table {source}: {', '.join(loose)} not classified as personal data, so any purpose may "
            f"rewrite the consent decisions and switch the consent filter off: give them a category"), ERROR))
    out += _further_problems(policy, own)
    for table, entry in sorted(policy.catalog.tables.items(), key=lambda kv: str(kv[0])):
        if not entry.subject or table == source:
            continue
        if own & set(entry.columns.get(entry.subject, ())):
            continue
        categories = {c for cats in entry.columns.values() for c in cats}
        if entry.personal_by_default:
            categories.add(entry.personal_by_default)
        withdrawable = _withdrawable(policy, categories)
        if withdrawable:
            out.append(Problem(policy.catalog.file, entry.line, (
                f"table {table}: its subject column {entry.subject!r} is not classified like the consent table's "
                f"{consent.table}.{consent.subject} ({', '.join(sorted(own)) or 'no category'}), yet the consent "
                f"filter matches the two under {', '.join(withdrawable)}: name the column that holds the consent "
                f"table's subject"), ERROR))
    return out


def _further_problems(policy: Policy, own: set[str]) -> list[Problem]:
    """The further consent sources' faults that turn the filter against the people it protects: decision
    columns with no category (any purpose could clear a revocation, ``UPDATE ... SET revoked_at = NULL``),
    and a subject column not classified like the consent table's (its ids would be some other people's:
    the filter would leave out the wrong rows and keep those whose consent was revoked).

    >>> from proxy.devtools.sample import policies_dir
    >>> _further_problems(Policy.load(policies_dir()), {"identity.member_id"})
    []
    """
    consent = policy.catalog.consent
    out: list[Problem] = []
    for further in consent.further:
        table = further.table
        columns = further.columns()
        subject = set(policy.categories_of(Column(table.schema, table.name, columns.pop("subject"))))
        loose = [c for c in columns.values() if not policy.categories_of(Column(table.schema, table.name, c))]
        if loose:
            out.append(Problem(policy.catalog.file, further.line, (
                f"consent: further source {table}: {', '.join(loose)} not classified as personal data, so any "
                f"purpose may rewrite the decisions and switch the consent filter off: give them a category"),
                ERROR))
        if not own & subject:
            out.append(Problem(policy.catalog.file, further.line, (
                f"consent: further source {table}: its subject column {further.subject!r} is not classified like "
                f"the consent table's {consent.table}.{consent.subject} ({', '.join(sorted(own)) or 'no category'})"
                f": its rows would withdraw other people's consent; name the column that holds the same subjects"),
                ERROR))
    return out


def _spelled(value) -> str:
    """A status value as PostgreSQL's text output shows it (``true``, ``7``, ``withdrawn``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def consent_value_problems(policy: Policy, statuses: Mapping[str | None, int],
                           purposes: Mapping[str | None, int]) -> list[Problem]:
    """What the consent table holds that the filter will not read as the catalog means it: the rows' status
    and purpose values (as text, NULL as None, with their row counts; read by ``check --dsn``). The filter
    compares them exactly, so a value that differs from a catalogued one only in case or surrounding blanks
    (``Withdrawn``, ``Marketing``) silently counts as no decision: an error. Other values that are neither
    withdrawn nor granted, or name no purpose, are warnings: such rows decide nothing.

    >>> from proxy.devtools.sample import policies_dir
    >>> pol = Policy.load(policies_dir())
    >>> for p in consent_value_problems(pol, {"withdrawn": 9, "Withdrawn": 2, "pending": 1},
    ...                                 {"marketing": 8, "Marketing.Announcements": 3}):
    ...     print(p.severity, p.message)  # doctest: +ELLIPSIS
    error consent table privacy.consents: 2 rows have status 'Withdrawn', which the filter does not read as ...
    warning consent table privacy.consents: 1 row has status 'pending', neither withdrawn (withdrawn) nor ...
    error consent table privacy.consents: 3 rows have purpose 'Marketing.Announcements', which names no ...
    """
    consent = policy.catalog.consent
    if consent is None:
        return []
    where = f"consent table {consent.table}"
    known = {_spelled(x) for x in consent.withdrawn + consent.granted}
    folded = {k.strip().lower(): k for k in known}
    out: list[Problem] = []
    for value, count in sorted(statuses.items(), key=lambda kv: str(kv[0])):
        if value in known:
            continue
        rows = f"{count} rows have" if count != 1 else "1 row has"
        near = folded.get(value.strip().lower()) if value is not None else None
        if near is not None:
            out.append(Problem(policy.catalog.file, consent.line, (
                f"{where}: {rows} status {value!r}, which the filter does not read as {near!r} (it "
                f"compares exactly): list it under withdrawn or granted, or correct the rows"), ERROR))
        else:
            shown = "NULL" if value is None else repr(value)
            out.append(Problem(policy.catalog.file, consent.line, (
                f"{where}: {rows} status {shown}, neither withdrawn ({', '.join(map(_spelled, consent.withdrawn))})"
                f" nor granted ({', '.join(map(_spelled, consent.granted)) or 'none'}): they decide nothing"),
                WARNING))
    out += _purpose_name_problems(policy, consent.line, purposes, lambda rows, shown, near: (
        f"{where}: {rows} purpose {shown}, which names no purpose: the filter compares names exactly, so these "
        f"decisions do not count for {near!r}; correct the rows" if near is not None else
        f"{where}: {rows} purpose {shown}, not a purpose of purposes.yaml: they decide nothing"))
    return out


def _purpose_name_problems(policy: Policy, line: int | None, values: Mapping[str | None, int],
                           message: Callable[[str, str, str | None], str]) -> list[Problem]:
    """Problems with the purpose names a consent table's rows hold (``values``: each with its row count):
    an error for one that differs from a purpose's name only in case or blanks (the filter compares
    exactly), a warning for any other that names no purpose. ``message(rows, shown, near)`` says it
    (``near``: the purpose meant, or None)."""
    names = set(policy.purposes.purposes)
    folded = {n.lower(): n for n in names}
    out: list[Problem] = []
    for value, count in sorted(values.items(), key=lambda kv: str(kv[0])):
        if value in names:
            continue
        rows = f"{count} rows have" if count != 1 else "1 row has"
        near = folded.get(value.strip().lower()) if value is not None else None
        shown = "NULL" if value is None else repr(value)
        severity = ERROR if near is not None else WARNING
        out.append(Problem(policy.catalog.file, line, message(rows, shown, near), severity))
    return out


def further_value_problems(policy: Policy, source, statuses: Mapping[str | None, int],
                           scopes: Mapping[str | None, int]) -> list[Problem]:
    """What a further consent source holds that the filter will not read as the catalog means it: its
    rows' status and scope values (as text, NULL as None, with their row counts; read by ``check --dsn``).
    A status differing from a withdrawn value only in case or blanks is an error (those revocations count
    for nothing); so is a scope differing so from a purpose name (the filter reads it as covering
    nothing, and withdraws those members from every withdrawable purpose). A scope naming no purpose,
    or NULL, is a warning: it covers nothing either.

    >>> from proxy.policy.catalog import FurtherSource
    >>> from proxy.analysis.model import Table
    >>> from proxy.devtools.sample import policies_dir
    >>> g = FurtherSource(Table("member", "guardian_consents"), "member_id", status="state",
    ...                   withdrawn=("revoked",), scope="scope")
    >>> for p in further_value_problems(Policy.load(policies_dir()), g, {"revoked": 2, "Revoked ": 1},
    ...                                 {"marketing": 5, "Research": 1, "service_use": 7}):
    ...     print(p.severity, p.message)  # doctest: +ELLIPSIS
    error consent: further source member.guardian_consents: 1 row has status 'Revoked ', which the filter ...
    error consent: further source member.guardian_consents: 1 row has scope 'Research', which names no purpose...
    warning consent: further source member.guardian_consents: 7 rows have scope 'service_use', not a purpose ...
    """
    where = f"consent: further source {source.table}"
    file, line = policy.catalog.file, source.line
    known = {_spelled(x) for x in source.withdrawn}
    folded = {k.strip().lower(): k for k in known}
    out: list[Problem] = []
    for value, count in sorted(statuses.items(), key=lambda kv: str(kv[0])):
        near = folded.get(value.strip().lower()) if value is not None else None
        if value not in known and near is not None:
            rows = f"{count} rows have" if count != 1 else "1 row has"
            out.append(Problem(file, line, (f"{where}: {rows} status {value!r}, which the filter does not read as "
                                            f"{near!r} (it compares exactly): list it under withdrawn, or correct "
                                            f"the rows"), ERROR))
    out += _purpose_name_problems(policy, line, scopes, lambda rows, shown, near: (
        f"{where}: {rows} scope {shown}, which names no purpose: the filter compares names exactly, so these "
        f"consents do not cover {near!r}; correct the rows" if near is not None else
        f"{where}: {rows} scope {shown}, not a purpose of purposes.yaml: they cover no purpose, and withdraw "
        f"their subjects from every withdrawable one"))
    return out


def _withdrawable(policy: Policy, categories: set[str]) -> list[str]:
    """The purposes with a consent filter under which some role may read one of ``categories``."""
    return sorted({p for role in policy.subjects for c in categories
                   for p in policy.purposes_allowing(role, c, v.READ) if policy.consent_mode(p)})


def _unfiltered_problems(policy: Policy, schema: Any = None) -> list[Problem]:
    """Tables holding personal data a purpose with a consent filter may read, with no subject column for the
    filter to match: their rows would all be shown, those of people who withdrew included. Catalogued tables
    without ``subject:``, and with a loaded schema the tables a schema's ``personal_by_default`` covers.

    >>> from proxy.devtools.sample import policies_dir
    >>> from proxy.analysis.schema import Schema
    >>> s = Schema.from_dict({"schemas": {"browsing": {"tables": {"clicks_copy": ["member_id", "url"]}}}})
    >>> [p.message.split(":")[0] for p in _unfiltered_problems(Policy.load(policies_dir()), s)]
    ['table browsing.clicks_copy']
    """
    cat = policy.catalog
    consent = cat.consent
    if consent is None:
        return []
    found: list[tuple[str, int | None, set[str]]] = []
    for table, entry in sorted(cat.tables.items(), key=lambda kv: str(kv[0])):
        if entry.subject or table == consent.table:
            continue
        categories = {c for cats in entry.columns.values() for c in cats}
        if entry.personal_by_default:
            categories.add(entry.personal_by_default)
        found.append((str(table), entry.line, categories))
    for rel in getattr(schema, "relations", ()):
        default = cat.schema_defaults.get(rel.schema)
        if default and rel.kind != VIEW and Table(rel.schema, rel.name) not in cat.tables:
            found.append((f"{rel.schema}.{rel.name}", cat.schema_lines.get(rel.schema), {default}))
    out = []
    for name, line, categories in found:
        purposes = _withdrawable(policy, categories)
        if purposes:
            out.append(Problem(cat.file, line, (
                f"table {name}: purposes with a consent filter ({', '.join(purposes)}) may read its personal data, "
                f"but the catalog names no subject column for the filter to match, so the rows of people who "
                f"withdrew would be shown: give the table 'subject:'"), ERROR))
    return out


def _conflict_problems(policy: Policy) -> list[Problem]:
    """Mask rules that conflict where they meet (``vocabulary.mask_conflict``): the cells they decide are
    denied, which the rules' author did not write; one error per set of rules, at the first one's line."""
    found: dict[tuple[str, ...], list[tuple[str, str, str]]] = {}
    for (role, purpose, category, _), d in policy.table.items():
        if d.note.startswith("conflicting masks"):
            found.setdefault(d.rules, []).append((role, purpose, category))
    out = []
    for rules, cells in sorted(found.items()):
        lines = sorted(r.line for r in (policy.rule_named(x) for x in rules) if r is not None)
        role, purpose, category = sorted(cells)[0]
        more = f" (and {len(cells) - 1} more role, purpose and category combinations)" if len(cells) > 1 else ""
        out.append(Problem(policy.ruleset.file, lines[0] if lines else None, (
            f"mask rules on lines {', '.join(map(str, lines))} conflict for role {role}, purpose {purpose}, "
            f"category {category}{more}: which reveals less depends on the column's type, so the proxy denies "
            f"it; keep one of them"), ERROR))
    return out


def check_policy(policy: Policy, schema: Any = None, roles: Iterable[str] | None = None) -> list[Problem]:
    """Static findings about ``policy``, errors first, then by file and line.

    ``schema`` (optional) is the database schema to compare the catalog with (see
    ``table_columns``); ``roles`` (optional) the database role names.
    """
    problems = (_purpose_problems(policy) + _rule_problems(policy) + _consent_problems(policy)
                + _unfiltered_problems(policy, schema) + _conflict_problems(policy))
    if roles is not None:
        problems += _role_problems(policy, set(roles))
    if schema is not None:
        problems += _schema_problems(policy, schema) + _implicit_code_problems(policy, schema)
    return sorted(problems, key=lambda p: (p.severity != ERROR, p.file, p.line or 0, p.message))


def check_directory(directory: str | Path, schema: Any = None, roles: Iterable[str] | None = None
                    ) -> list[Problem]:
    """Load the policy in ``directory`` and check it: load errors or ``check_policy`` findings."""
    try:
        policy = Policy.load(directory)
    except PolicyError as exc:
        return list(exc.problems)
    return check_policy(policy, schema, roles)
