"""What the analysis knows about PostgreSQL functions: dangerous built-ins, statistical aggregates, call classes.

A function call is one of:

* ``SAFE_BUILTIN``: a pg_catalog/information_schema function that only computes on its arguments;
* ``DATA_READING_BUILTIN``: a built-in that reads data or the server by itself, executes SQL
  given as text or acts on the server (``query_to_xml``, ``pg_read_file``, ``lo_get``,
  ``dblink``, ``pg_terminate_backend``, ...): the analysis cannot vouch for the statement;
* ``USER_DEFINED``: a function outside pg_catalog/information_schema: reported in
  ``StatementAccess.functions`` and left to the policy (its body is not analysed);
* ``UNKNOWN``: not in the schema: the analysis cannot vouch for the statement.

``set_config`` is a safe built-in here, but the analysis reports it (and its settings).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from proxy.analysis.schema import AGGREGATE, PROCEDURE, WINDOW, Schema


class FunctionClass(enum.Enum):
    SAFE_BUILTIN = "safe-builtin"
    DATA_READING_BUILTIN = "data-reading-builtin"
    USER_DEFINED = "user-defined"
    UNKNOWN = "unknown"


# Built-ins that execute SQL given as text, read whole relations named by argument, read
# server files, large objects or other sessions' state, or act on the server.
DENYLIST: dict[str, str] = {}


def _deny(reason: str, names: str) -> None:
    for n in names.split():
        DENYLIST[n] = reason


_deny("executes SQL given as text", """
    query_to_xml query_to_xmlschema query_to_xml_and_xmlschema cursor_to_xml cursor_to_xmlschema ts_stat ts_rewrite
    crosstab crosstab2 crosstab3 crosstab4 connectby dblink dblink_exec dblink_open dblink_fetch
    dblink_send_query dblink_get_result dblink_build_sql_insert dblink_build_sql_update dblink_build_sql_delete
""")
_deny("reads whole relations named by its arguments", """
    table_to_xml table_to_xmlschema table_to_xml_and_xmlschema schema_to_xml schema_to_xmlschema
    schema_to_xml_and_xmlschema database_to_xml database_to_xmlschema database_to_xml_and_xmlschema
""")
_deny("reads or writes server files", """
    pg_read_file pg_read_binary_file pg_stat_file pg_ls_dir pg_file_write pg_file_rename pg_file_unlink
    pg_file_sync pg_logdir_ls pg_file_read pg_file_length
""")
_deny("reads or writes large objects, which the analysis does not see", """
    lo_import lo_export lo_get lo_put lo_open lo_close loread lowrite lo_lseek lo_lseek64 lo_tell lo_tell64
    lo_truncate lo_truncate64 lo_creat lo_create lo_unlink lo_from_bytea
""")
_deny("reads other sessions' queries or decoded WAL data", """
    pg_stat_get_activity pg_stat_get_backend_activity pg_logical_slot_get_changes
    pg_logical_slot_peek_changes pg_logical_slot_get_binary_changes pg_logical_slot_peek_binary_changes
    pg_stat_statements pg_stat_statements_info
""")
_deny("acts on the server or other sessions", """
    pg_terminate_backend pg_cancel_backend pg_reload_conf pg_rotate_logfile pg_promote pg_switch_wal
    pg_create_restore_point pg_backup_start pg_backup_stop pg_start_backup pg_stop_backup
    pg_wal_replay_pause pg_wal_replay_resume pg_log_backend_memory_contexts
    pg_create_physical_replication_slot pg_create_logical_replication_slot pg_drop_replication_slot
    pg_replication_slot_advance pg_copy_physical_replication_slot pg_copy_logical_replication_slot
    pg_logical_emit_message pg_stat_reset pg_stat_reset_shared pg_stat_reset_single_table_counters
    pg_stat_reset_single_function_counters pg_stat_reset_slru pg_stat_reset_replication_slot
    pg_stat_reset_subscription_stats pg_stat_statements_reset pg_import_system_collations
    pg_replication_origin_create pg_replication_origin_drop pg_replication_origin_session_setup
    pg_replication_origin_advance pg_replication_origin_xact_setup
