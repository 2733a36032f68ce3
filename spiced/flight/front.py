"""The Flight TLS front: terminates TLS with the "flight" context and pipes each connection
byte-for-byte to the plaintext pyarrow Flight server on a private unix socket. The runtime runs it
in a process of its own (`front_process`), where the context mirrors the manager's.

pyarrow's Flight server cannot reload certificates, request optional client certificates or show
a handler the peer certificate; the front gives all three. Identity: each backend connection is
bound to a unique abstract unix name before connecting, so gRPC reports
`context.peer() == "unix-abstract:<name>"` on the backend; `identity_for(peer)` (and, across
processes, `PeerEvents`) gives the certificate that verified during this connection's handshake.

TLS is the event loop's own transport (uvloop's where it exists, asyncio's otherwise), started with
`loop.start_tls` on each accepted connection so that a failed handshake's reason can be logged. It
handles every way a peer can leave: close_notify with or without FIN, FIN or RST alone, a peer that
stops reading, key updates. (A hand-written memory-BIO pump was used here before: it saved about
0.04 ms per small call, within this machine's noise, and spun forever on a client's close_notify.)
Backpressure both ways: a side whose transport is over its high-water mark pauses reading the
other side. Nothing is ever answered in plaintext: a connection is piped only after its handshake.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any, Protocol

from ..identity import ClientIdentity
from ..tls.contexts import HandshakeWatch, handshake_watch

try:
    import uvloop
except ImportError:  # Windows
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger("runtime.flight")

_names = itertools.count(1)
_NAME_PREFIX = "rtfront-"  # each backend connection's abstract unix name (see `_Pipe.connect`)
PEER_PREFIX = "unix-abstract:" + _NAME_PREFIX  # ... and how gRPC reports it
_LINGER = 1.0  # after our close_notify, how long a client may take to answer with its own
_HIGH_WATER = 1024 * 1024  # bytes a transport may hold for its peer before the other side pauses
_ACCEPT_RETRY_SECONDS = 1.0  # after accept() failed for want of descriptors or memory


class PeerEvents(Protocol):
    """Told of each backend connection's gRPC peer name and identity (from the front's loop thread)."""

    def connected(self, peer: str, identity: ClientIdentity | None) -> None: ...

    def closed(self, peer: str) -> None: ...


class FlightTlsFront:
    def __init__(self, sock: socket.socket, backend_path: str, ssl_context: ssl.SSLContext, *,
                 handshake_timeout: float = 10.0, connect_timeout: float = 10.0,
                 peer_events: PeerEvents | None = None) -> None:
        self._sock = sock
        self._peer_events = peer_events
        self._backend_path = backend_path
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._connect_timeout = connect_timeout
        self._peers: dict[str, ClientIdentity | None] = {}
        self._pipes: set[_Pipe] = set()  # handshaken connections, until the client's side is closed
        self._handshaking: set[asyncio.Task[None]] = set()
        self._no_pipes: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.last_traffic = 0.0  # monotonic time of the last bytes through any pipe

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Start accepting on the already-listening socket; returns once the front is serving."""
        self._thread = threading.Thread(target=self._run, name="flight-tls-front", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self, grace: float) -> None:
        """Stop accepting, let open connections finish for up to `grace` seconds, then close them."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop)
        try:
            future.result(grace + 5.0)
        except TimeoutError:  # a wedged loop: the process's owner ends it
            log.warning("Flight TLS front: did not stop within %.1f s", grace + 5.0)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)

    def stop_accepting(self) -> None:
        """Refuse new connections from now on; open ones go on."""
        self.call_soon(self._close_listener)

    def call_soon(self, callback: Any, *args: Any) -> bool:
        """Run `callback(*args)` on the front's loop thread; False once the loop is gone."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def settled_now(self, quiet: float) -> bool:
        """On the loop thread: whether no byte has crossed the front for `quiet` seconds and none
        waits in it, i.e. everything a finished call sent has left for its client."""
        if time.monotonic() - self.last_traffic < quiet:
            return False
        return all(pipe.buffered() == 0 for pipe in self._pipes)

    def identity_for(self, peer: str) -> ClientIdentity | None:
        """The verified client certificate of the connection gRPC names `peer` (None: anonymous/unknown)."""
        return self._peers.get(peer)

    @property
    def open_connections(self) -> int:
        return len(self._pipes)

    # ------------------------------------------------------------------ loop thread

    def _run(self) -> None:
        loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_log_loop_error)
        self._loop = loop
        self._no_pipes = asyncio.Event()
        self._no_pipes.set()
        try:
            self._sock.setblocking(False)
            loop.add_reader(self._sock.fileno(), self._accept)
            self._accepting = True
        except BaseException as e:
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._close_listener()
            self._abort_all()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, asyncio.sleep(0), return_exceptions=True))
            loop.close()

    def _close_listener(self) -> None:
        if self._accepting and self._loop is not None:
            self._accepting = False
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def _abort_all(self) -> None:
        for handshake in list(self._handshaking):
            handshake.cancel()
        for pipe in list(self._pipes):
            pipe.abort()

    async def _shutdown(self, grace: float) -> None:
        self._close_listener()
        for handshake in list(self._handshaking):
            handshake.cancel()
        assert self._no_pipes is not None
        try:
            await asyncio.wait_for(self._no_pipes.wait(), grace)
        except TimeoutError:
            pass
        self._abort_all()

    def _accept(self) -> None:
        assert self._loop is not None
        for _ in range(64):  # then let the open connections have a turn
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: pause, as asyncio's own accept loop does
                log.warning("Flight TLS front: cannot accept a connection: %s", e)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(_ACCEPT_RETRY_SECONDS, self._resume_accepting)
                return
            # Sockets bound without proto=IPPROTO_TCP leave Nagle on; small gRPC calls then stall
            # ~40 ms on delayed ACKs.
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            self._loop.create_task(self._serve(conn, _peername(addr)))

    def _resume_accepting(self) -> None:
        if self._accepting and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _serve(self, conn: socket.socket, name: str) -> None:
        """One accepted connection: the TLS handshake; the pipe takes over from its end."""
        loop = asyncio.get_running_loop()
        handshake = asyncio.current_task()
        assert handshake is not None
        self._handshaking.add(handshake)
        watch = HandshakeWatch(conn)
        handshake_watch.set(watch)  # in this task's own context: the alert, and the reason behind it
        try:
            await loop.connect_accepted_socket(lambda: _Pipe(self, name), conn, ssl=self._ssl_context,
                                               ssl_handshake_timeout=self._handshake_timeout,
                                               ssl_shutdown_timeout=_LINGER)
        except Exception as e:  # noqa: BLE001 - any failed handshake: the peer's problem, logged at DEBUG
            conn.close()
            reason = watch.failure or e
            log.debug("Flight TLS handshake with %s failed: %s", name, str(reason) or type(reason).__name__)
        finally:
            self._handshaking.discard(handshake)

    def _established(self, pipe: _Pipe) -> None:
        self._pipes.add(pipe)
        if self._no_pipes is not None:
            self._no_pipes.clear()

    def _connected(self, pipe: _Pipe, identity: ClientIdentity | None) -> None:
        assert pipe.peer is not None
        self._peers[pipe.peer] = identity
        if self._peer_events is not None:
            self._peer_events.connected(pipe.peer, identity)

    def _finished(self, pipe: _Pipe) -> None:
        self._pipes.discard(pipe)
        if pipe.peer is not None and pipe.peer in self._peers:  # announced, and not yet forgotten
            del self._peers[pipe.peer]
            if self._peer_events is not None:
                self._peer_events.closed(pipe.peer)
        if not self._pipes and self._no_pipes is not None:
            self._no_pipes.set()


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Resets and aborted connections are routine on a public port: DEBUG, as upstream.
    log.debug("Flight TLS front: %s", context.get("message"), exc_info=context.get("exception"))


