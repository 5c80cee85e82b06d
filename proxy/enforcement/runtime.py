"""The policy and the live schemas in force, and their reloading, are kept here.

One ``PolicyRuntime`` serves every session. The policy is read from the policy
directory at start and again on SIGHUP or when a file changes; a new policy is
validated whole before it replaces the old one, so an invalid change leaves the
previous policy enforcing and sessions are never dropped. Each database's schema
is read through a connection the proxy opens itself (``schema_dsn``), on first
use, on an interval, after an unknown name, and after DDL passed through it: from
the moment DDL is committed until a load that began after it has ended, the
database's schema is ``stale`` and sessions refuse statements that depend on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from proxy.analysis.schema import Schema, catalog_stamp, load_schema, parse_search_path
from proxy.config import Config
from proxy.enforcement.cache import DecisionCache
from proxy.policy.engine import Policy
from proxy.policy.narrowing import dropped_protections
from proxy.policy.problems import PolicyError, Problem
from proxy.tls import catalog_tls

log = logging.getLogger(__name__)

POLICY_FILES = ("catalog.yaml", "purposes.yaml", "model.conf", "policy.csv")
FAILED_LOAD_SECONDS = 5.0  # how long a database whose first load failed is answered with that failure
SETTLE_SECONDS = 0.2  # how long policy files must stand still before a change is read
# The loader's own limits: a session holding a lock on a view (pg_get_viewdef waits for it)
# must not hold a reload off for long; a failed load after DDL is tried again, 1 s, 2 s, ... 10 s later.
LOADER_SETTINGS = {"lock_timeout": "2s", "statement_timeout": "30s"}
RETRY_MIN, RETRY_MAX = 1.0, 10.0
READ_ATTEMPTS = 3  # reads of a policy whose files change while they are read, before giving up until the next change

# Which schemas each login role (not a superuser) may not use, by PostgreSQL's own check (role
# membership included).
_NO_USAGE_SQL = r"""
SELECT r.rolname AS role,
       coalesce(array_agg(n.nspname::text) FILTER (
                  WHERE NOT r.rolsuper AND NOT pg_catalog.has_schema_privilege(r.oid, n.oid, 'USAGE')),
                '{}') AS schemas
  FROM pg_catalog.pg_roles r CROSS JOIN pg_catalog.pg_namespace n
 WHERE n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname NOT LIKE 'pg\_toast%'
 GROUP BY r.rolname
"""

_ROLE_SETTINGS_SQL = """
SELECT coalesce(r.rolname, '') AS role, coalesce(d.datname, '') AS database, s.setconfig
  FROM pg_catalog.pg_db_role_setting s
  LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
  LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