""")
# Safe built-ins that store their arguments where other sessions, or later statements under
# another purpose, read them: values of columns passed to them count as copied there (the
# policy refuses personal ones), as if written into a column the catalog holds as not personal.
EXPORTING: dict[str, str] = {
    "pg_notify": "a notification payload (pg_notify), which every session listening on the channel receives",
    "set_config": "a setting (set_config), which later statements read under any purpose",
    "setval": "a sequence (setval), which other sessions read",
    **{name: f"an advisory lock key ({name}), which every session sees in pg_locks" for name in (
        "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared",
        "pg_try_advisory_lock", "pg_try_advisory_lock_shared", "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared")},
}

DENY_PREFIXES: dict[str, str] = {
    "dblink": "executes SQL on another server",
    "pg_ls_": "lists server directories",
    "pg_file_": "reads or writes server files",
    "lo_": "reads or writes large objects, which the analysis does not see",
}

# Aggregates whose result is a statistic of their input, not one of its values: columns used
# only inside them are AGGREGATE. Every other aggregate (min, max, array_agg, string_agg,
# json_agg, mode, percentile_disc, user-defined ones, ...) can return input values: PROJECT.
STATISTICAL_AGGREGATES = frozenset("""
    count sum avg stddev stddev_pop stddev_samp variance var_pop var_samp corr covar_pop covar_samp
    regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
""".split())
# Aggregates whose result is, or pins down, one input: percentile_cont(0) and (1) are min and
# max, and with an array of fractions return every input; the hypothetical-set rank family
# says on which side of a chosen value each input lies (a binary search finds any value);
# bit_and/bit_or and bool_and/bool_or/every keep bits one input alone may set.
VALUE_AGGREGATES = frozenset("""
    percentile_cont rank dense_rank percent_rank cume_dist bit_and bit_or bit_xor bool_and bool_or every
    min max array_agg string_agg json_agg jsonb_agg json_object_agg jsonb_object_agg json_agg_strict
    jsonb_agg_strict json_object_agg_strict jsonb_object_agg_strict json_object_agg_unique
    jsonb_object_agg_unique json_object_agg_unique_strict jsonb_object_agg_unique_strict json_arrayagg
    json_objectagg xmlagg mode percentile_disc range_agg range_intersect_agg any_value
""".split())
AGGREGATE_NAMES = STATISTICAL_AGGREGATES | VALUE_AGGREGATES
# Statistics that never equal an input's value: how many inputs there are (not NULL). Every other
# statistical aggregate over one row is that row's value (sum, avg) or pins it down beside one
# known row (stddev, corr, regr_*), so only these carry nothing of a value out of the catalog.
COUNTING_AGGREGATES = frozenset({"count", "regr_count"})
# Ordered-set / hypothetical-set aggregates: their WITHIN GROUP (ORDER BY x) is the aggregated input.
WINDOW_FUNCTIONS = frozenset("""
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
""".split())

# Functions assumed to exist in pg_catalog when the schema does not list pg_catalog's
# functions (a schema from a file or a test). A loaded schema lists them all.
ASSUMED_BUILTINS = frozenset("""
    abs acos age array_append array_cat array_length array_lower array_position array_positions array_prepend
    array_remove array_replace array_to_json array_to_string array_upper ascii asin atan atan2 avg
    bit_length btrim cardinality cbrt ceil ceiling char_length character_length chr clock_timestamp
    coalesce concat concat_ws convert_from convert_to cos cot count current_database current_date
    current_query current_schema current_schemas current_setting current_time current_timestamp
    current_user currval date_bin date_part date_trunc decode degrees digest div encode exp extract
    factorial floor format format_type gen_random_uuid generate_series generate_subscripts greatest
    has_table_privilege has_schema_privilege has_column_privilege initcap isfinite json_array_elements
    json_array_elements_text json_array_length json_build_array json_build_object json_each json_each_text
    json_extract_path json_extract_path_text json_object json_object_keys json_populate_record
    json_populate_recordset json_strip_nulls json_to_record json_to_recordset json_typeof jsonb_array_elements
    jsonb_array_elements_text jsonb_array_length jsonb_build_array jsonb_build_object jsonb_each
    jsonb_each_text jsonb_extract_path jsonb_extract_path_text jsonb_insert jsonb_object jsonb_object_keys
    jsonb_path_exists jsonb_path_match jsonb_path_query jsonb_path_query_array jsonb_path_query_first
    jsonb_populate_record jsonb_populate_recordset jsonb_pretty jsonb_set jsonb_strip_nulls
    jsonb_to_record jsonb_to_recordset jsonb_typeof justify_days justify_hours justify_interval lastval
    lcase least left length ln localtime localtimestamp log log10 lower lpad ltrim make_date
    make_interval make_time make_timestamp make_timestamptz md5 mod nextval now nullif num_nonnulls
    num_nulls octet_length overlay pg_advisory_lock pg_advisory_unlock pg_advisory_xact_lock
    pg_backend_pid pg_column_size pg_get_viewdef pg_notify pg_postmaster_start_time pg_relation_size
    pg_size_pretty pg_sleep pg_table_size pg_total_relation_size pg_try_advisory_lock
    pg_try_advisory_xact_lock pg_typeof pi position power quote_ident quote_literal quote_nullable
    radians random regexp_count regexp_instr regexp_like regexp_match regexp_matches regexp_replace
    regexp_split_to_array regexp_split_to_table repeat replace reverse right round row_to_json rpad
    rtrim set_config setseed setval sha224 sha256 sha384 sha512 sign sin split_part sqrt starts_with
    statement_timestamp string_to_array string_to_table strpos substr substring sum tan timeofday
    to_char to_date to_hex to_json to_jsonb to_number to_timestamp to_tsquery to_tsvector
    transaction_timestamp translate trim trunc txid_current unistr unnest upper uuid_generate_v4
    version width_bucket xmlelement xmlforest xmlconcat xpath xpath_exists
