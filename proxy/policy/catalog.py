"""The personal-data catalog (catalog.yaml): categories, which columns hold which categories, and declared functions.

Lookups fail closed where the catalog says so: a column not listed falls into its
table's or schema's ``personal_by_default`` category; only columns outside both are
not personal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from proxy.analysis.model import Column, Table
from proxy.policy import vocabulary as v
from proxy.policy.problems import Collector
from proxy.policy.sources import YamlList, YamlMap, line_of, load_yaml

FILE = "catalog.yaml"
TOP_KEYS = ("categories", "schemas", "tables", "functions", "consent")
CONSENT_KEYS = ("table", "subject", "purpose", "status", "withdrawn", "granted", "recorded_at", "barrier",
                "further_sources")
FURTHER_KEYS = ("table", "subject", "revoked", "status", "withdrawn", "scope", "recorded_at")


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    description: str
    line: int | None = None


@dataclass(frozen=True, slots=True)
class TableEntry:
    table: Table
    columns: Mapping[str, tuple[str, ...]]
    subject: str | None = None
    personal_by_default: str | None = None
    line: int | None = None
    column_lines: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FunctionEntry:
    """A user-defined function and the columns it reads (and writes)."""

    name: str
    reads: tuple[Column, ...] = ()
    writes: tuple[Column, ...] = ()
    line: int | None = None


@dataclass(frozen=True, slots=True)
class FurtherSource:
    """Another table whose rows withdraw a data subject's consent (``consent: further_sources:``), such as
    a guardian's consent for a minor: it only ever withdraws, never grants.

    A row of subject ``subject`` withdraws every withdrawable purpose when it is revoked:
    ``revoked`` (a column) is not NULL, or ``status`` (a column) holds one of ``withdrawn``.
    With ``scope`` (a column holding a purpose name from purposes.yaml), a row that is not
    revoked still withdraws the purposes its scope does not cover (the scope's purpose and
    those under it are covered; a NULL scope or one naming no purpose covers nothing). With
    ``recorded_at``, only each subject's latest row counts; without it, every row does.
    """

    table: Table
    subject: str
    revoked: str | None = None
    status: str | None = None
    withdrawn: tuple[str | bool | int, ...] = ()
    scope: str | None = None
    recorded_at: str | None = None
    line: int | None = None

    def columns(self) -> dict[str, str]:
        """The declaration's keys naming columns, with the columns they name.

        >>> FurtherSource(Table("m", "g"), "member_id", revoked="revoked_at").columns()
        {'subject': 'member_id', 'revoked': 'revoked_at'}
        """
        named = {"subject": self.subject, "revoked": self.revoked, "status": self.status, "scope": self.scope,
                 "recorded_at": self.recorded_at}
        return {k: c for k, c in named.items() if c is not None}


@dataclass(frozen=True, slots=True)
class ConsentSource:
    """The table in the database that records data subjects' consent decisions, per purpose.

    A row says that subject ``subject`` decided ``status`` for purpose ``purpose`` (a
    name from purposes.yaml; a decision on a purpose covers the purposes under it).
    ``withdrawn`` are the status values that mean "withdrew", ``granted`` those that
    mean "consented" (needed for opt-in purposes). With ``recorded_at``, only the latest
    row per subject and purpose counts; without it, every row counts. ``barrier`` (the
    default) makes PostgreSQL filter by consent before it evaluates anything of the
    statement on a row (no error or side effect can reveal a filtered row), at the cost
    of predicates not reaching the table's indexes. ``further`` are the other tables whose
    rows withdraw consent too (``FurtherSource``).
    """

    table: Table
    subject: str
    purpose: str
    status: str
    withdrawn: tuple[str | bool | int, ...]
    granted: tuple[str | bool | int, ...] = ()
    recorded_at: str | None = None
    line: int | None = None
    barrier: bool = True
    further: tuple[FurtherSource, ...] = ()

    @property
    def tables(self) -> tuple[Table, ...]:
        """Every table whose rows decide consent: the consent table, then the further sources'.

        >>> from dataclasses import replace
        >>> guardians = FurtherSource(Table("crm", "guardians"), "member_id", revoked="revoked_at")
        >>> replace(parse_catalog(EXAMPLE).consent, further=(guardians,)).tables
        (Table(schema='privacy', name='consents'), Table(schema='crm', name='guardians'))
        """
        return (self.table, *(f.table for f in self.further))


@dataclass(frozen=True, slots=True)
class Catalog:
    categories: Mapping[str, Category]
    tables: Mapping[Table, TableEntry]
    schema_defaults: Mapping[str, str]  # schema -> personal_by_default category
    functions: Mapping[str, FunctionEntry]
    file: str = FILE
    schema_lines: Mapping[str, int] = field(default_factory=dict)
    consent: ConsentSource | None = None  # where per-subject consent is recorded, if anywhere

    def categories_of(self, column: Column) -> tuple[str, ...]:
        """The categories a column holds; () when it is not personal.

        >>> cat = parse_catalog(EXAMPLE)
        >>> cat.categories_of(Column("crm", "members", "email"))
        ('contact.email',)
        >>> cat.categories_of(Column("crm", "members", "added_later"))  # table default
        ('contact',)
        >>> cat.categories_of(Column("billing", "anything", "x"))  # schema default
        ('payment',)
        >>> cat.categories_of(Column("public", "t", "x"))
        ()
        """
        entry = self.tables.get(Table(column.schema, column.table))
        if entry is not None:
            listed = entry.columns.get(column.name)
            if listed is not None:
                return listed
            if entry.personal_by_default:
                return (entry.personal_by_default,)
        default = self.schema_defaults.get(column.schema)
        return (default,) if default else ()

    def holds_personal(self, table: Table) -> bool:
        """Whether the catalog makes any column of ``table`` personal (its entry, or its schema's default).

        >>> cat = parse_catalog(EXAMPLE)
        >>> cat.holds_personal(Table("crm", "members")), cat.holds_personal(Table("public", "t"))
        (True, False)
        """
        entry = self.tables.get(table)
        if entry is not None and (entry.personal_by_default or any(entry.columns.values())):
            return True
        return bool(self.schema_defaults.get(table.schema))

    def subject_of(self, table: Table) -> Column | None:
        """The data-subject id column of a table, if the catalog names one.

        >>> parse_catalog(EXAMPLE).subject_of(Table("crm", "members"))
        Column(schema='crm', table='members', name='member_id')
        """
        entry = self.tables.get(table)
        return Column(table.schema, table.name, entry.subject) if entry and entry.subject else None

    def subjects_of(self, tables: Iterable[Table]) -> tuple[str, ...]:
        """The data-subject column names the catalog gives ``tables``, each once, in their order.

        Given a table and its ancestors (a partition's or inheritance child's rows are its
        parents' rows, named by the same columns), the subject columns its rows answer to: its
        own and those its ancestors' entries name.

        >>> parse_catalog(EXAMPLE).subjects_of([Table("reporting", "members_p0"), Table("crm", "members")])
        ('member_id',)
        """
        out: list[str] = []
        for table in tables:
            entry = self.tables.get(table)
            if entry is not None and entry.subject and entry.subject not in out:
                out.append(entry.subject)
        return tuple(out)

    def children(self, category: str) -> tuple[str, ...]:
        """The category and all its descendants, sorted.

        >>> parse_catalog(EXAMPLE).children("contact")
        ('contact', 'contact.email')
        """
        return tuple(sorted(c for c in self.categories if c == category or c.startswith(category + ".")))


EXAMPLE = """
categories:
  contact: {description: Contact details}
  contact.email: {description: E-mail address}
  payment: {description: Payment data}
schemas:
  billing: {personal_by_default: payment}
tables:
  crm.members:
    subject: member_id
    personal_by_default: contact
    columns:
      member_id: []
      email: [contact.email]
functions:
  crm.mask_email: {reads: [crm.members.email]}
consent:
  table: privacy.consents
  subject: member_id
  purpose: purpose
  status: status
  withdrawn: [withdrawn]
  granted: [granted]
"""


def split_qualified(name: object, parts: int) -> tuple[str, ...] | None:
    """Split ``schema.table`` (parts=2) or ``schema.table.column`` (parts=3); None if malformed.

    >>> split_qualified("crm.members", 2), split_qualified("crm.members.email", 3), split_qualified("crm", 2)
    (('crm', 'members'), ('crm', 'members', 'email'), None)
    """
    if not isinstance(name, str):
        return None
    pieces = tuple(name.split("."))
    if len(pieces) != parts or any(not p or p != p.strip() for p in pieces):
        return None
    return pieces


def _mapping(node: Any, what: str, line: int | None, c: Collector) -> YamlMap:
    if node is None:
        return YamlMap()
    if not isinstance(node, YamlMap):
        c.error(line_of(node, default=line), f"{what} must be a mapping")
        return YamlMap()
    return node


def _check_keys(node: YamlMap, allowed: tuple[str, ...], what: str, c: Collector) -> None:
    for key in node:
        if key not in allowed:
            c.error(node.line_of(key), f"unknown key {key!r} in {what} (expected one of: {', '.join(allowed)})")


def _category_ref(value: Any, categories: Mapping[str, Any], line: int | None, what: str, c: Collector) -> str | None:
    if not isinstance(value, str):
        c.error(line, f"{what}: expected a category name, got {value!r}")
        return None
    if value not in categories:
        c.error(line, f"{what}: unknown category {value!r}")
        return None
    return value


def _parse_categories(node: YamlMap, c: Collector) -> dict[str, Category]:
    out: dict[str, Category] = {}
    for name, body in node.items():
        line = node.line_of(name)
        if not v.is_dotted_name(name):
            c.error(line, f"category name {name!r} must be lower-case words joined by dots (e.g. contact.email)")
            continue
        if v.depth(name) > v.MAX_DEPTH:
            c.error(line, f"category {name!r} is nested deeper than {v.MAX_DEPTH} levels")
            continue
        body = _mapping(body, f"category {name!r}", line, c)
        _check_keys(body, ("description",), f"category {name!r}", c)
        description = body.get("description")
        if not isinstance(description, str) or not description.strip():
            c.error(line, f"category {name!r} needs a description")
            description = ""
        out[name] = Category(name, description, line)
    for name, cat in out.items():
        p = v.parent(name)
        if p is not None and p not in out:
            c.error(cat.line, f"category {name!r}: its parent category {p!r} is not defined")
    return out


def _parse_tables(node: YamlMap, categories: Mapping[str, Category], c: Collector) -> dict[Table, TableEntry]:
    out: dict[Table, TableEntry] = {}
    for key, body in node.items():
        line = node.line_of(key)
        parts = split_qualified(key, 2)
        if parts is None:
            c.error(line, f"table {key!r} must be written schema.table")
            continue
        table = Table(*parts)
        body = _mapping(body, f"table {key}", line, c)
        _check_keys(body, ("subject", "personal_by_default", "columns"), f"table {key}", c)
        subject = body.get("subject")
        if subject is not None and (not isinstance(subject, str) or not subject):
            c.error(body.line_of("subject"), f"table {key}: subject must be a column name")
            subject = None
        default = body.get("personal_by_default")
        if default is not None:
            default = _category_ref(default, categories, body.line_of("personal_by_default"),
                                    f"table {key}: personal_by_default", c)
        columns: dict[str, tuple[str, ...]] = {}
        column_lines: dict[str, int] = {}
        cols = _mapping(body.get("columns"), f"table {key}: columns", body.line_of("columns"), c)
        for col, cats in cols.items():
            cline = cols.line_of(col)
            if not isinstance(col, str) or not col or "." in col:
                c.error(cline, f"table {key}: column name {col!r} must be a plain name")
                continue
            if isinstance(cats, str):
                cats = [cats]
            if cats is None:
                # "account_number:" with nothing after it reads as null: a deletion left half done
                # looks the same as a column meant to hold nothing personal, so only [] says that.
                c.error(cline, f"table {key}: column {col} has no value: list its categories, or write [] for a "
                               f"column that holds nothing personal")
                continue
            if not isinstance(cats, list):
                c.error(cline, f"table {key}: column {col}: expected a list of categories")
                continue
            refs = []
            for i, cat in enumerate(cats):
                ref = _category_ref(cat, categories, cats.line_of(i) if isinstance(cats, YamlList) else cline,
                                    f"table {key}: column {col}", c)
                if ref is not None and ref not in refs:
                    refs.append(ref)
            columns[col] = tuple(refs)
            column_lines[col] = cline
        out[table] = TableEntry(table, columns, subject, default, line, column_lines)
    return out


def _parse_schemas(node: YamlMap, categories: Mapping[str, Category], c: Collector) -> tuple[dict, dict]:
    defaults: dict[str, str] = {}
    lines: dict[str, int] = {}
    for name, body in node.items():
        line = node.line_of(name)
        if not isinstance(name, str) or not name or "." in name:
            c.error(line, f"schema name {name!r} must be a plain name")
            continue
        body = _mapping(body, f"schema {name}", line, c)
        _check_keys(body, ("personal_by_default",), f"schema {name}", c)
        default = body.get("personal_by_default")
        if default is None:
            c.error(line, f"schema {name}: personal_by_default is required in the schemas section")
            continue
        ref = _category_ref(default, categories, body.line_of("personal_by_default"),
                            f"schema {name}: personal_by_default", c)
        if ref is not None:
            defaults[name] = ref
            lines[name] = line
    return defaults, lines


def _column_list(node: Any, what: str, line: int | None, c: Collector) -> tuple[Column, ...]:
    if node is None:
        return ()
    if not isinstance(node, list):
        c.error(line, f"{what}: expected a list of schema.table.column")
        return ()
    out = []
    for i, item in enumerate(node):
        parts = split_qualified(item, 3)
        if parts is None:
            c.error(node.line_of(i) if isinstance(node, YamlList) else line,
                    f"{what}: {item!r} must be written schema.table.column")
            continue
        out.append(Column(*parts))
    return tuple(out)


def _parse_functions(node: YamlMap, c: Collector) -> dict[str, FunctionEntry]:
    out: dict[str, FunctionEntry] = {}
    for name, body in node.items():
        line = node.line_of(name)
        if split_qualified(name, 2) is None:
            c.error(line, f"function {name!r} must be written schema.function")
            continue
        body = _mapping(body, f"function {name}", line, c)
        _check_keys(body, ("reads", "writes"), f"function {name}", c)
        if "reads" not in body:
            c.error(line, f"function {name}: 'reads' is required (use [] for a function that reads no table)")
        reads = _column_list(body.get("reads"), f"function {name}: reads", body.line_of("reads"), c)
        writes = _column_list(body.get("writes"), f"function {name}: writes", body.line_of("writes"), c)
        out[name.lower()] = FunctionEntry(name.lower(), reads, writes, line)
    return out


def _parse_consent(node: Any, line: int | None, c: Collector) -> ConsentSource | None:
    """The consent section: a table and the names of its columns; every problem is reported."""
    if node is None:
        return None
    body = _mapping(node, "consent", line, c)
    _check_keys(body, CONSENT_KEYS, "consent", c)
    ok = True
    table = split_qualified(body.get("table"), 2)
    if table is None:
        c.error(body.line_of("table") or line, "consent: table must be written schema.table")
        ok = False
    names, named = _column_names(body, ("subject", "purpose", "status"), ("recorded_at",), line,
                                 "consent: {key} must be a column name of the consent table", c)
    ok = ok and named
    values: dict[str, tuple] = {}
    for key in ("withdrawn", "granted"):
        raw = body.get(key)
        if raw is None and key == "granted":
            values[key] = ()
            continue
        found = _status_values(raw)
        if found is None:
            c.error(body.line_of(key) or line, f"consent: {key} must be a list of status values (text, "
                                                f"true/false or numbers)")
            ok = False
            continue
        values[key] = found
    barrier = body.get("barrier", True)
    if not isinstance(barrier, bool):
        c.error(body.line_of("barrier") or line, "consent: barrier must be true or false")
        ok = False
    further = _parse_further(body.get("further_sources"), body.line_of("further_sources") or line, c)
    if not ok or further is None:
        return None
    if any(f.table == Table(*table) for f in further):
        c.error(body.line_of("further_sources") or line, f"consent: further_sources: {'.'.join(table)} is the "
                                                          f"consent table itself")
        return None
    return ConsentSource(Table(*table), names["subject"], names["purpose"], names["status"], values["withdrawn"],
                         values["granted"], names["recorded_at"], line, barrier, further)


def _column_names(body: YamlMap, required: tuple[str, ...], optional: tuple[str, ...], line: int | None,
                  problem: str, c: Collector) -> tuple[dict[str, str | None], bool]:
    """The column names a consent declaration gives under ``required`` and ``optional`` keys (None for an
    optional one left out), and whether each is a plain column name; ``problem`` (with ``{key}``) says
    what is wrong with one that is not."""
    names: dict[str, str | None] = {}
    ok = True
    for key in (*required, *optional):
        value = body.get(key)
        if value is None and key in optional:
            names[key] = None
            continue
        if not isinstance(value, str) or not value or "." in value:
            c.error(body.line_of(key) or line, problem.replace("{key}", key))
            ok = False
        names[key] = value
    return names, ok


def _status_values(raw: Any) -> tuple | None:
    """Status values as the catalog lists them (one value or a list of text, true/false or numbers); None if
    malformed.

    >>> _status_values("withdrawn"), _status_values([True, 2]), _status_values([]), _status_values([1.5])
    (('withdrawn',), (True, 2), None, None)
    """
    if isinstance(raw, (str, bool, int)):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(x, (str, bool, int)) for x in raw):
        return None
    return tuple(raw)


def _parse_further(node: Any, line: int | None, c: Collector) -> tuple[FurtherSource, ...] | None:
    """``consent: further_sources:``, a list of tables whose rows withdraw consent; None after a problem
    (reported: a declaration that cannot be read must not load as if it withdrew nothing)."""
    if node is None:
        return ()
    if not isinstance(node, list):
        c.error(line, "consent: further_sources must be a list of tables whose rows withdraw consent")
        return None
    out: list[FurtherSource] = []
    ok = True
    for i, item in enumerate(node):
        at = node.line_of(i) if isinstance(node, YamlList) else line
        if not isinstance(item, YamlMap):
            c.error(at, "consent: further_sources: each source is a mapping (table, subject, revoked, ...)")
            ok = False
            continue
        what = f"consent: further_sources: {item.get('table', '?')}"
        _check_keys(item, FURTHER_KEYS, what, c)
        ok = ok and all(k in FURTHER_KEYS for k in item)
        table = split_qualified(item.get("table"), 2)
        if table is None:
            c.error(item.line_of("table") or at, "consent: further_sources: table must be written schema.table")
            ok = False
        names, named = _column_names(item, ("subject",), ("revoked", "status", "scope", "recorded_at"), at,
                                     what + ": {key} must be a column name of the table", c)
        ok = ok and named
        withdrawn: tuple = ()
        if "withdrawn" in item or names["status"] is not None:
            found = _status_values(item.get("withdrawn"))
            if found is None or names["status"] is None:
                c.error(item.line_of("withdrawn") or item.line_of("status") or at,
                        f"{what}: status and withdrawn go together: the status column and the values (text, "
                        f"true/false or numbers) that mean the consent was withdrawn")
                ok = False
            withdrawn = found or ()
        if not any(names[k] for k in ("revoked", "status", "scope")):
            c.error(at, f"{what}: say when a row withdraws consent: revoked (a column, set when the consent is "
                        f"revoked), status with withdrawn, or scope (a column naming the purpose it covers)")
            ok = False
        if table is not None and any(f.table == Table(*table) for f in out):
            c.error(at, f"{what}: listed twice")
            ok = False
        if ok:
            out.append(FurtherSource(Table(*table), names["subject"], names["revoked"], names["status"], withdrawn,
                                     names["scope"], names["recorded_at"], at))
    return tuple(out) if ok else None


def _further_catalogued(consent: ConsentSource | None, tables: Mapping[Table, TableEntry], c: Collector) -> None:
    """Each further source must be a catalogued table naming every column the declaration uses (an unknown
    table or a misspelt column would otherwise surface only as every filtered statement failing)."""
    for source in consent.further if consent is not None else ():
        entry = tables.get(source.table)
        if entry is None:
            c.error(source.line, f"consent: further_sources: table {source.table} is not in the catalog's tables: "
                                 f"catalogue it (its decision columns need a category)")
            continue
        for key, column in source.columns().items():
            if column not in entry.columns:
                c.error(source.line, f"consent: further_sources: {source.table}: {key} column {column!r} is not a "
                                     f"column of the table in the catalog")


def parse_catalog(text: str, file: str = FILE) -> Catalog:
    """Parse catalog.yaml text; every problem found raises one ``PolicyError``.

    >>> parse_catalog("categories: {a: {description: A}}\\ntables: {crm.t: {columns: {x: [b]}}}\\n")
    Traceback (most recent call last):
    ...
    proxy.policy.problems.PolicyError: catalog.yaml:2: table crm.t: column x: unknown category 'b'
    """
    c = Collector(file)
    doc = load_yaml(text, file)
    doc = _mapping(doc, "catalog.yaml", 1, c)
    _check_keys(doc, TOP_KEYS, "the catalog", c)
    if "categories" not in doc:
        c.error(1, "the catalog needs a 'categories' section")
    categories = _parse_categories(_mapping(doc.get("categories"), "categories", doc.line_of("categories"), c), c)
    schemas, schema_lines = _parse_schemas(_mapping(doc.get("schemas"), "schemas", doc.line_of("schemas"), c),
                                           categories, c)
    tables = _parse_tables(_mapping(doc.get("tables"), "tables", doc.line_of("tables"), c), categories, c)
    functions = _parse_functions(_mapping(doc.get("functions"), "functions", doc.line_of("functions"), c), c)
    consent = _parse_consent(doc.get("consent"), doc.line_of("consent"), c)
    _further_catalogued(consent, tables, c)
    c.raise_if_any()
    return Catalog(categories, tables, schemas, functions, file, schema_lines, consent)
