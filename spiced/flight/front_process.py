"""The Flight TLS front in its own process, so that its per-chunk work (recv, OpenSSL, send) never
waits for the GIL held by the gRPC handlers, and theirs never waits for it.

Measured on 2 cores, A/B against the same front in the runtime's process: the TLS cost of a
1-row DoGet is 0.05–0.08 ms lower; large DoGets are no faster, as the machine is then CPU-bound.

The runtime process stays the one owner of the material, signals and shutdown:
  - its `TlsManager` sends the front the pair and client CA at start and after every swap it
    publishes; the front mirrors the "flight" contexts (`ContextMirror`) and never reads a file;
  - the front tells the runtime each backend connection's gRPC peer name and client identity
    before a byte of it reaches gRPC, and `identity_for` waits briefly for a name not yet heard of;
  - the front ignores SIGINT, SIGTERM and SIGHUP and stops when told, or when its control channel
    closes because the runtime has gone;
  - should the front process die, the runtime starts a new one on the same listening socket.

The control channel is a socketpair carrying `multiprocessing.connection` messages (tuples).

    python -m spiced.flight.front_process LISTEN_FD CONTROL_FD BACKEND_PATH CLIENT_AUTH_MODE LOG_LEVEL
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable, cast

from ..identity import ClientIdentity
from ..tls.material import CaBundle, CertKeyPair
from .front import PEER_PREFIX

if TYPE_CHECKING:
    from ..config import ClientAuthMode
    from ..tls.manager import TlsManager

log = logging.getLogger("runtime.flight")

_START_TIMEOUT = 30.0
_IDENTITY_WAIT = 1.0  # how long a call may wait for the front's word on its connection
_RESPAWN_DELAY = 1.0


def _material(pair: CertKeyPair, ca: CaBundle | None) -> tuple[str, bytes, bytes, str | None]:
    return ("material", pair.chain_pem, pair.key_pem, ca.pem if ca is not None else None)


class FlightFrontProcess:
    """The runtime's handle on the front process; the same surface the runtime used in process."""

    def __init__(self, sock: socket.socket, backend_path: str, tls: TlsManager) -> None:
        self._sock = sock
        self._backend_path = backend_path
        self._tls = tls
        self._lock = threading.Lock()  # one message at a time; the latest material goes out last
        self._latest: tuple[CertKeyPair, CaBundle | None] | None = None
        self._peers: dict[str, ClientIdentity | None] = {}
        self._heard = threading.Condition()
        self._replies: dict[int, Future[bool]] = {}
        self._ids = itertools.count(1)
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._started = threading.Event()
        self._start_error: str | None = None

    # ------------------------------------------------------------------ runtime side

    def start(self) -> None:
        """Start the front process; returns once it accepts connections."""
        self._latest = self._tls.subscribe(self._publish)
        self._spawn()
        if not self._started.wait(_START_TIMEOUT):
            raise RuntimeError("the Flight TLS front did not start")
        if self._start_error is not None:
            raise RuntimeError(f"the Flight TLS front did not start: {self._start_error}")

    def stop_accepting(self) -> None:
        """Refuse new connections from now on; open ones go on."""
        self._stopping = True
        self._send(("stop_accepting",))
        self._sock.close()  # the front's copy is not the last one

    async def settled(self, quiet: float) -> bool:
        """Whether no byte has crossed the front for `quiet` seconds and none waits in it."""
        future: Future[bool] = Future()
        key = next(self._ids)
        self._replies[key] = future
        if not self._send(("settled", key, quiet)):
            self._replies.pop(key, None)
            return True
        return await asyncio.wrap_future(future)

    def stop(self, grace: float) -> None:
        """Let open connections finish for up to `grace` seconds, then end the front process."""
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        self._send(("stop", grace))
        try:
            proc.wait(grace + 5.0)
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

    def _send(self, message: tuple[Any, ...]) -> bool:
        with self._lock:
            return self._send_locked(message)

    def _send_locked(self, message: tuple[Any, ...]) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.send(message)
            return True
        except OSError:
            return False  # the front is gone; its reader notices

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        level = logging.getLogger("runtime.flight").getEffectiveLevel()
        argv = [sys.executable, "-m", __name__, str(self._sock.fileno()), str(theirs.fileno()), self._backend_path,
                self._tls.client_auth_mode, str(level)]
        self._proc = subprocess.Popen(argv, pass_fds=(self._sock.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL)
        theirs.close()
        conn = Connection(ours.detach())
        with self._lock:
            assert self._latest is not None
            self._conn = conn
            self._send_locked(_material(*self._latest))
        threading.Thread(target=self._read, args=(conn, self._proc), name="flight-front-control", daemon=True).start()

    def _read(self, conn: Connection, proc: subprocess.Popen[bytes]) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "peer":
                self._connected(message[1], message[2])
            elif kind == "gone":
                with self._heard:
                    self._peers.pop(message[1], None)
            elif kind == "reply":
                future = self._replies.pop(message[1], None)
                if future is not None:
                    future.set_result(message[2])
            elif kind in ("ready", "failed"):
                self._start_error = message[1] if kind == "failed" else None
                self._started.set()
        conn.close()
        code = proc.wait()
        self._lost(code)

    def _lost(self, code: int) -> None:
        """The front process ended: expected after `stop`; otherwise start another."""
        with self._heard:
            self._peers.clear()
        for future in list(self._replies.values()):
            future.set_result(True)  # nothing waits in a front that is gone
        self._replies.clear()
        if not self._started.is_set():
            self._start_error = self._start_error or f"it exited with code {code}"
            self._started.set()
            return
        if self._stopping:
            return
        log.error("The Flight TLS front exited with code %s; starting it again", code)
        time.sleep(_RESPAWN_DELAY)
        if self._stopping:
            return
        try:
            self._spawn()
        except (OSError, ValueError) as e:  # e.g. shutdown closed the listening socket meanwhile
            log.error("The Flight TLS front could not be started again: %s", e)


# ---------------------------------------------------------------------- front side


class _TellRuntime:
    """PeerEvents for the front process: every backend connection is announced to the runtime."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send

    def connected(self, peer: str, identity: ClientIdentity | None) -> None:
        self._send(("peer", peer, identity))

    def closed(self, peer: str) -> None:
        self._send(("gone", peer))


def _load(chain: bytes, key: bytes, ca_pem: str | None) -> tuple[CertKeyPair, CaBundle | None]:
    from ..tls import material

    return material.load_pair(chain, key), material.load_ca_bundle(ca_pem.encode()) if ca_pem else None


def main(argv: list[str]) -> int:
    from .. import logs
    from ..tls.contexts import ContextMirror
    from .front import FlightTlsFront

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the runtime owns signals and shutdown
        signal.signal(sig, signal.SIG_IGN)
    listen_fd, control_fd, backend_path, level = int(argv[0]), int(argv[1]), argv[2], int(argv[4])
    mode = cast("ClientAuthMode", argv[3])
    logs.configure()
    log.setLevel(level)
    conn = Connection(control_fd)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        try:
            with lock:
                conn.send(message)
        except OSError:
            pass  # the runtime is gone; the control loop below ends

    try:
        _, chain, key, ca_pem = conn.recv()
    except (EOFError, OSError):
        return 0  # the runtime went away before the front could start
    mirror = ContextMirror("flight", mode, *_load(chain, key, ca_pem))
    front = FlightTlsFront(socket.socket(fileno=listen_fd), backend_path, mirror.listener, peer_events=_TellRuntime(send))
    try:
        front.start()
    except Exception as e:  # noqa: BLE001 - reported to the runtime, which fails its start with it
        send(("failed", str(e)))
        return 1
    send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            front.stop(0.0)
            return 0
        kind = message[0]
        if kind == "material":
            try:
                mirror.publish(*_load(*message[1:4]))
            except Exception as e:  # noqa: BLE001 - validated by the runtime; keep serving the last one
                log.error("Flight TLS front: cannot use the new TLS material, keeping the old: %s", e)
        elif kind == "stop_accepting":
            front.stop_accepting()
        elif kind == "settled":
            send(("reply", message[1], front.is_settled(message[2])))
        elif kind == "stop":
            front.stop(message[1])
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