""".split()) | AGGREGATE_NAMES | WINDOW_FUNCTIONS

# Set-returning built-ins used in FROM and their output columns (when not a single column
# named after the function or its alias).
SRF_COLUMNS: dict[str, tuple[str, ...]] = {
    "json_each": ("key", "value"), "jsonb_each": ("key", "value"), "json_each_text": ("key", "value"),
    "jsonb_each_text": ("key", "value"), "pg_options_to_table": ("option_name", "option_value"),
}
SINGLE_COLUMN_SRFS = frozenset("""
    generate_series generate_subscripts unnest json_array_elements json_array_elements_text
    jsonb_array_elements jsonb_array_elements_text json_object_keys jsonb_object_keys regexp_matches
    regexp_split_to_table string_to_table jsonb_path_query
""".split())


# Volatile built-ins among ASSUMED_BUILTINS (a loaded schema has every function's
# volatility from pg_proc). PostgreSQL evaluates a volatile or set-returning output of a
# subquery even when nothing above uses it (allpaths.c, remove_unused_subquery_outputs).
ASSUMED_VOLATILE = frozenset("""
    clock_timestamp currval gen_random_uuid lastval nextval pg_advisory_lock pg_advisory_unlock
    pg_advisory_xact_lock pg_notify pg_sleep pg_try_advisory_lock pg_try_advisory_xact_lock random set_config
    setseed setval timeofday txid_current uuid_generate_v4
""".split())
SET_RETURNING = SINGLE_COLUMN_SRFS | frozenset(SRF_COLUMNS) | frozenset("""
    json_to_recordset jsonb_to_recordset json_populate_recordset jsonb_populate_recordset
""".split())


def evaluated_regardless(name: str, schema: Schema) -> bool:
    """Whether PostgreSQL computes a call of the pg_catalog function ``name`` in a subquery's output even when
    no one uses that output: it is volatile or returns a set (unknown functions count as volatile).

    >>> from proxy.analysis.schema import Schema
    >>> s = Schema.from_dict({"schemas": {}})
    >>> evaluated_regardless("random", s), evaluated_regardless("unnest", s), evaluated_regardless("lower", s)
    (True, True, False)
    """
    if name in SET_RETURNING:
        return True
    info = schema.function("pg_catalog", name)
    if info is not None:
        return info.volatility not in ("immutable", "stable")
    return name in ASSUMED_VOLATILE or name not in ASSUMED_BUILTINS


@dataclass(frozen=True, slots=True)
class Resolved:
    """A resolved call: its qualified name, its class and (for DATA_READING_BUILTIN) why."""

    schema: str | None
    name: str
    cls: FunctionClass
    reason: str = ""
    aggregate: bool = False
    window: bool = False
    procedure: bool = False
    # Further functions of the same name on the search path that PostgreSQL may call instead
    # (it picks among all of them by argument types): qualified names, user-defined ones only.
    others: tuple[str, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name

    @property
    def builtin_only(self) -> bool:
        """Whether only pg_catalog's function of the name can be the one called."""
        return self.schema == "pg_catalog" and not self.others


def denied(name: str) -> str | None:
    """Why the built-in ``name`` is denylisted, or None.

    >>> denied("query_to_xml"), denied("lower"), denied("dblink_connect")
    ('executes SQL given as text', None, 'executes SQL on another server')
    """
    if name in DENYLIST:
        return DENYLIST[name]
    for prefix, reason in DENY_PREFIXES.items():
        if name.startswith(prefix):
            return reason
    return None


def effective_search_path(search_path: tuple[str, ...] | list[str], role: str = "") -> list[str]:
    """The schemas searched, in order: pg_catalog first unless listed, "$user" replaced by the role.

    >>> effective_search_path(["$user", "public"], "alice")
    ['pg_catalog', 'alice', 'public']
    >>> effective_search_path(["crm", "pg_catalog"])
    ['crm', 'pg_catalog']
    """
    out: list[str] = []
    for s in search_path:
        if s == "$user":
            if role:
                out.append(role)
            continue
        if s == "pg_temp" or s.startswith("pg_temp_"):
            continue
        out.append(s)
    if "pg_catalog" not in out:
        out.insert(0, "pg_catalog")
    return out


