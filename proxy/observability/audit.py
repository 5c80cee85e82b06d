"""The audit log: hash-chained JSON lines, their batched writing, rotation, verification and queries.

Every record is one ASCII line, a JSON object that begins with ``v`` (the format,
2), ``seq`` (0, 1, 2... across files and restarts), ``time`` (UTC) and ``type``,
continues with the record's fields and ends with ``prev`` (the previous record's
hash; 64 zeros for the first) and ``hash``: the SHA-256 of the line's own bytes
with the ``,"hash":"..."`` member cut out. Changing a byte of a record breaks its
hash; removing a record breaks the next record's ``prev`` and ``seq``. Rotation
(by size or age) renames the active file to ``<path>.<UTC time>`` and carries the
chain on into the new file; a restart resumes the chain from the last record
written. Records of format 1 (before 0.2: the hash of the record's canonical JSON,
keys sorted) still verify, so a chain can span the upgrade.

Delivery: ``submit`` (from the event loop, or any thread) builds, chains and queues
the line at once, under one lock; the ``audit-writer`` thread only writes and
flushes the queued lines in batches, so the event loop never waits on a disk nor
hands the interpreter lock to the writer per record. When the queue is full,
``block`` waits up to a bound and ``fail`` raises the ``refusing`` signal that the
session's decider gate acts on (new statements are refused, and counted in one
summary record); a record that was already produced is never dropped. ``close``
drains everything and fsyncs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from proxy import __version__

log = logging.getLogger(__name__)

GENESIS = "0" * 64
FORMAT_VERSION = 2
_LINGER = 0.02  # seconds the writer lets lines gather after a write: tens of wake-ups a second, not one per record
_HASH_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"\}\n$')


def members(fields: dict) -> str:
    """The JSON members of ``fields`` (an object's text without its braces), as a record line carries them.

    >>> members({"type": "x", "name": "é", "n": None})
    '"type":"x","name":"\\\\u00e9","n":null'
    """
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True)[1:-1]


def chain_line(seq: int, wall: float, fields: str, prev: str) -> tuple[str, str]:
    """The line of record ``seq`` whose fields are the JSON members ``fields``, and its hash.

    >>> line, digest = chain_line(0, 1735787045.5, '"type":"x"', GENESIS)
    >>> line.startswith('{"v":2,"seq":0,"time":"2025-01-02T03:04:05.500000Z","type":"x","prev":"000')
    True
    >>> line_hash(line.encode()) == digest
    True
    """
    head = f'{{"v":{FORMAT_VERSION},"seq":{seq},"time":"{iso_time(wall)}",{fields},"prev":"{prev}"'
    digest = hashlib.sha256(f"{head}}}".encode("ascii")).hexdigest()
    return f'{head},"hash":"{digest}"}}\n', digest


def line_hash(raw: bytes) -> str | None:
    """The hash a format-2 line should carry: SHA-256 of the line without its ``hash`` member (None: no such member)."""
    m = _HASH_TAIL.search(raw)
    if m is None:
        return None
    return hashlib.sha256(raw[: m.start()] + b"}").hexdigest()


def canonical(record: dict) -> str:
    """The canonical JSON text of a format-1 record (what was hashed and written).

    >>> canonical({"b": 1, "a": "é"})
    '{"a":"\\\\u00e9","b":1}'
    """
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def record_hash(record: dict) -> str:
    """Format 1: SHA-256 (hex) of the canonical JSON of ``record`` without its ``hash`` field (``prev`` included)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode("ascii")).hexdigest()


def record_line(body: dict) -> tuple[str, str]:
    """Format 1: the line of a record (without ``hash``) and its hash: canonical JSON with ``"hash"`` appended last."""
    text = canonical(body)
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()
    return f'{text[:-1]},"hash":"{digest}"}}\n', digest


_second: tuple = (None, "")  # the last whole second formatted (records come in bursts); one reference, so
# a thread reading it while another replaces it sees either pair whole


def iso_time(t: float) -> str:
    """Unix time as ISO 8601 UTC with microseconds: ``2025-01-02T03:04:05.678901Z``.

    >>> iso_time(1735787045.678901)
    '2025-01-02T03:04:05.678901Z'
    """
    whole = int(t)
    micros = round((t - whole) * 1e6)
    if micros >= 1000000:
        whole, micros = whole + 1, micros - 1000000
    global _second
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{micros:06d}Z"


# --- sinks ---------------------------------------------------------------------------------


