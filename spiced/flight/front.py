"""The Flight TLS front: terminates TLS with the "flight" context and pipes each connection
byte-for-byte to the plaintext pyarrow Flight server on a private unix socket. The runtime runs it
in a process of its own (`front_process`), where the context mirrors the manager's.

pyarrow's Flight server cannot reload certificates, request optional client certificates or show
a handler the peer certificate; the front gives all three (notes §9). Identity: each backend
connection is bound to a unique abstract unix name before connecting, so gRPC reports
`context.peer() == "unix-abstract:<name>"` on the backend; `identity_for(peer)` (and, across
processes, `PeerEvents`) gives the certificate that verified during this connection's handshake.

One event loop on its own thread (uvloop's where it exists: a small call wakes the front twice, and
libuv's loop costs less per wakeup) runs every connection, but not through asyncio's transports:
each connection is two non-blocking sockets driven by `add_reader` / `add_writer` callbacks and an
`ssl.SSLObject` on memory BIOs. asyncio's TLS transport (pure Python since 3.11) costs more per
chunk; here a chunk crosses in one recv, one call into OpenSSL and one send, and OpenSSL's records
for a 256 KiB chunk leave in one send instead of one per 16 KiB record. Backpressure both ways:
while a chunk waits for one socket to drain, the other side is not read. Nothing is ever answered
in plaintext: a connection is piped only after its handshake.
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

try:
    import uvloop
except ImportError:  # Windows
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger("runtime.flight")

_names = itertools.count(1)
_NAME_PREFIX = "rtfront-"  # each backend connection's abstract unix name (see `_connect`)
PEER_PREFIX = "unix-abstract:" + _NAME_PREFIX  # ... and how gRPC reports it
_CHUNK = 256 * 1024  # one read from either side; at most one chunk per direction waits in memory
_LINGER = 1.0  # after our close_notify, how long a client may take to close its side
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
        self._pipes: set[_Pipe] = set()  # handshaken connections still carrying a call
        self._others: set[_Pipe] = set()  # in their handshake, or lingering after the end
        self._no_pipes: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._last_traffic = 0.0  # monotonic time of the last bytes through any pipe

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
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)

    def stop_accepting(self) -> None:
        """Refuse new connections from now on; open ones go on."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._close_listener)

    def is_settled(self, quiet: float) -> bool:
        """From another thread: whether no byte has crossed the front for `quiet` seconds and none
        waits in it, i.e. everything a finished call sent has left for its client."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return True
        return asyncio.run_coroutine_threadsafe(self._settled(quiet), loop).result()

    async def _settled(self, quiet: float) -> bool:
        if time.monotonic() - self._last_traffic < quiet:
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
            for pipe in list(self._pipes | self._others):
                pipe.abort()
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

    async def _shutdown(self, grace: float) -> None:
        self._close_listener()
        for pipe in list(self._others):
            if not pipe.established:
                pipe.abort()
        assert self._no_pipes is not None
        deadline = time.monotonic() + grace
        try:
            await asyncio.wait_for(self._no_pipes.wait(), grace)
        except TimeoutError:
            pass
        while self._others and time.monotonic() < deadline:  # lingering: each ends within _LINGER
            await asyncio.sleep(0.02)
        for pipe in list(self._pipes | self._others):
            pipe.abort()

    def _accept(self) -> None:
        for _ in range(64):  # then let the open connections have a turn
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: pause, as asyncio's own accept loop does
                log.warning("Flight TLS front: cannot accept a connection: %s", e)
                assert self._loop is not None
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(_ACCEPT_RETRY_SECONDS, self._resume_accepting)
                return
            # Sockets bound without proto=IPPROTO_TCP (as the runtime's are) leave Nagle on; small
            # gRPC calls then stall ~40 ms on delayed ACKs.
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            _Pipe(self, conn, _peername(addr)).handshake()

    def _resume_accepting(self) -> None:
        if self._accepting and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _established(self, pipe: _Pipe) -> None:
        self._others.discard(pipe)
        self._pipes.add(pipe)
        if self._no_pipes is not None:
            self._no_pipes.clear()

    def _finished(self, pipe: _Pipe, lingering: bool) -> None:
        self._pipes.discard(pipe)
        if lingering:
            self._others.add(pipe)
        else:
            self._others.discard(pipe)
        if pipe.peer is not None and pipe.peer in self._peers:  # a lingering pipe finishes twice
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


class _Pipe:
    """One client connection: its TCP socket with TLS on memory BIOs, and once the handshake is
    done, its backend socket. Each direction holds at most one chunk that a socket could not take
    whole (`_to_backend` plaintext, `_to_client` ciphertext); while it waits, the other side of
    that direction is not read."""

    def __init__(self, front: FlightTlsFront, sock: socket.socket, name: str) -> None:
        assert front._loop is not None
        self.front = front
        self.loop: asyncio.AbstractEventLoop = front._loop
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = front._ssl_context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.backend: socket.socket | None = None
        self.bfd = -1
        self.peer: str | None = None
        self.established = False
        self.closed = False
        self._to_backend: memoryview | None = None
        self._to_client: memoryview | None = None
        self._backend_done = False  # gRPC closed its side: close once the client has it all
        self._notified = False  # our close_notify is queued
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        front._others.add(self)

    # ------------------------------------------------------------------ handshake

    def handshake(self) -> None:
        self._timer = self.loop.call_later(self.front._handshake_timeout, self._handshake_timed_out)
        self.loop.add_reader(self.fd, self._handshake_step)

    def _handshake_step(self) -> None:
        if not self._receive():
            if not self.closed:
                self._handshake_failed(ConnectionResetError("the client closed the connection"))
            return
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as e:
            self._flush()  # the alert, so the client learns why
            self._handshake_failed(e)
            return
        self._flush()
        self._cancel_timer()
        self.loop.remove_reader(self.fd)  # until the backend is connected
        der = self.tls.getpeercert(binary_form=True)
        identity = ClientIdentity.from_der(der) if der else None
        self.established = True
        self.front._established(self)
        self._connecting = self.loop.create_task(self._connect(identity))

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._handshake_failed(TimeoutError("no handshake within %.1f s" % self.front._handshake_timeout))

    def _handshake_failed(self, e: BaseException) -> None:
        log.debug("Flight TLS handshake with %s failed: %s", self.name, e)
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _connect(self, identity: ClientIdentity | None) -> None:
        name = f"{_NAME_PREFIX}{os.getpid()}-{next(_names)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.setblocking(False)
            await asyncio.wait_for(self.loop.sock_connect(sock, self.front._backend_path), self.front._connect_timeout)
        except (TimeoutError, OSError) as e:
            sock.close()
            log.warning("Flight TLS front: cannot reach the Flight server: %s", e)
            self.abort()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        if self.closed:
            sock.close()
            return
        # Registered before gRPC reads a byte of this connection, so the first call finds it.
        self.peer = f"unix-abstract:{name}"
        self.front._peers[self.peer] = identity
        if self.front._peer_events is not None:
            self.front._peer_events.connected(self.peer, identity)
        self.backend, self.bfd = sock, sock.fileno()
        self.loop.add_reader(self.bfd, self._from_backend)
        self._decrypt()  # the first records may have come with the end of the handshake

    # ------------------------------------------------------------------ client → backend

    def _receive(self) -> bool:
        """Move what the client sent into the TLS object; False once the client has closed."""
        try:
            data = self.sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            log.debug("Flight TLS front: connection from %s lost: %s", self.name, e)
            self.abort()
            return False
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    def _from_client(self) -> None:
        self._receive()
        if not self.closed:
            self._decrypt()

    def _decrypt(self) -> None:
        """Hand what the client sent, decrypted, to the backend in one send (OpenSSL gives one
        record per read), then wait for more from the client or for the backend to drain."""
        pieces: list[bytes] = []
        while True:
            try:
                pieces.append(self.tls.read(_CHUNK))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # the client closed
                if pieces:
                    break  # deliver these first; the next read reports the end again
                self.abort()  # TLS cannot half-close here: gRPC sees its connection end
                return
            except ssl.SSLError as e:
                log.debug("Flight TLS front: connection from %s failed: %s", self.name, e)
                self.abort()
                return
        if pieces:
            self.front._last_traffic = time.monotonic()
            self._send_backend(memoryview(pieces[0] if len(pieces) == 1 else b"".join(pieces)))
        self._flush()  # TLS 1.3 may answer what it read (a key update)
        if self.closed:
            return
        if self._to_backend is None:
            self.loop.add_reader(self.fd, self._from_client)
        else:
            self.loop.remove_reader(self.fd)

    def _send(self, sock: socket.socket, data: memoryview, lost: str) -> int | None:
        """What `sock` took of `data` (0 when full); None when the send failed and the pipe is
        aborted, `lost` being the log line for it."""
        try:
            return sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            log.debug(lost, self.name, e)
            self.abort()
            return None

    def _send_backend(self, data: memoryview) -> None:
        assert self.backend is not None
        sent = self._send(self.backend, data, "Flight TLS front: the Flight server closed the connection from %s: %s")
        if sent is not None and sent < len(data):
            self._to_backend = data[sent:]
            self.loop.add_writer(self.bfd, self._backend_writable)

    def _backend_writable(self) -> None:
        pending, self._to_backend = self._to_backend, None
        self.loop.remove_writer(self.bfd)
        if pending is not None:
            self._send_backend(pending)
        if self._to_backend is None and not self.closed:
            self._decrypt()

    # ------------------------------------------------------------------ backend → client

    def _from_backend(self) -> None:
        assert self.backend is not None
        try:
            data = self.backend.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._backend_finished()
            return
        self.front._last_traffic = time.monotonic()
        try:
            self.tls.write(data)
        except ssl.SSLError as e:
            log.debug("Flight TLS front: connection from %s failed: %s", self.name, e)
            self.abort()
            return
        self._flush()

    def _flush(self) -> None:
        """Send the records the TLS object has produced; what the socket cannot take waits."""
        data = self._outgoing.read()
        if not data or self.closed:
            return
        if self._to_client is not None:  # rare: records produced while a chunk waits
            self._to_client = memoryview(self._to_client.tobytes() + data)
            return
        self._send_client(memoryview(data))

    def _send_client(self, data: memoryview) -> None:
        sent = self._send(self.sock, data, "Flight TLS front: connection from %s lost: %s")
        if sent is not None and sent < len(data):
            self._to_client = data[sent:]
            if self.backend is not None:
                self.loop.remove_reader(self.bfd)
            self.loop.add_writer(self.fd, self._client_writable)

    def _client_writable(self) -> None:
        self.loop.remove_writer(self.fd)
        pending, self._to_client = self._to_client, None
        if pending is not None:
            self._send_client(pending)
        if self.closed or self._to_client is not None:
            return
        if self._notified:
            self._linger()
        elif self._backend_done:
            self._send_close_notify()
        elif self.backend is not None:
            self.loop.add_reader(self.bfd, self._from_backend)

    def _backend_finished(self) -> None:
        """gRPC closed its side: once the client has every byte, send close_notify and close,
        without waiting for the client's own close_notify (gRPC clients do not always send one)."""
        self._backend_done = True
        self.loop.remove_reader(self.bfd)
        if self._to_client is None:
            self._send_close_notify()

    def _send_close_notify(self) -> None:
        self._notified = True
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: the client's close_notify is not awaited
        self._flush()
        if not self.closed and self._to_client is None:
            self._linger()

    def _linger(self) -> None:
        """Everything is sent. Closing with the client's bytes unread would reset the connection,
        which can discard the end of the stream before the client reads it: half-close, read and
        drop until the client closes, for at most _LINGER seconds."""
        self._release_backend()
        self.front._finished(self, lingering=True)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        self.loop.add_reader(self.fd, self._drain_until_closed)
        self._timer = self.loop.call_later(_LINGER, self.abort)

    def _drain_until_closed(self) -> None:
        try:
            if self.sock.recv(_CHUNK):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.abort()

    # ------------------------------------------------------------------ teardown

    def buffered(self) -> int:
        """Bytes accepted from one side and not yet handed to the other side's socket."""
        return (len(self._to_backend) if self._to_backend is not None else 0) + \
            (len(self._to_client) if self._to_client is not None else 0) + self._outgoing.pending

    def _release_backend(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self.backend is not None:
            self.loop.remove_reader(self.bfd)
            self.loop.remove_writer(self.bfd)
            self.backend.close()
            self.backend = None

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        self._release_backend()
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.sock.close()
        self.front._finished(self, lingering=False)