def classify_function(name: str, schema_name: str | None, schema: Schema,
                      path: list[str]) -> Resolved:
    """Resolve and classify a call of ``[schema_name.]name`` (both already case-folded).

    ``path`` is the effective search path (see ``effective_search_path``).

    >>> from proxy.analysis.schema import Schema
    >>> s = Schema.from_dict({"schemas": {"crm": {"functions": {"score": {"language": "plpgsql"}}}}})
    >>> classify_function("lower", None, s, ["pg_catalog", "crm"]).cls.value
    'safe-builtin'
    >>> r = classify_function("score", None, s, ["pg_catalog", "crm"]); (r.qualified, r.cls.value)
    ('crm.score', 'user-defined')
    >>> classify_function("query_to_xml", "pg_catalog", s, ["pg_catalog"]).cls.value
    'data-reading-builtin'
    >>> classify_function("nosuch", None, s, ["pg_catalog", "crm"]).cls.value
    'unknown'

    PostgreSQL resolves an unqualified name among the functions of that name in every
    schema of the path, by argument types first (10.3, "Functions": the path order only
    breaks ties), which the analysis does not model. When the path holds a user-defined
    function of the name besides a built-in, the call is read as the user-defined one
    (``public.lower(bigint)`` beats ``pg_catalog.lower(text)`` for a bigint argument), and
    every other user-defined one is named in ``others``:

    >>> s = Schema.from_dict({"schemas": {"public": {"functions": {"lower": {"language": "sql"}}}}})
    >>> r = classify_function("lower", None, s, ["pg_catalog", "public"]); (r.qualified, r.cls.value)
    ('public.lower', 'user-defined')
    """
    if not schema_name:
        user = [sch for sch in path if sch not in ("pg_catalog", "information_schema")
                and schema.function(sch, name) is not None]
        if user:
            first = _classify_in(name, [user[0]], schema, None)
            return replace(first, others=tuple(f"{sch}.{name}" for sch in user[1:]))
    return _classify_in(name, [schema_name] if schema_name else path, schema, schema_name)


def _classify_in(name: str, candidates: list[str], schema: Schema, schema_name: str | None) -> Resolved:
    assume = not schema.knows_builtin_functions
    for sch in candidates:
        info = schema.function(sch, name)
        builtin = sch in ("pg_catalog", "information_schema")
        if info is None and sch == "pg_catalog" and assume and not _extension(name) and (
                name in ASSUMED_BUILTINS or denied(name)):
            return _builtin(name, assume_kinds=True)
        if info is None:
            continue
        if builtin:
            r = _builtin(name)
            return Resolved(r.schema if sch == "pg_catalog" else sch, name, r.cls, r.reason,
                            aggregate=AGGREGATE in info.kinds, window=WINDOW in info.kinds,
                            procedure=PROCEDURE in info.kinds)
        reason = denied(name) if _extension(name) else None
        return Resolved(sch, name, FunctionClass.DATA_READING_BUILTIN if reason else FunctionClass.USER_DEFINED,
                        reason or "", aggregate=AGGREGATE in info.kinds, window=WINDOW in info.kinds,
                        procedure=PROCEDURE in info.kinds)
    # Extension functions that are denylisted by name wherever they live.
    reason = denied(name)
    if reason and _extension(name):
        return Resolved(schema_name, name, FunctionClass.DATA_READING_BUILTIN, reason)
    return Resolved(schema_name, name, FunctionClass.UNKNOWN)


def _extension(name: str) -> bool:
    """Denylisted functions of extensions (dblink, tablefunc, pg_stat_statements), which live outside pg_catalog."""
    return name.startswith(("dblink", "crosstab", "connectby", "pg_stat_statements"))


def _builtin(name: str, assume_kinds: bool = False) -> Resolved:
    reason = denied(name)
    cls = FunctionClass.DATA_READING_BUILTIN if reason else FunctionClass.SAFE_BUILTIN
    return Resolved("pg_catalog", name, cls, reason or "",
                    aggregate=assume_kinds and name in AGGREGATE_NAMES,
                    window=assume_kinds and name in WINDOW_FUNCTIONS)


def is_statistical_aggregate(name: str) -> bool:
    """Whether an aggregate's result is a statistic rather than one of its input values.

    >>> is_statistical_aggregate("count"), is_statistical_aggregate("max")
    (True, False)
    """
    return name in STATISTICAL_AGGREGATES