def _peername(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


class _Pipe(asyncio.Protocol):
    """One client connection once its handshake is done: the TLS transport's protocol, joined to
    a unix connection to the Flight server (`_Backend`). Whichever side ends, the other follows:
    the client's end closes the backend; the backend's end sends close_notify to the client."""

    def __init__(self, front: FlightTlsFront, name: str) -> None:
        self.front = front
        self.name = name
        self.client: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self.peer: str | None = None
        self._early: list[bytes] = []  # from the client before the backend is connected
        self._connecting: asyncio.Future[None] | None = None
        self.client_gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The handshake is done: hold the client's bytes until the backend is connected."""
        tls: asyncio.Transport = transport  # type: ignore[assignment]
        self.client = tls
        tls.pause_reading()
        tls.set_write_buffer_limits(high=_HIGH_WATER)
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.front._established(self)
        self._connecting = asyncio.ensure_future(self._connect(ClientIdentity.from_der(der) if der else None))

    async def _connect(self, identity: ClientIdentity | None) -> None:
        """Announce the connection's identity under its backend name, then start piping."""
        front = self.front
        loop = asyncio.get_running_loop()
        name = f"{_NAME_PREFIX}{os.getpid()}-{next(_names)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, front._backend_path), front._connect_timeout)
        except (TimeoutError, OSError) as e:
            sock.close()
            log.warning("Flight TLS front: cannot reach the Flight server: %s", e)
            self.abort()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        if self.client_gone:
            sock.close()
            return
        # Announced before gRPC reads a byte of this connection, so the first call finds it.
        self.peer = f"unix-abstract:{name}"
        front._connected(self, identity)
        backend, _ = await loop.create_unix_connection(lambda: _Backend(self), sock=sock)
        if self.client_gone:
            backend.close()
            return
        backend.set_write_buffer_limits(high=_HIGH_WATER)  # type: ignore[attr-defined]
        self.backend = backend  # type: ignore[assignment]
        if self._early:
            backend.write(b"".join(self._early))  # type: ignore[attr-defined]
            self._early.clear()
        assert self.client is not None
        self.client.resume_reading()

    # ------------------------------------------------------------------ the client's TLS transport

    def data_received(self, data: bytes) -> None:
        self.front.last_traffic = time.monotonic()
        if self.backend is None:
            self._early.append(data)
        else:
            self.backend.write(data)

    def eof_received(self) -> bool:
        return False  # close: gRPC has no use for a connection its client stopped sending on

    def pause_writing(self) -> None:  # the client is not taking what gRPC sends: stop reading gRPC
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_gone = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        backend, self.backend = self.backend, None
        if backend is not None:
            if exc is None:
                backend.close()  # what the client sent before it closed still reaches gRPC
            else:
                backend.abort()
        self.front._finished(self)

    # ------------------------------------------------------------------ the backend's side

    def backend_lost(self) -> None:
        """gRPC closed its side: the client gets what is buffered, then close_notify."""
        self.backend = None
        if self.client is not None and not self.client.is_closing():
            self.client.close()

    def buffered(self) -> int:
        """Bytes taken from one side and not yet handed to the other side's socket."""
        return (self.client.get_write_buffer_size() if self.client is not None else 0) + \
            (self.backend.get_write_buffer_size() if self.backend is not None else 0) + sum(map(len, self._early))

    def socket(self) -> Any:
        return self.client.get_extra_info("socket") if self.client is not None else None

    def abort(self) -> None:
        if self.backend is not None:
            self.backend.abort()
        if self.client is not None:
            self.client.abort()  # connection_lost follows, and with it _finished


class _Backend(asyncio.Protocol):
    """The unix connection to the Flight server: what gRPC sends goes to the client."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        pipe.front.last_traffic = time.monotonic()
        if pipe.client is not None:
            pipe.client.write(data)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:  # gRPC is not taking what the client sends: stop reading the client
        if self.pipe.client is not None:
            self.pipe.client.pause_reading()

    def resume_writing(self) -> None:
        if self.pipe.client is not None and not self.pipe.client.is_closing():
            self.pipe.client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.backend_lost()
