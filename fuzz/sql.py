"""The coverage-guided (atheris) fuzzer of the SQL path (analysis, purpose decisions, rewrite, decision cache), run as
``python fuzz/sql.py -runs=1000000``.

Each input is read with a FuzzedDataProvider into a statement (from the grammar of
tests/support/sqlfuzz.py, a mutated corpus statement, or raw text, undecodable
bytes included), a session of the seed policy (policies/) on the sample schema,
and a way in (Query or Parse); every few inputs a sequence of statements in one
session or a conversation through the Relay instead. The checks are those of
tests/unit/test_fuzz_sql.py: decided or refused, never an exception, never a
refusal that says the analysis crashed, the decision onto the wire without error,
and the decision cache (kept across inputs, as in the proxy) deciding as a fresh
analysis does. Instrumented for coverage: the ``proxy`` package (sqlglot too with
``--instrument-sqlglot``, slower).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_include = ["proxy", "sqlglot"] if "--instrument-sqlglot" in sys.argv else ["proxy"]
if "--instrument-sqlglot" in sys.argv:
    sys.argv.remove("--instrument-sqlglot")

with atheris.instrument_imports(include=_include):
    import sqlglot  # noqa: F401 - imported here to be instrumented when asked
    from proxy.enforcement.cache import DecisionCache
    from tests.support import fuzzing as fz
    from tests.support import sqlfuzz as sf

logging.disable(logging.CRITICAL)

FS = sf.FuzzSessions.load()
RUNTIME = FS.runtime
CACHED = sf.StaticRuntime(RUNTIME.policy, RUNTIME.state.schema, DecisionCache(4096))
CORPUS = sf.load_corpus()


def _choices(fdp: atheris.FuzzedDataProvider, most: int = 160) -> list[int]:
    return fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, most), 0, 1 << 16)


def _statement(fdp: atheris.FuzzedDataProvider) -> str:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind <= 1:
        return sf.statement(sf.Chooser(_choices(fdp)))
    if kind == 2:
        base = CORPUS[fdp.ConsumeIntInRange(0, len(CORPUS) - 1)]
        other = CORPUS[fdp.ConsumeIntInRange(0, len(CORPUS) - 1)]
        ops = [(fdp.ConsumeIntInRange(0, 8), fdp.ConsumeIntInRange(0, 4095), fdp.ConsumeIntInRange(0, 4095))
               for _ in range(fdp.ConsumeIntInRange(1, 6))]
        return sf.mutate_sql(base, other, ops)
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400)).decode("utf-8", "surrogateescape")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    fdp = atheris.FuzzedDataProvider(data)
    spec = sf.SESSIONS[fdp.ConsumeIntInRange(0, len(sf.SESSIONS) - 1)]
    mode = fdp.ConsumeIntInRange(0, 9)
    if mode <= 6:
        via = "parse" if fdp.ConsumeBool() else "query"
        sf.check_statement(RUNTIME, spec, _statement(fdp), via, CACHED)
    elif mode <= 8:
        session = sf.new_session(RUNTIME, *spec)
        for _ in range(fdp.ConsumeIntInRange(1, 5)):
            sf.check_decision(session, _statement(fdp), "parse" if fdp.ConsumeBool() else "query")
            session.ready(fdp.ConsumeBool())  # the server confirmed (or refused) what ran
    else:
        steps = []
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            sql = _statement(fdp).replace("\x00", "")
            steps.append(fz.parse("", sql) + fz.bind() + fz.execute() + fz.SYNC if fdp.ConsumeBool()
                         else fz.query(sql))
        run, decider = fz.converse(steps, fz.cut_at([fdp.ConsumeIntInRange(0, 4096)]),
                                   decider_factory=lambda: sf.Recorded(sf.new_session(RUNTIME, *spec)))
        fz.check_run(run, decider, conversation=True)
        assert "raised" not in [c[2] for c in decider.calls]


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
