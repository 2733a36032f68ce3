"""The Flight TLS front in its own process, so that its per-chunk work (recv, OpenSSL, send) never
waits for the GIL held by the gRPC handlers, and theirs never waits for it.

Measured on 2 cores, A/B against the same front in the runtime's process: the TLS cost of a
1-row DoGet is 0.05–0.08 ms lower; large DoGets are no faster, as the machine is then CPU-bound.

The runtime process stays the one owner of the material, signals and shutdown:
  - its `TlsManager` sends the front the pair and client CA at start and after every swap it
    publishes; the front mirrors the "flight" contexts (`ContextMirror`) and never reads a file;
  - the front tells the runtime each backend connection's gRPC peer name and client identity
    before a byte of it reaches gRPC, and `identity_for` waits briefly for a name not yet heard of;
  - the front ignores SIGINT, SIGTERM and SIGHUP and stops when told; it dies with the runtime
    (parent-death signal, and the end of its control channel);
  - one supervisor thread starts the front, pings its event loop every `PING_INTERVAL` and, should
    the process die or its loop stop answering for `WEDGE_TIMEOUT`, kills it, logs a WARN line,
    counts the restart and starts a new one on the same listening socket. While no front serves,
    the Flight endpoint is in error and `/v1/ready` says not ready.

The supervisor is also the thread that starts every front process: the parent-death signal fires
when the thread that forked the child ends, so that thread lives as long as its child.

    python -m spiced.flight.front_process LISTEN_FD CONTROL_FD BACKEND_PATH CLIENT_AUTH_MODE LOG_LEVEL PARENT_PID
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, cast

from ..identity import ClientIdentity
from . import front_messages as msg
from .front import PEER_PREFIX

if TYPE_CHECKING:
    from ..config import ClientAuthMode
    from ..metrics import Metrics
    from ..tls.manager import TlsManager
    from ..tls.material import CaBundle, CertKeyPair

log = logging.getLogger("runtime.flight")

_START_TIMEOUT = 30.0
_IDENTITY_WAIT = 1.0  # how long a call may wait for the front's word on its connection
_RESPAWN_DELAY = 1.0
_SETTLED_TIMEOUT = 2.0  # a front that cannot say whether it is settled has nothing left to send
PING_INTERVAL = 0.5
WEDGE_TIMEOUT = 3.0  # a front whose loop has not answered a ping for this long is killed
_STOP_MARGIN = 2.0  # after the grace, how long a stopping front may take to exit before it is killed


def _material(pair: CertKeyPair, ca: CaBundle | None) -> msg.Material:
    return msg.Material(pair.chain_pem, pair.key_pem, ca.pem if ca is not None else None)


class FlightFrontProcess:
    """The runtime's handle on the front process."""

    def __init__(self, sock: socket.socket, backend_path: str, tls: TlsManager, metrics: Metrics,
                 on_serving: Callable[[bool], None] = lambda serving: None) -> None:
        self._sock = sock
        self._backend_path = backend_path
        self._tls = tls
        self._metrics = metrics
        self._on_serving = on_serving
        self._lock = threading.Lock()  # one message at a time; the latest material goes out last
        self._latest: tuple[CertKeyPair, CaBundle | None] | None = None
        self._peers: dict[str, ClientIdentity | None] = {}
        self._heard = threading.Condition()
        self._replies: dict[int, Future[bool]] = {}
        self._ids = itertools.count(1)
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._ready = threading.Event()  # the current front process has said it serves
        self._start_error: str | None = None
        self._last_pong = 0.0

    # ------------------------------------------------------------------ runtime side

    def start(self) -> None:
        """Start the front process; returns once it accepts connections."""
        self._latest = self._tls.subscribe(self._publish)
        threading.Thread(target=self._supervise, name="flight-front-supervisor", daemon=True).start()
        if not self._started.wait(_START_TIMEOUT):
            raise RuntimeError("the Flight TLS front did not start")
        if self._start_error is not None:
            raise RuntimeError(f"the Flight TLS front did not start: {self._start_error}")

    def stop_accepting(self) -> None:
        """Refuse new connections from now on; open ones go on."""
        self._stopping.set()
        self._send(msg.StopAccepting())
        self._sock.close()  # the front's copy is not the last one

    async def settled(self, quiet: float) -> bool:
        """Whether no byte has crossed the front for `quiet` seconds and none waits in it."""
        future: Future[bool] = Future()
        key = next(self._ids)
        self._replies[key] = future
        if not self._send(msg.AskSettled(key, quiet)):
            self._replies.pop(key, None)
            return True
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), _SETTLED_TIMEOUT)
        except TimeoutError:
            return True
        finally:
            self._replies.pop(key, None)

    def stop(self, grace: float) -> None:
        """Let open connections finish for up to `grace` seconds, then end the front process."""
        self._stopping.set()
        proc = self._proc
        if proc is None:
            return
        self._send(msg.Stop(grace))
        try:
            proc.wait(grace + _STOP_MARGIN)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def identity_for(self, peer: str) -> ClientIdentity | None:
        """The verified client certificate of the connection gRPC names `peer` (None: anonymous/unknown)."""
        with self._heard:
            if peer not in self._peers and peer.startswith(PEER_PREFIX):
                self._heard.wait_for(lambda: peer in self._peers, _IDENTITY_WAIT)
            return self._peers.get(peer)

    def _connected(self, peer: str, identity: ClientIdentity | None) -> None:
        with self._heard:
            self._peers[peer] = identity
            self._heard.notify_all()

    def _publish(self, pair: CertKeyPair, ca: CaBundle | None) -> None:
        with self._lock:
            self._latest = (pair, ca)
            self._send_locked(_material(pair, ca))

    def _send(self, message: msg.ToFront) -> bool:
        with self._lock:
            return self._send_locked(message)

    def _send_locked(self, message: msg.ToFront) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.send(message)
            return True
        except OSError:
            return False  # the front is gone; the supervisor notices

    # ------------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        """Start the front, watch it, and start another each time it dies or wedges, until stop."""
        while True:
            try:
                proc = self._spawn()
            except (OSError, ValueError) as e:  # e.g. shutdown closed the listening socket meanwhile
                if not self._started.is_set():
                    self._start_error = str(e)
                    self._started.set()
                elif not self._stopping.is_set():
                    log.error("The Flight TLS front could not be started again: %s", e)
                return
            reason, why = self._watch(proc)
            with self._heard:
                self._peers.clear()
            for future in list(self._replies.values()):
                if not future.done():
                    future.set_result(True)  # nothing waits in a front that is gone
            if not self._started.is_set():
                self._start_error = self._start_error or f"it exited with code {proc.returncode}"
                self._started.set()
                return
            if self._stopping.is_set():
                return
            self._on_serving(False)
            log.warning("%s; starting it again", why)
            self._metrics.flight_tls_front_restarts.add(1, {"reason": reason})
            if self._stopping.wait(_RESPAWN_DELAY):
                return

    def _watch(self, proc: subprocess.Popen[bytes]) -> tuple[str, str]:
        """Wait for the front process to end, pinging its loop; kill it if the loop stops answering.
        Returns why it ended ("exited" or "unresponsive"), and the same as the WARN line says it."""
        keys = itertools.count(1)
        while True:
            try:
                code = proc.wait(PING_INTERVAL)
                return "exited", f"The Flight TLS front exited with code {code}"
            except subprocess.TimeoutExpired:
                pass
            if self._stopping.is_set() or not self._ready.is_set():
                continue  # stop() bounds a stopping front; _START_TIMEOUT a starting one
            silent = time.monotonic() - self._last_pong
            if silent > WEDGE_TIMEOUT:
                proc.kill()
                proc.wait()
                return "unresponsive", f"The Flight TLS front has not answered for {silent:.1f} s; killed it"
            self._send(msg.Ping(next(keys)))

    def _spawn(self) -> subprocess.Popen[bytes]:
        ours, theirs = socket.socketpair()
        level = logging.getLogger("runtime.flight").getEffectiveLevel()
        argv = [sys.executable, "-m", __name__, str(self._sock.fileno()), str(theirs.fileno()), self._backend_path,
                self._tls.client_auth_mode, str(level), str(os.getpid())]
        try:
            proc = subprocess.Popen(argv, pass_fds=(self._sock.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        self._ready.clear()
        self._proc = proc
        with self._lock:
            assert self._latest is not None
            self._conn = conn
            self._send_locked(_material(*self._latest))
        threading.Thread(target=self._read, args=(conn,), name="flight-front-control", daemon=True).start()
        return proc

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                message: msg.ToRuntime = conn.recv()
            except (EOFError, OSError):
                break
            match message:
                case msg.PeerConnected(peer, identity):
                    self._connected(peer, identity)
                case msg.PeerGone(peer):
                    with self._heard:
                        self._peers.pop(peer, None)
                case msg.Pong():
                    self._last_pong = time.monotonic()
                case msg.Settled(key, settled):
                    future = self._replies.get(key)
                    if future is not None and not future.done():
                        future.set_result(settled)
                case msg.Ready():
                    self._last_pong = time.monotonic()
                    self._ready.set()
                    self._started.set()
                    self._on_serving(True)
                case msg.Failed(reason):
                    self._start_error = reason
                    self._started.set()
        conn.close()


# ---------------------------------------------------------------------- front side


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the runtime's thread that started it ends (Linux)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the runtime ended before the signal was armed
        os._exit(0)


def _load(material: msg.Material) -> tuple[CertKeyPair, CaBundle | None]:
    from ..tls import material as tls_material

    pair = tls_material.load_pair(material.chain, material.key)
    return pair, tls_material.load_ca_bundle(material.ca_pem.encode()) if material.ca_pem else None


def main(argv: list[str]) -> int:
    from .. import logs
    from ..tls.contexts import ContextMirror
    from .front import FlightTlsFront

    _die_with_parent(int(argv[5]))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the runtime owns signals and shutdown
        signal.signal(sig, signal.SIG_IGN)
    listen_fd, control_fd, backend_path, level = int(argv[0]), int(argv[1]), argv[2], int(argv[4])
    mode = cast("ClientAuthMode", argv[3])
    logs.configure()
    log.setLevel(level)
    conn = Connection(control_fd)
    lock = threading.Lock()

    def send(message: msg.ToRuntime) -> None:
        try:
            with lock:
                conn.send(message)
        except OSError:
            pass  # the runtime is gone; the control loop below ends

    try:
        first = conn.recv()
    except (EOFError, OSError):
        return 0  # the runtime went away before the front could start
    assert isinstance(first, msg.Material)
    mirror = ContextMirror("flight", mode, *_load(first))
    front = FlightTlsFront(socket.socket(fileno=listen_fd), backend_path, mirror.listener,
                           peer_events=_TellRuntime(send))
    try:
        front.start()
    except Exception as e:  # noqa: BLE001 - reported to the runtime, which fails its start with it
        send(msg.Failed(str(e)))
        return 1
    send(msg.Ready())
    while True:
        try:
            message: msg.ToFront = conn.recv()
        except (EOFError, OSError):
            front.stop(0.0)
            return 0
        match message:
            case msg.Material():
                try:
                    mirror.publish(*_load(message))
                except Exception as e:  # noqa: BLE001 - validated by the runtime; keep serving the last one
                    log.error("Flight TLS front: cannot use the new TLS material, keeping the old: %s", e)
            case msg.Ping(key):  # answered from the loop thread: a wedged loop never answers
                front.call_soon(send, msg.Pong(key))
            case msg.AskSettled(key, quiet):
                front.call_soon(lambda key=key, quiet=quiet: send(msg.Settled(key, front.settled_now(quiet))))
            case msg.StopAccepting():
                front.stop_accepting()
            case msg.Stop(grace):
                front.stop(grace)
                return 0


class _TellRuntime:
    """PeerEvents for the front process: every backend connection is announced to the runtime."""

    def __init__(self, send: Callable[[msg.ToRuntime], None]) -> None:
        self._send = send

    def connected(self, peer: str, identity: ClientIdentity | None) -> None:
        self._send(msg.PeerConnected(peer, identity))

    def closed(self, peer: str) -> None:
        self._send(msg.PeerGone(peer))


if __name__ == "__main__":
    code = main(sys.argv[1:])
    logging.shutdown()
    os._exit(code)  # no interpreter finalizers: a loop thread still unwinding must not hold the exit
