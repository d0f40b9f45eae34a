"""``jitp serve --workers N``: a supervisor process and N broker worker processes on one port.

The supervisor checks what every worker would fail on first (configuration, certificates,
templates, the registry: opening it also runs the migrations, once, before any worker starts),
so a bad configuration is reported once and nothing is started. It then binds the port itself
(``SO_REUSEPORT``; port 0 picks a free one), keeps that socket bound without listening (it
reserves the port, the kernel gives it no connections), and starts each worker as
``python -m jitp.cli serve ... --worker-index I`` on that port. A fresh interpreter per worker
rather than a fork: no event loop, thread, SQLite connection or TLS state is inherited, and a
worker is exactly the node `jitp serve` runs, with a node id ``<node_id or hostname>-w<I>``.

Each worker has one Unix socket to the supervisor, which is the hub of the relay between them
(:mod:`broker_plugins.relay`): it forwards what one worker sends to all the others and keeps a
mirror of the retained messages for a worker it restarts. SIGTERM, SIGINT and SIGHUP are
forwarded to the workers; SIGUSR1 logs each worker's connected clients. A worker that dies is
restarted with a growing delay; one that keeps failing before it is ready stops everything
with its error (once). The workers die with the supervisor (``PR_SET_PDEATHSIG``), and a worker
whose relay socket closes stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from broker_plugins.compat import check_amqtt_internals
from broker_plugins.relay import (
    ATTACHED,
    EVENTS,
    FATAL,
    PUBLISH,
    READY,
    RETAIN,
    STATUS,
    FrameReader,
    Retained,
    frame,
    parse_retain,
    retain_frame,
)
from broker_plugins.tls import TlsContextHolder
from jitp import errors
from jitp.config import Config, host_port, replace
from jitp.domain.templates import TemplateSet
from jitp.registry.factory import make_registry

log = logging.getLogger("jitp.workers")

Command = Callable[[int, int, int], list[str]]  # (worker index, port, relay fd) -> argv

RESTART_DELAY = 0.5  # s before the first restart of a worker; doubles per consecutive failure
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 30.0  # s a worker must have been up for its next death to count as a first failure
START_FAILURES = 5  # consecutive deaths before ready: the supervisor gives up
MAX_BACKLOG = 64 * 1024 * 1024  # bytes waiting for one worker before frames to it are dropped
PR_SET_PDEATHSIG = 1
PORT_WAIT = 3.0  # s to wait for a port in use to be released


def worker_node_id(config: Config, index: int) -> str:
    """The stable node id of worker ``index``: ``<node_id or hostname>-w<index>``."""
    return f"{config.node_id or socket.gethostname()}-w{index}"


async def preflight(config: Config) -> None:
    """What every worker would fail on, checked once: certificates, templates, the registry
    (migrations applied, master key checked)."""
    check_amqtt_internals()
    listener = config.listener
    TlsContextHolder(
        cert=listener.server_cert,
        key=listener.server_key,
        min_version=listener.tls_min_version,
        session_tickets=listener.session_tickets,
    )
    TemplateSet.load(config.templates_dir)
    registry = make_registry(config)
    await registry.open()
    await registry.close()


def reserve_port(bind: str) -> socket.socket:
    """Bind (not listen) ``bind`` with SO_REUSEPORT: the port is ours, the workers listen on it."""
    host, port = host_port(bind)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise errors.ConfigError(f"cannot listen on {host}:{port}: {exc}", key="listener.bind") from None
    try:
        if port:
            _port_free(family, kind, proto, address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise errors.ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror}", key="listener.bind"
        ) from None
    return sock


def _port_free(family: int, kind: int, proto: int, address: Any) -> None:
    """Refuse a port another process listens on, even with SO_REUSEPORT (a second `jitp serve`
    started by mistake would otherwise silently get half of the connects). The workers of a
    supervisor that was just killed die a moment after it (``PR_SET_PDEATHSIG``): wait for them."""
    deadline = time.monotonic() + PORT_WAIT
    while True:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:  # in the child, between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before the prctl
            os._exit(1)

    return setup


class Worker:
    """One worker process, as the supervisor sees it (restarts reuse the object)."""

    def __init__(self, index: int, node_id: str) -> None:
        self.index, self.node_id = index, node_id
        self.name = f"w{index}"
        self.proc: asyncio.subprocess.Process | None = None
        self.link: HubLink | None = None
        self.ready = asyncio.Event()
        self.started_at = 0.0
        self.failures = 0  # consecutive deaths
        self.fatal: str | None = None  # what it reported when it could not start

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class HubLink(asyncio.Protocol):
    """The supervisor's end of one worker's relay socket."""

    def __init__(self, hub: Supervisor, worker: Worker) -> None:
        self.hub, self.worker = hub, worker
        self.transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        self.dropped = 0
        self._dropped_reported = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            self.dropped += 1
            now = time.monotonic()
            if now - self._dropped_reported > 1.0:
                self._dropped_reported = now
                log.error(
                    "worker %s does not read its relay (%d bytes waiting): %d message(s) to it dropped",
                    self.worker.name,
                    transport.get_write_buffer_size(),
                    self.dropped,
                )
            return
        transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except ValueError as exc:
            log.error("relay from worker %s is corrupt (%s): closing it", self.worker.name, exc)
            if self.transport is not None:
                self.transport.close()
            return
        for body in frames:
            self.hub.received(self.worker, body)


class Supervisor:
    def __init__(self, config: Config, *, workers: int, command: Command) -> None:
        self.config = config
        self.command = command
        self.workers = [Worker(i, worker_node_id(config, i)) for i in range(workers)]
        self.retained: dict[str, Retained] = {}  # the mirror, for workers (re)started later
        self.port = 0
        self._stopping = asyncio.Event()
        self._signal: int = signal.SIGTERM
        self._gave_up: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the relay hub ------------------------------------------------------------------------
    def received(self, worker: Worker, body: bytes) -> None:
        kind = body[:1]
        if kind in (PUBLISH, EVENTS, RETAIN, ATTACHED):
            if kind == RETAIN:
                try:
                    r = parse_retain(body)
                except (UnicodeDecodeError, IndexError) as exc:
                    log.error("bad retained frame from worker %s: %r", worker.name, exc)
                    return
                if self.retained.get(r.topic) == r or (not r.data and r.topic not in self.retained):
                    # Every worker retains a device's configuration from the same event (and clears
                    # the same messages): the others have it already, or will from the first copy.
                    return
                if r.data:
                    self.retained[r.topic] = r
                else:
                    self.retained.pop(r.topic, None)
            data = len(body).to_bytes(4, "big") + body
            for other in self.workers:
                if other is not worker and other.link is not None:
                    other.link.send(data)
        elif kind == READY:
            info = json.loads(body[1:])
            worker.ready.set()
            log.info("worker %s ready (node %s, pid %s)", worker.name, info.get("node"), info.get("pid"))
        elif kind == FATAL:
            worker.fatal = body[1:].decode(errors="replace")
        elif kind == STATUS:
            log.info("worker status: %s", body[1:].decode(errors="replace"))
        else:
            log.warning("unknown relay frame %r from worker %s", kind, worker.name)

    # -- processes ----------------------------------------------------------------------------
    async def _spawn(self, worker: Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *self.command(worker.index, self.port, child.fileno()),
                pass_fds=(child.fileno(),),
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker.ready.clear()
        worker.fatal = None
        worker.started_at = time.monotonic()
        parent.setblocking(False)
        loop = asyncio.get_running_loop()
        link = HubLink(self, worker)
        await loop.create_unix_connection(lambda: link, sock=parent)
        # The retained messages first, then what the others relay from now on (one ordered stream).
        now = time.monotonic()
        for r in self.retained.values():
            if not r.expired(now):  # a Message Expiry Interval that ran out: not handed on
                link.send(retain_frame(r.topic, r.data, r.qos, r.owner, properties=r.properties))
        worker.link = link
        log.info("worker %s started (pid %d, node %s)", worker.name, worker.proc.pid, worker.node_id)

    def _exit_text(self, code: int) -> str:
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def _wait_exit(self, worker: Worker) -> int:
        assert worker.proc is not None
        code = await worker.proc.wait()
        if worker.link is not None and worker.link.transport is not None:
            worker.link.transport.close()
        worker.link = None
        return code

    async def _start_all(self) -> None:
        """Start every worker and wait until all are ready; one that fails first stops it all."""
        for worker in self.workers:
            await self._spawn(worker)
        pending: dict[asyncio.Future[Any], Worker] = {
            asyncio.ensure_future(w.ready.wait()): w for w in self.workers
        }
        exits: dict[asyncio.Future[Any], Worker] = {
            asyncio.ensure_future(self._wait_exit(w)): w for w in self.workers
        }
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while pending and not self._stopping.is_set():
                done, _ = await asyncio.wait([*pending, *exits, stop], return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    if fut in pending:
                        del pending[fut]
                    elif fut in exits:
                        worker = exits[fut]
                        raise errors.WorkersFailed(
                            f"worker {worker.name} could not start: "
                            + (worker.fatal or f"it {self._exit_text(fut.result())} (see its output above)")
                        )
        finally:
            stop.cancel()
            for fut in [*pending, *exits]:
                fut.cancel()

    async def _keep(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it dies, until the supervisor stops."""
        while True:
            code = await self._wait_exit(worker)
            if self._stopping.is_set():
                return
            was_ready = worker.ready.is_set()
            stable = was_ready and time.monotonic() - worker.started_at >= STABLE_AFTER
            worker.failures = 1 if stable else worker.failures + 1
            if not was_ready and worker.failures >= START_FAILURES:
                self._gave_up = (
                    f"worker {worker.name} failed {worker.failures} times in a row before it was ready: "
                    + (worker.fatal or f"it {self._exit_text(code)} (see its output above)")
                )
                self._stopping.set()
                return
            delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (worker.failures - 1))
            log.error(
                "worker %s (pid %s) %s%s; restarting it in %.1f s (failure %d in a row)",
                worker.name,
                worker.pid,
                self._exit_text(code),
                f": {worker.fatal}" if worker.fatal else "",
                delay,
                worker.failures,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            try:
                await self._spawn(worker)
            except OSError as exc:
                log.error("worker %s not restarted: %s", worker.name, exc)
                worker.proc = None
                self._gave_up = f"worker {worker.name} could not be restarted: {exc}"
                self._stopping.set()
                return

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    def _stop(self, sig: int) -> None:
        if not self._stopping.is_set():
            log.info("%s: stopping %d worker(s)", signal.Signals(sig).name, len(self.workers))
            self._signal = sig
            self._stopping.set()

    def _status(self) -> None:
        for worker in self.workers:
            if worker.link is not None:
                worker.link.send(frame(STATUS))

    async def _shutdown(self) -> None:
        self._signal_all(self._signal)
        grace = self.config.limits.shutdown_drain_timeout + 15
        procs = [w.proc for w in self.workers if w.proc is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        if waits:
            _, late = await asyncio.wait(waits, timeout=grace)
            if late:
                log.error(
                    "%d worker(s) still running %.0f s after the signal: killing them", len(late), grace
                )
                self._signal_all(signal.SIGKILL)
                await asyncio.wait(waits, timeout=10)
        for worker in self.workers:
            if worker.link is not None and worker.link.transport is not None:
                worker.link.transport.close()

    async def run(self) -> None:
        """Start the workers and keep them running until SIGTERM/SIGINT. Raises
        :class:`~jitp.errors.ProvisioningError` when they cannot run (after stopping them)."""
        await preflight(self.config)
        reserved = reserve_port(self.config.listener.bind)
        host, _ = host_port(self.config.listener.bind)
        self.port = int(reserved.getsockname()[1])
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: lambda: self._stop(signal.SIGTERM),
            signal.SIGINT: lambda: self._stop(signal.SIGINT),
            signal.SIGHUP: lambda: self._signal_all(signal.SIGHUP),
            signal.SIGUSR1: self._status,
        }
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        try:
            try:
                await self._start_all()
            except BaseException:
                self._stopping.set()
                await self._shutdown()
                raise
            if not self._stopping.is_set():
                log.info(
                    "jitp broker listening on %s:%d (mutual TLS, %d workers)",
                    host,
                    self.port,
                    len(self.workers),
                )
            for worker in self.workers:
                task = asyncio.create_task(self._keep(worker), name=f"jitp-keep-{worker.name}")
                self._tasks.add(task)
            await self._stopping.wait()
            await self._shutdown()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)
            reserved.close()
        if self._gave_up is not None:
            raise errors.WorkersFailed(self._gave_up)
        log.info("all workers stopped")


def supervise(config: Config, *, workers: int, command: Command) -> None:
    """Run ``workers`` worker processes (``command`` starts one) until SIGTERM or SIGINT."""
    asyncio.run(Supervisor(config, workers=workers, command=command).run())


def run_worker(config: Config, *, index: int, relay_fd: int) -> int:
    """One worker (``jitp serve --worker-index I``, started by the supervisor): a node on the shared
    port until SIGTERM/SIGINT or until the supervisor is gone. An error at start goes to the
    supervisor, which reports it (once), rather than to this process's output."""
    from broker_plugins.relay import WorkerRelay, report_fatal
    from broker_plugins.server import serve

    node_id = worker_node_id(config, index)
    config = replace(config, node_id=node_id, workers=1, listener__reuse_port=True)
    relay = WorkerRelay(relay_fd, node_id=node_id)
    try:
        asyncio.run(serve(config, relay=relay))
    except errors.ProvisioningError as exc:
        report_fatal(relay_fd, str(exc))
        return 2
    return 0