class FileSink:
    """The active audit file, its rotation, and where the chain left off."""

    def __init__(self, path: str | os.PathLike, rotate_bytes: int = 0, rotate_seconds: float = 0) -> None:
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.file: TextIO | None = None
        self.size = 0
        self.opened_at = 0.0

    def open(self) -> tuple[int, str]:
        """Open (append) the active file; return (next seq, previous hash) to continue the chain."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resume = (0, GENESIS)
        for candidate in [self.path] + sorted(rotated_files(self.path), reverse=True):
            found = _last_record(candidate)
            if found is not None:
                resume = (found["seq"] + 1, found["hash"])
                break
        self.file = open(self.path, "a", encoding="ascii", newline="\n")
        self.size = self.file.tell()
        if self.size and not _ends_with_newline(self.path):
            self.file.write("\n")  # a line cut off by a crash stays visible as one broken record
            self.size += 1
        self.opened_at = time.time()
        return resume

    def write(self, lines: list[str]) -> None:
        text = "".join(lines)
        self.file.write(text)
        self.size += len(text)

    def flush(self) -> None:
        self.file.flush()

    def due(self, now: float) -> bool:
        """Whether the active file should be rotated before the next write."""
        if not self.size:
            return False
        return bool((self.rotate_bytes and self.size >= self.rotate_bytes)
                    or (self.rotate_seconds and now - self.opened_at >= self.rotate_seconds))

    def rotate(self, now: float) -> Path:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
            n += 1
        os.replace(self.path, target)
        self.file = open(self.path, "a", encoding="ascii", newline="\n")
        self.size = 0
        self.opened_at = now
        return target

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


class StreamSink:
    """Audit lines to a stream (standard output): no rotation, the chain starts at process start."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def open(self) -> tuple[int, str]:
        return 0, GENESIS

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))

    def flush(self) -> None:
        self.stream.flush()

    def due(self, now: float) -> bool:
        return False

    def rotate(self, now: float) -> None:  # pragma: no cover - never due
        return None

    def close(self) -> None:
        self.stream.flush()


def rotated_files(path: str | os.PathLike) -> list[Path]:
    """The rotated siblings of an active audit file (``<name>.<UTC time>``), oldest first."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.\d{8}T\d{6}\.\d{6}Z(-\d+)?$")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.match(p.name))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _last_record(path: Path) -> dict | None:
    """The last parseable record of a file (read from the end), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            chunk = 1 << 16
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                data = f.read(size - start)
                lines = data.split(b"\n")
                if start > 0:
                    lines = lines[1:]  # the first may be cut
                for line in reversed(lines):
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("seq"), int) and isinstance(rec.get("hash"), str):
                        return rec
                if start == 0:
                    return None
                chunk *= 4
    except OSError:
        return None


# --- the writer ----------------------------------------------------------------------------


Builder = Callable[..., dict]


