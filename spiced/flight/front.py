"""The Flight TLS front: terminates TLS with the manager's "flight" context and pipes each
connection byte-for-byte to the plaintext pyarrow Flight server on a private unix socket.

pyarrow's Flight server cannot reload certificates, request optional client certificates or show
a handler the peer certificate; the front gives all three (notes §9). Identity: each backend
connection is bound to a unique abstract unix name before connecting, so gRPC reports
`context.peer() == "unix-abstract:<name>"` on the backend and `identity_for(peer)` finds the
certificate that verified during this connection's handshake.

One asyncio loop on its own thread runs every connection: Protocol callbacks, no per-connection
tasks after setup, and backpressure both ways (a full write buffer on one side pauses reading on
the other). Nothing is ever answered in plaintext: a connection is piped only after its handshake.
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
from typing import Any

from ..identity import ClientIdentity

log = logging.getLogger("runtime.flight")

_names = itertools.count(1)
_WRITE_HIGH_WATER = 1024 * 1024  # per direction; beyond this the other side stops reading


class FlightTlsFront:
    def __init__(self, sock: socket.socket, backend_path: str, ssl_context: ssl.SSLContext, *,
                 handshake_timeout: float = 10.0, connect_timeout: float = 10.0) -> None:
        self._sock = sock
        self._backend_path = backend_path
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._connect_timeout = connect_timeout
        self._peers: dict[str, ClientIdentity | None] = {}
        self._pipes: set[_ClientSide] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._no_pipes: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
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
        if loop is not None and self._server is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._server.close)

    async def settled(self, quiet: float) -> bool:
        """From any loop: whether no byte has crossed the front for `quiet` seconds and none waits
        in a write buffer, i.e. everything a finished call sent has left for its client."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return True
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._settled(quiet), loop))

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
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_log_loop_error)
        self._loop = loop
        self._no_pipes = asyncio.Event()
        self._no_pipes.set()
        try:
            self._server = loop.run_until_complete(loop.create_server(lambda: _Accepted(self), sock=self._sock))
        except BaseException as e:
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for pipe in list(self._pipes):
                pipe.abort()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, asyncio.sleep(0), return_exceptions=True))
            loop.close()

    async def _shutdown(self, grace: float) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handshakes):
            task.cancel()
        assert self._no_pipes is not None
        try:
            await asyncio.wait_for(self._no_pipes.wait(), grace)
        except TimeoutError:
            pass
        for pipe in list(self._pipes):
            pipe.abort()

    def _start_handshake(self, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._handshakes.add(task)  # a reference, so the task cannot be collected mid-handshake
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        # TLS is started by hand (not `create_server(ssl=...)`) so that a failed handshake can be
        # logged at DEBUG with its reason; asyncio drops those silently.
        pipe = _ClientSide(self)
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, pipe, self._ssl_context, server_side=True, ssl_handshake_timeout=self._handshake_timeout)
        except (TimeoutError, OSError, ssl.SSLError, RuntimeError) as e:
            log.debug("Flight TLS handshake with %s failed: %s", _peername(transport), e)
            transport.abort()
            return
        if tls is None or pipe.closed:
            return
        assert isinstance(tls, asyncio.Transport)
        pipe.tcp = transport
        pipe.connection_made(tls)

    def _opened(self, pipe: _ClientSide) -> None:
        self._pipes.add(pipe)
        if self._no_pipes is not None:
            self._no_pipes.clear()

    def _closed(self, pipe: _ClientSide) -> None:
        self._pipes.discard(pipe)
        if pipe.peer is not None:
            self._peers.pop(pipe.peer, None)
        if not self._pipes and self._no_pipes is not None:
            self._no_pipes.set()


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Resets and aborted connections are routine on a public port: DEBUG, as upstream.
    log.debug("Flight TLS front: %s", context.get("message"), exc_info=context.get("exception"))


def _peername(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class _Accepted(asyncio.Protocol):
    """A new TCP connection, before TLS: hands it to the handshake."""

    def __init__(self, front: FlightTlsFront) -> None:
        self.front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP, which a socket
        # bound with `socket.socket()` is not; without it small gRPC calls stall on delayed ACKs.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.pause_reading()
        self.front._start_handshake(transport)


class _ClientSide(asyncio.Protocol):
    """The TLS side of one connection. `connection_made` is called by the front once the handshake
    has completed; the first decrypted bytes can arrive just before it and are kept until then."""

    def __init__(self, front: FlightTlsFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self.peer: str | None = None
        self.closed = False
        self._early: list[bytes] = []
        self._connecting: asyncio.Task[None] | None = None
        self.tcp: asyncio.Transport | None = None  # under the TLS transport
        self._closing: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()  # until the backend is connected
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        identity = ClientIdentity.from_der(der) if der else None
        self.front._opened(self)
        self._connecting = asyncio.get_running_loop().create_task(self._connect(identity))

    async def _connect(self, identity: ClientIdentity | None) -> None:
        loop = asyncio.get_running_loop()
        name = f"rtfront-{os.getpid()}-{next(_names)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, self.front._backend_path), self.front._connect_timeout)
            # Registered before gRPC can see the connection, so the first call finds it.
            self.peer = f"unix-abstract:{name}"
            self.front._peers[self.peer] = identity
            backend, _ = await loop.create_unix_connection(lambda: _BackendSide(self), sock=sock)
        except (TimeoutError, OSError) as e:
            sock.close()
            log.warning("Flight TLS front: cannot reach the Flight server: %s", e)
            self.abort()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        assert isinstance(backend, asyncio.Transport)
        backend.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.backend = backend
        if self.closed:
            backend.close()
            return
        if self._early:
            backend.write(b"".join(self._early))
            self._early.clear()
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.front._last_traffic = time.monotonic()
        if self.backend is not None:
            self.backend.write(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        return False  # asyncio's TLS transport cannot half-close; connection_lost closes the backend

    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self.backend is not None:
            self.backend.close()  # flushes what is buffered first
        self.front._closed(self)

    def backend_closed(self) -> None:
        """gRPC closed its side: send what is buffered and a close_notify, then close the socket
        once the kernel has every byte, without waiting for the client's close_notify (asyncio
        would wait up to 30 s for it, and gRPC clients do not always send one)."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.close()
        self._closing = asyncio.get_running_loop().create_task(self._close_when_sent())

    async def _close_when_sent(self) -> None:
        assert self.transport is not None
        while not self.closed and (self.transport.get_write_buffer_size()
                                   + (self.tcp.get_write_buffer_size() if self.tcp is not None else 0)) > 0:
            await asyncio.sleep(0.05)
        if not self.closed:
            self.transport.abort()  # a plain close(2): the kernel still delivers what it holds

    def buffered(self) -> int:
        """Bytes accepted from one side and not yet handed to the other side's socket."""
        total = 0
        for t in (self.transport, self.backend):
            try:
                total += t.get_write_buffer_size() if t is not None else 0
            except (AttributeError, RuntimeError):  # torn down: nothing left to send
                pass
        return total

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.backend is not None:
            self.backend.abort()


class _BackendSide(asyncio.Protocol):
    """The plaintext side of one connection, towards the Flight server."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.front._last_traffic = time.monotonic()
        if self.client.transport is not None:
            self.client.transport.write(data)

    def eof_received(self) -> bool:
        return False  # closing the TLS side follows in connection_lost

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_closed()