"""


@dataclass(frozen=True)
class DatabaseState:
    """One database as the proxy knows it: its schema and its search_path defaults."""

    schema: Schema
    server_search_path: tuple[str, ...] = ("$user", "public")
    # (role or "", database or "") -> search_path set with ALTER ROLE/DATABASE ... SET
    search_path_settings: dict[tuple[str, str], str] = field(default_factory=dict)
    loaded_at: float = 0.0
    # The catalogs' stamp read just before the load (``catalog_stamp``); None: not watched.
    stamp: tuple[str, ...] | None = None
    # role -> schemas it has no USAGE on: PostgreSQL leaves them out of its search_path
    # (recomputeNamespacePath), so a name found there by the proxy is found further on by the server.
    # None: not read (a schema from a file); else every role is in it, superusers with nothing hidden.
    no_usage: dict[str, frozenset[str]] | None = None
    # (role or "", database or "") whose ALTER ROLE/DATABASE ... SET makes sessions run as another
    # role (role, session_authorization): refused at connect time, as the same settings in the
    # StartupMessage are.
    identity_settings: frozenset[tuple[str, str]] = frozenset()

    def usable_search_path(self, path: list[str], role: str) -> list[str]:
        """``path`` without the schemas ``role`` may not use, as PostgreSQL searches it.

        >>> state = DatabaseState(None, no_usage={"app": frozenset({"reporting", "app"})})
        >>> state.usable_search_path(["$user", "reporting", "member"], "app")
        ['member']
        >>> state.usable_search_path(["$user", "reporting", "member"], "renamed_or_new")  # unknown: nothing
        []
        """
        if self.no_usage is None:
            return path
        hidden = self.no_usage.get(role)
        if hidden is None:  # a role renamed or created since the load: search nothing until a reload
            return []
        if not hidden:
            return path
        return [s for s in path if (role if s == "$user" else s) not in hidden]

    def sets_identity(self, role: str, database: str) -> bool:
        """Whether a role or database setting makes a session of ``role`` run as another role."""
        return any(key in self.identity_settings for key in ((role, database), (role, ""), ("", database)))

    def default_search_path(self, role: str, database: str) -> list[str]:
        """The search_path a new session of ``role`` starts with, as PostgreSQL picks it.

        Role-and-database settings beat role settings, which beat database settings,
        which beat the server's (section "ALTER ROLE", notes on setting precedence).
        """
        for key in ((role, database), (role, ""), ("", database)):
            value = self.search_path_settings.get(key)
            if value is not None:
                return parse_search_path(value)
        return list(self.server_search_path)


def _session_facts(state: DatabaseState) -> tuple:
    """What a DatabaseState holds besides its schema that decisions depend on."""
    return (state.no_usage, state.search_path_settings, state.server_search_path, state.identity_settings)


async def load_database_state(dsn: str, database: str, connect_timeout: float, *, tls=None) -> DatabaseState:
    """The schema and session facts of ``database``, read in one snapshot; ``tls``: an SSLContext (else the DSN's
    own sslmode, or asyncpg's default)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, database=database, timeout=connect_timeout, ssl=tls,
                                 server_settings={**LOADER_SETTINGS, "application_name": "purpose-proxy schema load"})
    try:
        # One snapshot for the stamp and everything read with it. Read in turn, a change committed
        # during the load and undone before the watcher's next look (ALTER ROLE ... SET role, then
        # RESET: the row goes, and the stamp is what it was) left a state the stamp said was current:
        # the login stayed refused for good (CI, test_a_role_setting_that_changes_the_role_refuses_the_login).
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            stamp = await catalog_stamp(conn)
            schema = await load_schema(conn)
            server_path = await conn.fetchval("SELECT reset_val FROM pg_catalog.pg_settings WHERE name = 'search_path'")
            settings: dict[tuple[str, str], str] = {}
            identity: set[tuple[str, str]] = set()
            for row in await conn.fetch(_ROLE_SETTINGS_SQL):
                for item in row["setconfig"] or ():
                    name, _, value = item.partition("=")
                    if name.lower() == "search_path":
                        settings[(row["role"], row["database"])] = value
                    elif name.lower() in ("role", "session_authorization"):
                        identity.add((row["role"], row["database"]))
            no_usage = {row["role"]: frozenset(row["schemas"]) for row in await conn.fetch(_NO_USAGE_SQL)}
    finally:
        await conn.close()
    return DatabaseState(schema, tuple(parse_search_path(server_path)), settings, time.monotonic(), stamp, no_usage,
                         frozenset(identity))