class AuditLog:
    """The chain (built under one lock by whoever submits) and the named thread that writes its lines in batches."""

    def __init__(self, sink, *, queue_size: int = 10000, when_full: str = "block",
                 block_timeout: float = 1.0, linger: float = _LINGER) -> None:
        self.sink = sink
        self.queue_size = queue_size
        self.when_full = when_full
        self.block_timeout = block_timeout
        self.linger = linger
        self._lines: list[str] = []  # chained, not yet handed to the writer
        self._lock = threading.Lock()  # the chain and the queue (taken directly on the hot path: cheaper)
        self._cv = threading.Condition(self._lock)
        self._writer_idle = False  # waiting for lines: the next one wakes it
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.refusing = False  # the signal sessions act on in "fail" mode
        self.written = 0
        self.full_events = 0
        self.refused = 0  # statements refused while refusing (summarised in one record)
        self._refused_since: float | None = None
        self._refused_reported = 0
        self.write_errors = 0
        self.seq = 0
        self.prev = GENESIS

    @property
    def pending(self) -> int:
        return len(self._lines)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.seq, self.prev = self.sink.open()
        self.submit(time.time(), _open_record, (self.seq > 0,))
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> bool:
        """Write everything queued, fsync and close; True when all of it was written in time."""
        if self._thread is None:
            return True
        self.submit(time.time(), _close_record, ())
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer did not finish within %.1fs; %d records not written", timeout, len(self._lines))
            return False
        return True

    # --- the submitting side (the event loop) ------------------------------------------------

    def submit(self, wall: float, builder: Builder, args: tuple) -> None:
        """Chain and queue the record whose fields ``builder(*args)`` returns (``type`` first)."""
        try:
            fields = members(builder(*args))
        except Exception as exc:  # never lose the fact that something happened
            log.exception("audit record could not be built")
            fields = members({"type": "record_error", "error": exc.__class__.__name__,
                              "builder": getattr(builder, "__name__", "?")})
        self.append(wall, fields)

    def append(self, wall: float, fields: str) -> None:
        """Chain and queue a record whose fields are already JSON members (``"type":...`` first, ASCII)."""
        with self._lock:
            if len(self._lines) >= self.queue_size:
                self._full()
            line, self.prev = chain_line(self.seq, wall, fields, self.prev)
            self.seq += 1
            self._lines.append(line)
            if self._writer_idle:
                self._writer_idle = False
                self._cv.notify()

    def _full(self) -> None:
        """The queue is full (called holding the lock)."""
        self.full_events += 1
        self._writer_idle = False
        self._cv.notify_all()  # the writer may be letting lines gather
        if self.when_full == "fail":
            if not self.refusing:
                log.error("audit queue full (%d records): refusing new statements until the writer catches up",
                          self.queue_size)
            self.refusing = True
            return
        # block: wait for the writer, bounded; the record is kept either way
        if not self._cv.wait_for(lambda: len(self._lines) < self.queue_size, self.block_timeout):
            log.warning("audit queue still full after %.1fs; keeping the record in memory", self.block_timeout)

    def refused_statement(self) -> None:
        """Count a statement refused because the log could not keep up (one summary record covers them)."""
        with self._cv:
            if self._refused_since is None:
                self._refused_since = time.time()
            self.refused += 1

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        pending: list[str] = []
        while True:
            with self._cv:
                while not self._lines and not self._stopping and not pending:
                    self._writer_idle = True
                    self._cv.wait(1.0)
                self._writer_idle = False
                lines, self._lines = self._lines, []
                done = self._stopping
                drained = self.refusing
                self.refusing = False
                self._cv.notify_all()  # block-mode submitters waiting for room
            if drained:
                log.warning("audit queue drained: accepting statements again")
            pending += lines
            if pending:
                pending = self._write(pending)
            if self._refusal_summary():
                continue  # its line is queued: write it in this round's order
            if done and not pending and not self._lines:
                try:
                    self.sink.close()
                except OSError as exc:
                    log.error("audit log close failed: %s", exc)
                return
            if done and pending and self.write_errors > 50:  # the sink keeps failing at shutdown: give up
                log.error("audit writer stopping with %d unwritten records", len(pending))
                return
            if not done:
                with self._cv:  # let lines gather; a full queue or close() wakes the writer early
                    if not self._stopping and len(self._lines) < self.queue_size // 2:
                        self._cv.wait(self.linger)

    def _refusal_summary(self) -> bool:
        """Queue the summary of statements refused while the queue was full, once it drained."""
        with self._cv:
            if self.refusing or self._refused_since is None:
                return False
            count, since = self.refused - self._refused_reported, self._refused_since
            self._refused_reported = self.refused
            self._refused_since = None
        self.submit(time.time(), _refusals_record, (count, since))
        return True

    def _write(self, lines: list[str]) -> list[str]:
        """Write ``lines``; return those still unwritten (after a failure, retried a second later)."""
        try:
            now = time.time()
            if self.sink.due(now):
                target = self.sink.rotate(now)
                log.info("audit log rotated to %s", target)
            self.sink.write(lines)
            self.sink.flush()
            self.written += len(lines)
            return []
        except OSError as exc:
            self.write_errors += 1
            log.error("audit write failed (%s); retrying", exc.__class__.__name__)
            time.sleep(1.0)
            return lines


def _open_record(resumed: bool) -> dict:
    return {"type": "audit_open", "pid": os.getpid(), "proxy_version": __version__, "resumed": resumed}


def _close_record() -> dict:
    return {"type": "audit_close", "pid": os.getpid()}


def _refusals_record(count: int, since: float) -> dict:
    return {"type": "audit_backpressure", "refused_statements": count, "since": iso_time(since),
            "message": "statements refused because the audit log could not keep up (audit_when_full = fail)"}


# --- verification --------------------------------------------------------------------------


@dataclass
class VerifyResult:
    ok: bool
    records: int
    files: list[str]
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    broken_file: str | None = None
    broken_line: int | None = None
    problem: str | None = None

    def describe(self) -> str:
        if self.ok:
            start = "" if self.first_seq in (None, 0) else f" (starts at seq {self.first_seq}: earlier files not given)"
            return (f"ok: {self.records} records in {len(self.files)} file(s), chain intact{start}; "
                    f"last seq {self.last_seq}, last hash {self.last_hash}")
        return f"BROKEN: {self.broken_file}:{self.broken_line}: {self.problem} (after {self.records} good records)"


def chain_order(files: Iterable[str | os.PathLike]) -> list[Path]:
    """Files in chain order: by the ``seq`` of their first record (unreadable ones keep their place at the end)."""
    keyed = []
    for i, f in enumerate(files):
        first = None
        try:
            with open(f, "rb") as fh:
                first = json.loads(fh.readline()).get("seq")
        except (OSError, ValueError, AttributeError):
            pass
        keyed.append((0 if isinstance(first, int) else 1, first if isinstance(first, int) else i, i, Path(f)))
    return [p for *_, p in sorted(keyed, key=lambda k: k[:3])]


