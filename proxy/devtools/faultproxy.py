"""A TCP forwarder with switchable faults (delay, blackhole, half-close, reset, stalled
reads, refused connections) between two peers, for fault-injection tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from typing import Callable

from proxy.devtools.cluster import free_port

UP = "up"
DOWN = "down"
BOTH = (UP, DOWN)
_CHUNK = 65536


def _directions(direction: str | tuple[str, ...]) -> tuple[str, ...]:
    out = (direction,) if isinstance(direction, str) else tuple(direction)
    for d in out:
        if d not in BOTH:
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {d!r}")
    return out


def _linger0(writer: asyncio.StreamWriter | None) -> None:
    """Make closing ``writer``'s socket send an RST instead of a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class Link:
    """One accepted connection and its connection to the target. Use its methods from any thread."""

    def __init__(self, proxy: "FaultProxy", index: int, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.index = index
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        defaults = proxy._defaults
        self.delay_seconds = dict(defaults["delay"])
        self.chunk = dict(defaults["chunk"])
        self.blackholed = defaults["blackhole"]
        self.flowing = {d: asyncio.Event() for d in BOTH}
        for d in BOTH:
            if d not in defaults["stalled"]:
                self.flowing[d].set()
        self.shut = {UP: False, DOWN: False}  # half-closed towards that direction's receiver
        self.ended = {UP: False, DOWN: False}  # that direction's sender sent EOF (or was dropped)
        self.forwarded = {UP: 0, DOWN: 0}  # bytes passed on
        self.writes = {UP: 0, DOWN: 0}  # pieces passed on (each one write)
        self.closed = False
        self.was_reset = False
        self.tasks: list[asyncio.Task] = []

    def __repr__(self) -> str:
        return f"<Link {self.index} closed={self.closed} forwarded={self.forwarded}>"

    # --- faults (thread-safe) ---------------------------------------------------------

    def delay(self, seconds: float, direction: str | tuple[str, ...] = BOTH, chunk: int | None = None) -> None:
        self.proxy._run(self._delay, seconds, _directions(direction), chunk)

    def blackhole(self) -> None:
        self.proxy._run(setattr, self, "blackholed", True)

    def half_close(self, direction: str) -> None:
        self.proxy._run(self._half_close, _directions(direction)[0])

    def reset(self) -> None:
        self.proxy._run(self._reset)

    def stall(self, direction: str | tuple[str, ...] = BOTH) -> None:
        self.proxy._run(self._flow, _directions(direction), False)

    def resume(self, direction: str | tuple[str, ...] = BOTH) -> None:
        self.proxy._run(self._flow, _directions(direction), True)

    # --- loop side ----------------------------------------------------------------------

    def _delay(self, seconds: float, directions: tuple[str, ...], chunk: int | None) -> None:
        for d in directions:
            self.delay_seconds[d] = seconds
            self.chunk[d] = chunk

    def _flow(self, directions: tuple[str, ...], on: bool) -> None:
        for d in directions:
            (self.flowing[d].set if on else self.flowing[d].clear)()

    def _receiver(self, direction: str) -> asyncio.StreamWriter | None:
        return self.target if direction == UP else self.client

    def _half_close(self, direction: str) -> None:
        if self.shut[direction] or self.closed:
            return
        self.shut[direction] = True
        writer = self._receiver(direction)
        if writer is not None and writer.can_write_eof() and not writer.is_closing():
            try:
                writer.write_eof()  # shutdown(SHUT_WR) once what is buffered is sent
            except (OSError, RuntimeError):
                pass
        self._maybe_close()

    def _reset(self) -> None:
        if self.closed:
            return
        self.was_reset = True
        for writer in (self.client, self.target):
            if writer is not None:
                _linger0(writer)
                writer.transport.abort()
        self._closed()

    def _close(self) -> None:
        if self.closed:
            return
        for writer in (self.client, self.target):
            if writer is not None and not writer.is_closing():
                writer.close()
        self._closed()

    def _closed(self) -> None:
        self.closed = True
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    def _maybe_close(self) -> None:
        if (self.ended[UP] or self.shut[UP]) and (self.ended[DOWN] or self.shut[DOWN]):
            self._close()  # nothing can flow either way any more

    async def _pump(self, direction: str, reader: asyncio.StreamReader) -> None:
        """Forward one direction, applying the link's faults as each chunk passes."""
        try:
            while True:
                await self.flowing[direction].wait()
                try:
                    data = await reader.read(_CHUNK)
                except (ConnectionError, OSError):
                    self._reset()  # the sender reset: so does the other side
                    return
                if not data:
                    self.ended[direction] = True
                    if self.blackholed:
                        self._close()
                        return
                    self._half_close(direction)
                    return
                chunk = self.chunk[direction] or len(data)
                for start in range(0, len(data), chunk):
                    seconds = self.delay_seconds[direction]
                    if seconds:
                        await asyncio.sleep(seconds)
                    writer = self._receiver(direction)
                    if self.blackholed or self.shut[direction] or self.closed or writer is None:
                        break  # dropped
                    writer.write(data[start : start + chunk])
                    try:
                        await writer.drain()
                    except (ConnectionError, OSError):
                        self._reset()
                        return
                    self.forwarded[direction] += min(chunk, len(data) - start)
                    self.writes[direction] += 1
        except asyncio.CancelledError:
            pass


class FaultProxy:
    """A TCP forwarder to ``target`` on ``host:port`` (a free port by default) with switchable faults.

    ``FaultProxy(target_host, target_port).start()`` listens on a free port of its
    own and forwards every accepted connection (a ``Link``) to the target, both ways,
    in an asyncio loop on a background thread; every method may be called from any
    thread. Put it between a client and purpose-proxy, or between purpose-proxy and
    PostgreSQL (``--upstream fp.address``).

    Directions: ``UP`` is from the accepted side to the target, ``DOWN`` from the
    target back. Faults on the ``FaultProxy`` apply to every open link and, where
    they are states rather than events (delay, stall), to links accepted later
    too; the same methods on one ``Link`` (``fp.link(i)``, in accept order) touch
    only that connection:

    - ``delay(seconds, direction=BOTH, chunk=None)``: wait before forwarding each
      chunk, optionally cut into pieces of at most ``chunk`` bytes.
    - ``blackhole()``: new connections are accepted and never connected to the
      target, so they are never answered; ``Link.blackhole()`` stops forwarding on
      an open link (what either side sends is read and dropped).
    - ``half_close(direction)``: ``shutdown(SHUT_WR)`` towards that direction's
      receiver, which reads EOF; what its sender sends later is dropped.
    - ``reset()`` / ``reset_all()``: drop connections abruptly, both sides getting
      an RST (``SO_LINGER`` 0).
    - ``stall(direction)``: stop reading from that direction's sender, so that its
      socket buffers fill and it blocks.
    - ``refuse()``: stop listening (new connections are refused); ``heal()`` listens
      again on the same port and clears every state fault.

    An EOF from one side is passed on as a half-close; a link closes when both
    directions have ended, and a reset or read error on one side resets the other.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, int(target_port))
        self.host = host
        self.port = port or free_port(host)
        self.links: list[Link] = []
        self._defaults: dict = {"delay": {UP: 0.0, DOWN: 0.0}, "chunk": {UP: None, DOWN: None},
                                "blackhole": False, "stalled": set()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @classmethod
    def to(cls, address: str, **kw) -> "FaultProxy":
        """A fault proxy to ``HOST:PORT``."""
        host, _, port = address.rpartition(":")
        return cls(host, int(port), **kw)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        self._run_async(self._listen())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._run_async(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = []
        for link in self.links:
            tasks += link.tasks
            link._close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # --- faults for every link (thread-safe) ------------------------------------------------

    def delay(self, seconds: float, direction: str | tuple[str, ...] = BOTH, chunk: int | None = None) -> None:
        """Delay (and optionally cut into ``chunk``-byte pieces) every chunk, on open and new links."""
        directions = _directions(direction)

        def apply() -> None:
            for d in directions:
                self._defaults["delay"][d] = seconds
                self._defaults["chunk"][d] = chunk
            for link in self.links:
                link._delay(seconds, directions, chunk)

        self._run(apply)

    def blackhole(self, on: bool = True) -> None:
        """Accept new connections and never answer them (open links go on; see ``Link.blackhole``)."""
        self._run(self._defaults.__setitem__, "blackhole", on)

    def half_close(self, direction: str) -> None:
        """``shutdown(SHUT_WR)`` towards ``direction``'s receiver on every open link."""
        d = _directions(direction)[0]
        self._run(lambda: [link._half_close(d) for link in self.links])

    def reset_all(self) -> None:
        """Drop every open link abruptly (RST both ways)."""
        self._run(lambda: [link._reset() for link in self.links])

    def stall(self, direction: str | tuple[str, ...] = BOTH) -> None:
        """Stop reading from ``direction``'s sender, on open and new links."""
        directions = _directions(direction)

        def apply() -> None:
            self._defaults["stalled"].update(directions)
            for link in self.links:
                link._flow(directions, False)

        self._run(apply)

    def refuse(self) -> None:
        """Stop listening: new connections are refused (open links go on)."""
        self._run_async(self._refuse())

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()  # stops listening at once (open links go on)
            self._server = None

    def heal(self) -> None:
        """Clear the faults of new links (delay, blackhole, stall, refusal); resume reading and undelay open ones."""

        def apply() -> None:
            self._defaults = {"delay": {UP: 0.0, DOWN: 0.0}, "chunk": {UP: None, DOWN: None},
                              "blackhole": False, "stalled": set()}
            for link in self.links:
                link._delay(0.0, BOTH, None)
                link._flow(BOTH, True)

        self._run(apply)
        if self._run(lambda: self._server is None):
            self._run_async(self._listen())

    # --- observation (thread-safe) ------------------------------------------------------------

    @property
    def open_links(self) -> int:
        return self._run(lambda: sum(1 for link in self.links if not link.closed))

    def link(self, index: int) -> Link:
        return self._run(lambda: self.links[index])

    # --- the loop -------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(self, len(self.links), writer)
        self.links.append(link)
        link.tasks.append(asyncio.current_task())
        if not link.blackholed:
            try:
                target_reader, link.target = await asyncio.open_connection(*self.target)
            except OSError:
                link._reset()
                return
            if link.closed:  # reset while connecting
                _linger0(link.target)
                link.target.transport.abort()
                return
            down = asyncio.create_task(link._pump(DOWN, target_reader), name=f"faultproxy-{link.index}-down")
            link.tasks.append(down)
        await link._pump(UP, reader)

    def _run(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the loop thread and return its result."""
        if self._loop is None:
            raise RuntimeError("the fault proxy is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return done.result(10)

    def _run_async(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)