class PolicyRuntime:
    """What every session decides against: the policy and one schema per database."""

    def __init__(self, config: Config,
                 loader: Callable[[str, str, float], "asyncio.Future[DatabaseState]"] | None = None) -> None:
        self.config = config
        self.directory = Path(config.policies)
        self._mtimes: tuple = ()
        loaded = self._read_policy()
        if isinstance(loaded, Exception):
            raise loaded  # PolicyError (or OSError) on an invalid or unreadable policy
        self.policy: Policy = loaded
        self._loader = loader or self._load_state
        self._databases: dict[str, DatabaseState] = {}
        self._loading: dict[str, asyncio.Task] = {}
        # DDL passed through the proxy may have changed a database (its relations, or the
        # search_path defaults of ALTER ROLE/DATABASE ... SET): each committed DDL moves the
        # database's generation, and a session opening on a database whose loaded state is
        # older waits for a fresh load.
        self._generation: dict[str, int] = {}
        self._loaded_generation: dict[str, int] = {}
        # Databases changed by DDL (committed through this proxy, or reported by a sibling worker)
        # whose schema has not been loaded since: decisions that depend on it are refused meanwhile.
        self.stale: set[str] = set()
        self._again: set[str] = set()  # changed while a load was running: load again when it ends
        # database -> (when, the error) of its last failed first load (see ``database_state``)
        self._failed: dict[str, tuple[float, Exception]] = {}
        # Told of DDL committed through this process (the workers' peering); each may return a future
        # that is done once the news has been taken (see ``schema_changed``).
        self.schema_observers: list[Callable[[str], "asyncio.Future | None"]] = []
        self._tasks: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload = time.time()
        self.listeners: list[Callable[[], None]] = []  # called after a policy or schema change
        self.changes = 0  # counts those changes (a new policy, a new schema version, DDL committed)
        # Decisions by statement text or shape, shared by every session (keys hold the
        # role, purpose, search_path and the policy and schema versions).
        self.cache = (DecisionCache(config.decision_cache_size, config.decision_cache_bytes)
                      if config.decision_cache_size > 0 else None)

    # --- policy -------------------------------------------------------------------------

    def _stat(self) -> tuple:
        out = []
        for name in POLICY_FILES:
            try:
                st = (self.directory / name).stat()
                out.append((name, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((name, None, None))
        return tuple(out)

    def reload_policy(self, why: str = "request") -> bool:
        """Load the policy again; keep the old one if the new one is invalid. True if swapped."""
        return self.install_policy(self._read_policy(), why)

    async def reload_policy_async(self, why: str = "request", *, watched: bool = False) -> bool:
        """``reload_policy`` with the loading (0.2-0.4 s of CPU for the seed policy) in a thread, so
        sessions keep being served meanwhile; the new policy is swapped in on the event loop, whole.
        Reloads run one at a time, in the order they were asked for.

        ``watched`` (a change the file watcher saw): a policy that would protect less than the one in
        force is not put in force, but left to a deliberate reload (SIGHUP). A file caught half written
        often reads as such a policy: a catalog cut before ``schemas:`` catalogues nothing (hunt 20)."""
        async with self._reload_lock:
            loaded = await asyncio.to_thread(self._read_policy)
            if watched and not isinstance(loaded, Exception):
                dropped = dropped_protections(self.policy, loaded)
                if dropped:
                    loaded = PolicyError([Problem(
                        str(self.directory), None,
                        "the changed files would protect less than the policy in force, which a file caught half "
                        "written can look like, so the watcher leaves them to a deliberate reload (SIGHUP): "
                        "they drop " + "; ".join(dropped))])
            return self.install_policy(loaded, why)

    def request_reload(self, why: str) -> None:
        """Reload in the background (a SIGHUP handler cannot await)."""
        self._spawn(self.reload_policy_async(why), f"policy-reload-{why}")

    def _read_policy(self) -> "Policy | Exception":
        """The policy as its files stood at one moment: read again when a file changed while they were read
        (a ``git pull`` or a deploy writes them one after the other), so no mix of old and new files is
        ever put in force."""
        for _ in range(READ_ATTEMPTS):
            before = self._stat()
            try:
                loaded: Policy | Exception = Policy.load(self.directory)
            except (PolicyError, OSError) as exc:
                loaded = exc
            if self._stat() == before:
                self._mtimes = before  # what the watcher compares with from now on
                return loaded
            time.sleep(SETTLE_SECONDS)
        return PolicyError([Problem(str(self.directory), None,
                                    f"the policy files kept changing while they were read ({READ_ATTEMPTS} attempts)")])

    def install_policy(self, loaded: "Policy | Exception", why: str) -> bool:
        """Put a freshly read policy in force (on the event loop); an error leaves the old one. True if swapped."""
        if isinstance(loaded, Exception):
            self.reloads_failed += 1
            log.error("policy reload (%s) failed; the previous policy %s stays in force: %s",
                      why, self.policy.version, loaded)
            return False
        policy = loaded
        self.last_reload = time.time()
        self.reloads_ok += 1
        if policy.version == self.policy.version:
            return False
        old, self.policy = self.policy.version, policy
        log.info("policy reloaded (%s): version %s -> %s", why, old, policy.version)
        self._changed()
        return True

    def _changed(self) -> None:
        self.changes += 1  # sessions' epochs read it: decisions made before may not hold
        if self.cache is not None:
            self.cache.clear()  # nothing in it can be found again: free the memory
        for listener in self.listeners:
            listener()

    async def watch(self, interval: float) -> None:
        """Reload when a policy file changes (checked every ``interval`` seconds), once the files have
        stopped changing for ``SETTLE_SECONDS`` (bounded: a file rewritten without pause is read anyway,
        and then only if it stood still while it was read)."""
        while True:
            await asyncio.sleep(interval)
            seen = self._stat()
            if seen != self._mtimes:
                for _ in range(READ_ATTEMPTS * 4):
                    await asyncio.sleep(SETTLE_SECONDS)
                    now, seen = seen, self._stat()
                    if now == seen:
                        break
                await self.reload_policy_async("file change", watched=True)

    # --- schemas ------------------------------------------------------------------------

    def database(self, name: str) -> DatabaseState | None:
        return self._databases.get(name)

    def _fresh(self, name: str) -> bool:
        return self._loaded_generation.get(name, -1) >= self._generation.get(name, 0)

    async def database_state(self, name: str) -> DatabaseState:
        """The state of database ``name``, loading it the first time, and again when DDL
        passed through the proxy since it was loaded."""
        for _ in range(3):  # bounded: DDL arriving all the time must not starve a session
            state = self._databases.get(name)
            if state is not None and self._fresh(name):
                return state
            failed = self._failed.get(name)
            if state is None and failed is not None and time.monotonic() - failed[0] < FAILED_LOAD_SECONDS:
                # A database that could not be loaded a moment ago is not tried again for every session:
                # clients that had not authenticated made the proxy log in once per made-up name (hunt 23).
                raise failed[1].with_traceback(None)
            task = self._loading.get(name)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(name), name=f"schema-load-{name}")
                self._loading[name] = task
            try:
                await asyncio.shield(task)
            except Exception as exc:
                if state is None:
                    if len(self._failed) >= 1000:
                        self._failed.clear()  # bounded: made-up names are many
                    self._failed[name] = (time.monotonic(), exc)
                    raise
                log.warning("schema reload of database %s failed; using the previous schema", name)
                return state
            self._failed.pop(name, None)
        return self._databases[name]

    def _load_state(self, dsn: str, name: str, timeout: float):
        return load_database_state(dsn, name, timeout, tls=catalog_tls(self.config, dsn))

    async def _load(self, name: str) -> DatabaseState:
        generation = self._generation.get(name, 0)
        try:
            state = await asyncio.wait_for(
                self._loader(self.config.schema_dsn, name, self.config.connect_timeout),
                self.config.connect_timeout * 3)
            old = self._databases.get(name)
            self._databases[name] = state
            self._loaded_generation[name] = max(generation, self._loaded_generation.get(name, -1))
            if self._fresh(name) and name in self.stale:
                self.stale.discard(name)
                log.info("schema of database %s is current again after DDL", name)
            if old is not None and (old.schema.version != state.schema.version or _session_facts(old)
                                    != _session_facts(state)):
                self._changed()  # decisions made before (prepared statements too) must be made again
            relations = state.schema.relations  # a property of Schema (a method in older versions)
            log.info("schema of database %s loaded (%d relations, version %s)", name,
                     len(relations() if callable(relations) else relations), state.schema.version)
            return state
        finally:
            if self._loading.get(name) is asyncio.current_task():
                del self._loading[name]
            if name in self._again:
                self._again.discard(name)
                self._start_load(name, "DDL during the previous load")

    def _start_load(self, name: str, why: str, delay: float = 0.0, *, changed: bool = False) -> None:
        """A background load of ``name`` (registered, so that at most one runs); after DDL, one that
        fails is tried again with a growing delay for as long as the schema is stale. ``changed``: the
        catalogs are known to have changed, so a failed load makes the schema stale (a session holding
        a lock on a view keeps every load failing: the old schema must not stay in force meanwhile)."""
        log.info("refreshing schema of database %s (%s)", name, why)

        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            if name in self._loading:  # another load began meanwhile: it ends the staleness, or retries
                self._again.add(name)
                return
            task = asyncio.current_task()
            self._loading[name] = task
            try:
                await self._load(name)
            except Exception as exc:  # the old schema stays in use (and stays refused while stale)
                log.warning("schema refresh of database %s failed: %s: %s", name, exc.__class__.__name__, exc)
                if changed and name not in self.stale:
                    self.stale.add(name)
                    self._changed()
                if name in self.stale:
                    self._start_load(name, "retry after a failed load", min(max(delay * 2, RETRY_MIN), RETRY_MAX))

        self._spawn(run(), f"schema-refresh-{name}")

    def schema_changed(self, name: str, why: str, *, local: bool = True) -> "asyncio.Future | None":
        """DDL on ``name`` was committed: its schema is stale until a load that begins now ends.

        Every session's epoch moves (statements prepared earlier are decided again at their
        next Bind), decisions that depend on the schema are refused meanwhile (see
        ``PurposeSession``), and sibling workers are told (``local``: the DDL went through
        this process). Returns a future that is done once they all have been told (None: no one
        to tell): the DDL's client gets its answer only then.
        """
        self._generation[name] = self._generation.get(name, 0) + 1
        self.stale.add(name)
        self._changed()
        told = []
        if local:
            for observer in self.schema_observers:
                news = observer(name)
                if news is not None:
                    told.append(news)
        if name in self._loading:
            self._again.add(name)  # the running load may have read the catalog before the commit
        else:
            self._start_load(name, why)
        if not told:
            return None
        return told[0] if len(told) == 1 else asyncio.gather(*told, return_exceptions=True)

    def refresh_schema(self, name: str, why: str) -> None:
        """Reload a database's schema in the background (an unknown name, the interval): at most one
        load at a time, and not within a second of the last one (clients can ask for this at will)."""
        state = self._databases.get(name)
        if name in self._loading or (state is not None and time.monotonic() - state.loaded_at < 1.0):
            return
        self._start_load(name, why)

    async def refresh_all(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for name in list(self._databases):
                self.refresh_schema(name, "interval")

    # --- lifecycle ----------------------------------------------------------------------

    async def watch_catalogs(self, interval: float) -> None:
        """Notice DDL run directly in PostgreSQL: every ``interval`` seconds, read the catalog stamp of
        each loaded database (over one kept connection per database) and load the schema again when it
        differs from the stamp its schema was loaded with."""
        connections: dict[str, object] = {}
        failing: set[str] = set()
        try:
            while True:
                await asyncio.sleep(interval)
                for name in list(self._databases):
                    state = self._databases.get(name)
                    if state is None or state.stamp is None or name in self._loading:
                        continue
                    try:
                        conn = connections.get(name)
                        if conn is None:
                            conn = connections[name] = await self._watch_connection(name)
                        stamp = await asyncio.wait_for(catalog_stamp(conn), self.config.connect_timeout)
                    except Exception as exc:  # the next round connects again; the interval reload stays
                        old = connections.pop(name, None)
                        if old is not None:
                            old.terminate()
                        if name not in failing:
                            failing.add(name)
                            log.warning("cannot watch the catalogs of database %s: %s: %s", name,
                                        exc.__class__.__name__, exc)
                        continue
                    failing.discard(name)
                    if stamp != state.stamp and self._databases.get(name) is state and name not in self._loading:
                        self._start_load(name, "catalogs changed outside the proxy", changed=True)
        finally:
            for conn in connections.values():
                conn.terminate()

    async def _watch_connection(self, name: str):
        import asyncpg

        timeout = self.config.connect_timeout
        dsn = self.config.schema_dsn
        return await asyncio.wait_for(asyncpg.connect(
            dsn, database=name, timeout=timeout, ssl=catalog_tls(self.config, dsn),
            server_settings={**LOADER_SETTINGS, "application_name": "purpose-proxy catalog watch"}), timeout * 2)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self) -> None:
        if self.config.policy_watch_interval > 0:
            self._spawn(self.watch(self.config.policy_watch_interval), "policy-watch")
        if self.config.schema_refresh_interval > 0:
            self._spawn(self.refresh_all(self.config.schema_refresh_interval), "schema-refresh")
        if self.config.catalog_watch_interval > 0:
            self._spawn(self.watch_catalogs(self.config.catalog_watch_interval), "catalog-watch")

    async def close(self) -> None:
        tasks = list(self._tasks) + list(self._loading.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