def _hash_problem(raw: bytes, rec: dict, stated) -> str | None:
    """Why a record's line does not match its ``hash`` (None: it matches), by the record's format."""
    if not isinstance(stated, str):
        return "hash mismatch: the record was changed"
    if rec.get("v") == 1:  # format 1: the line is the canonical JSON of the record
        if record_line(rec) == (raw.decode("ascii", "replace"), stated):
            return None
        if record_hash(rec) == stated:
            return "not in canonical form: the record was changed"
        return "hash mismatch: the record was changed"
    if rec.get("v") != FORMAT_VERSION or not raw.isascii() or line_hash(raw) != stated:
        return "hash mismatch: the record was changed"
    return None


def verify(files: Iterable[str | os.PathLike]) -> VerifyResult:
    """Check the chain across ``files`` (put in chain order); report the first broken record (file, line)."""
    ordered = chain_order(files)
    result = VerifyResult(True, 0, [str(p) for p in ordered])
    prev: str | None = None
    expected_seq: int | None = None

    def broken(path: Path, lineno: int, problem: str) -> VerifyResult:
        result.ok, result.broken_file, result.broken_line, result.problem = False, str(path), lineno, problem
        return result

    for path in ordered:
        try:
            fh = open(path, "rb")
        except OSError as exc:
            return broken(path, 0, f"cannot read: {exc}")
        with fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    rec = json.loads(raw)
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                except ValueError:
                    return broken(path, lineno, "not a JSON record (changed or cut off)")
                stated = rec.pop("hash", None)
                problem = _hash_problem(raw, rec, stated)
                if problem is not None:
                    return broken(path, lineno, problem)
                seq = rec.get("seq")
                if prev is None:
                    result.first_seq = seq
                    if seq == 0 and rec.get("prev") != GENESIS:
                        return broken(path, lineno, "first record does not start the chain")
                elif rec.get("prev") != prev:
                    return broken(path, lineno, "prev does not match the previous record's hash: "
                                                "a record before it was removed, added or changed")
                elif seq != expected_seq:
                    return broken(path, lineno, f"sequence number {seq}, expected {expected_seq}")
                prev, expected_seq = stated, (seq + 1 if isinstance(seq, int) else None)
                result.records += 1
                result.last_seq, result.last_hash = seq, stated
    return result


# --- queries -------------------------------------------------------------------------------


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_when(text: str, now: float | None = None) -> dt.datetime:
    """An ISO 8601 time (date only, or with time; UTC unless an offset is given) or ``30m``/``2h``/``7d`` ago.

    >>> parse_when("2025-01-02").isoformat(), parse_when("2025-01-02T03:04:05+09:00").isoformat()
    ('2025-01-02T00:00:00+00:00', '2025-01-01T18:04:05+00:00')
    """
    m = _RELATIVE.match(text.strip())
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return dt.datetime.fromtimestamp((now or time.time()) - seconds, dt.timezone.utc)
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _under(name: str | None, prefix: str) -> bool:
    return name is not None and (name == prefix or name.startswith(prefix + "."))


def query(files: Iterable[str | os.PathLike], *, category: str | None = None, purpose: str | None = None,
          since: dt.datetime | None = None, until: dt.datetime | None = None, types: Iterable[str] = (),
          verdict: str | None = None, session: str | None = None, role: str | None = None) -> Iterator[dict]:
    """Records of ``files`` (in chain order) that match every filter given.

    ``category`` and ``purpose`` match the name and everything under it
    (``contact`` matches ``contact.email``); times are compared with the record's
    ``time``; ``since`` is inclusive, ``until`` exclusive.
    """
    types = set(types)
    for path in chain_order(files):
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec: dict[str, Any] = json.loads(raw)
                except ValueError:
                    continue
                if types and rec.get("type") not in types:
                    continue
                if category is not None and not any(_under(c, category) for c in rec.get("categories") or ()):
                    continue
                if purpose is not None and not (_under(rec.get("purpose"), purpose)
                                                or _under(rec.get("to"), purpose)):
                    continue
                if verdict is not None and rec.get("verdict") != verdict:
                    continue
                if session is not None and rec.get("session") != session:
                    continue
                if role is not None and rec.get("role") != role:
                    continue
                if since is not None or until is not None:
                    try:
                        when = parse_when(rec["time"])
                    except (KeyError, ValueError):
                        continue
                    if (since is not None and when < since) or (until is not None and when >= until):
                        continue
                yield rec
