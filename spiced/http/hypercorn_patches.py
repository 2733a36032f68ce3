"""What Hypercorn 0.18 gets wrong or leaves out for this runtime, mended by subclassing three of its
internals, and `install()`, which puts the subclasses in place and checks the Hypercorn version first.

Hypercorn gives an ASGI app no way to reach the transport, so `_TlsAwareTCPServer` replaces its
connection handler (`hypercorn.asyncio.run.TCPServer`, looked up at call time): it reads the
finished handshake and sets the connection's `TlsInfo` (spiced/http/tls_info.py) before the
connection's tasks start. The same subclass sets TCP_NODELAY and tolerates the TLS error of closing
on a client that is still sending.

Slow and withholding clients showed more that Hypercorn alone gets wrong: a connection it closes
waits 30 s for a close_notify that many clients never send (`_release_after_close_notify`), one it
cancels at the drain bound can hang the exit (`_read_data`), an h2 stream out of flow control credit
buffers its whole response (`_StreamBuffer`), DATA that outlives its stream kills the connection
(`_H2Protocol`), and a client that stops taking its response holds it, and its query, forever
(SEND_STALL_SECONDS). tests/test_http_identity.py guards the TLS facts over h11 and h2,
tests/test_slowloris_h2.py, tests/test_http_tls_close.py and tests/test_http_send_stall.py the rest.

These are Hypercorn's internals, so `install()` refuses any Hypercorn but the one they were written
against (pinned in pyproject.toml): an upgrade fails at startup, not mid-connection.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.metadata
import logging
import socket
import ssl
import struct
import sys
import termios
import time
from contextlib import suppress
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import hypercorn.asyncio.run
import hypercorn.protocol
import hypercorn.protocol.h2
import priority  # Hypercorn's h2 stream scheduler
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER, BufferCompleteError, H2Protocol, StreamBuffer

from .tls_info import TlsInfo, tls_info

log = logging.getLogger("runtime.http")

HYPERCORN_VERSION = "0.18.0"
# How long a connection we close may wait for the client's TLS close_notify once all we sent has
# left; asyncio's own bound (ssl_shutdown_timeout) counts from the close, sending included.
CLOSE_NOTIFY_GRACE = 1.0
SSL_SHUTDOWN_TIMEOUT = 30.0
# A response that makes no progress this long is cut: a connection whose client acknowledged no
# byte (HTTP/1.1, or h2 at the TCP level), an h2 stream whose client granted no flow-control
# credit. Such a reader (slow-read attack) would otherwise hold its query and buffers for as long
# as it likes. 60 s, as nginx's send_timeout.
SEND_STALL_SECONDS = 60.0
HEAD_HOLD_LIMIT = 16384
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None  # == SIOCOUTQ


class _TlsAwareTCPServer(TCPServer):
    _dropped = False  # set when the connection is dropped at the drain bound
    _tls_layers: tuple[Any, Any] = (None, None)  # asyncio's SSLProtocol and the TCP transport under it
    _releaser: asyncio.Task[None] | None = None
    _head: bytes | None = None  # an HTTP/1.1 response head waiting for its body (protocol_send)

    async def run(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP; without it a
            # response written in two parts waits ~40 ms for the client's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            tls_info.set(TlsInfo.from_ssl_object(ssl_object))
            # Kept now: asyncio drops these references when the connection closes (twice).
            ssl_protocol = getattr(self.writer.transport, "_ssl_protocol", None)
            self._tls_layers = (ssl_protocol, getattr(ssl_protocol, "_transport", None))
        try:
            await super().run()
        except asyncio.CancelledError:
            if not self._dropped:
                raise
            # Dropped at the drain bound (below), and so ended: returning rather than ending as
            # cancelled spares the log asyncio 3.11's "Exception in callback" (its
            # client_connected_cb callback asks a cancelled task for its exception).

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        except asyncio.CancelledError:
            # Cancelled past the drain bound (worker_serve gives up on the connections still open).
            # Each task of the connection must end before it does, but one blocked writing to a
            # client that stopped reading never did, and the process never exited; and asyncio
            # would wait up to 30 s (ssl_shutdown_timeout) for a close_notify the client never
            # sends. Dropping the connection now ends them all at once.
            self._dropped = True
            self.writer.transport.abort()
            raise

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated) and self._dropped:
            # After the drop, each h2 stream's app still reports its end, which would restart the
            # idle timer in a task group already shutting down (RuntimeError, then an unhandled
            # exception in the log for the connection). No timer is needed any more.
            return
        if not isinstance(event, RawData):
            self._flush_head()
            await super().protocol_send(event)
            return
        data = event.data
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(b"HTTP/1.1 ") and len(data) < HEAD_HOLD_LIMIT:
            # A response head: held until the body's first bytes, written in this same turn of the
            # loop, so that both leave in one TLS record and one send; else sent on the next turn.
            self._head = data
            self.loop.call_soon(self._flush_head)
            return
        async with self.send_lock:  # Hypercorn's own RawData path, with the stall bound
            try:
                self.writer.write(data)
                await self._drain()
            except (ConnectionError, RuntimeError):
                await self.protocol.handle(Closed())
            except TimeoutError:
                log.debug("Dropped a connection whose client took nothing for %.0f s", SEND_STALL_SECONDS)
                self.writer.transport.abort()
                await self.protocol.handle(Closed())

    async def _drain(self) -> None:
        """`writer.drain()`, or TimeoutError once the client has taken nothing for
        SEND_STALL_SECONDS. Nothing is added while this waits (the send lock is held), so any
        shrinking of the buffers is the client taking bytes, however slowly."""
        if self.writer.transport.get_write_buffer_size() == 0:
            await self.writer.drain()  # nothing waits to go out: returns at once, without a timer task
            return
        left, last_taken = self._buffered(), time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self.writer.drain(), 1.0)
                return
            except TimeoutError:
                now, size = time.monotonic(), self._buffered()
                if size < left:
                    left, last_taken = size, now
                elif now - last_taken > SEND_STALL_SECONDS:
                    raise

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self.writer.transport.is_closing():
            self.writer.write(head)

    def _buffered(self) -> int:
        """Bytes written and not yet acknowledged by the client: asyncio's buffers and the kernel's
        send queue. The kernel's counts too: it wakes asyncio only once a good part of a large send
        buffer is free, so a slow reader's progress shows there first."""
        ssl_protocol, tcp = self._tls_layers
        if ssl_protocol is not None and tcp is not None:
            size = _tls_unsent(ssl_protocol, tcp)
        else:
            size = self.writer.transport.get_write_buffer_size()
        sock = self.writer.get_extra_info("socket")
        if _SIOCOUTQ is not None and sock is not None:
            with suppress(OSError):
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
        return size

    async def _close(self) -> None:
        # Closed by the protocol (`Connection: close`, a request it refused): as below, asyncio
        # would hold the socket up to 30 s for the client's close_notify.
        if not self._dropped:
            self._release_after_close_notify()
        try:
            await super()._close()
        except ssl.SSLError:
            # Closing TLS while the client is still sending (a request body the app answered, e.g.
            # with a 401, without reading) ends in APPLICATION_DATA_AFTER_CLOSE_NOTIFY. Hypercorn
            # expects only plain socket errors here and would report it as an app error; the
            # connection is closed either way.
            pass


    async def _initiate_server_close(self) -> None:
        await super()._initiate_server_close()
        if self.context.terminated.is_set():
            # An idle keep-alive connection closed for shutdown: its client is not reading, so it
            # never answers TLS close_notify, and waiting for that would hold the exit for the
            # whole drain bound. Nothing is in flight on it, so dropping it loses nothing.
            self.writer.transport.abort()
        else:
            # Closed by the keep-alive timeout (nothing in flight; for h2, no stream open).
            self._release_after_close_notify()

    def _release_after_close_notify(self) -> None:
        """After our close_notify, asyncio waits up to 30 s (ssl_shutdown_timeout) for the
        client's, which a slow-loris client, and many an ordinary one, never sends: each such
        connection was held 30 s. Once all we wrote has reached the kernel, the client gets
        CLOSE_NOTIFY_GRACE to answer, then the socket is closed."""
        ssl_protocol, tcp = self._tls_layers
        if ssl_protocol is not None and tcp is not None and self._releaser is None:
            self._releaser = self.loop.create_task(_release_when_delivered(ssl_protocol, tcp))


def _tls_unsent(ssl_protocol: Any, tcp: asyncio.WriteTransport) -> int:
    """What asyncio holds of a TLS connection's output: not yet encrypted (its TLS layer) and
    encrypted but not yet taken by the kernel (the TCP transport under it)."""
    return int(ssl_protocol._get_write_buffer_size()) + tcp.get_write_buffer_size()


async def _release_when_delivered(ssl_protocol: Any, tcp: asyncio.WriteTransport) -> None:
    # (Where a Python's internals differ and these layers are not found, the caller does not
    # start this, and asyncio's own 30 s bound stays in place.)
    give_up = time.monotonic() + SSL_SHUTDOWN_TIMEOUT
    while _tls_unsent(ssl_protocol, tcp) > 0 and time.monotonic() < give_up:
        await asyncio.sleep(0.05)
    await asyncio.sleep(CLOSE_NOTIFY_GRACE)
    tcp.abort()  # a no-op once the client's close_notify has closed it


class _StreamBuffer(StreamBuffer):
    """An h2 stream's response buffer that resumes the app only once it has drained.

    Hypercorn resumes the app when the chunk just popped is small, not when the buffer is. On a
    stream whose flow-control window is spent (a client that stops granting credit), every push
    wakes the sender, which pops 0 bytes and so resumes the app at once: the whole response piled
    up in memory (GBs for a few large results). Here the app waits until less than the low-water
    mark is left, so a stalled stream holds at most about one pushed chunk."""

    _last_taken = 0.0  # monotonic time the client last took bytes of this stream

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise BufferCompleteError()
        self.buffer.extend(data)
        await self._is_empty.clear()
        if len(self.buffer) >= BUFFER_HIGH_WATER:
            await self._wait_for_client(self._paused)
            await self._paused.clear()

    async def drain(self) -> None:
        await self._wait_for_client(self._is_empty)

    async def _wait_for_client(self, event: Any) -> None:
        """The stall bound: StreamStalled once the client has taken nothing of this stream for
        SEND_STALL_SECONDS while the app waits on it."""
        if event.is_set():
            return
        self._last_taken = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(event.wait(), 1.0)
                return
            except TimeoutError:
                if time.monotonic() - self._last_taken > SEND_STALL_SECONDS:
                    raise StreamStalled from None

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if data:
            self._last_taken = time.monotonic()
        if len(self.buffer) < BUFFER_LOW_WATER:
            await self._paused.set()
        if len(self.buffer) == 0:
            await self._is_empty.set()
        return data


class StreamStalled(Exception):
    pass


class _H2Protocol(H2Protocol):
    async def stream_send(self, event: StreamEvent) -> None:
        try:
            await super().stream_send(event)
        except StreamStalled:
            # The client granted no credit for this stream for SEND_STALL_SECONDS: reset it
            # (CANCEL), free its buffer, and tell the app the client is gone, which ends its query.
            # The connection and its other streams go on.
            log.debug("Reset h2 stream %d: its client took nothing for %.0f s", event.stream_id, SEND_STALL_SECONDS)
            buffer = self.stream_buffers.pop(event.stream_id, None)
            if buffer is not None:
                await buffer.close()
            with suppress(priority.MissingStreamError):
                self.priority.remove_stream(event.stream_id)
            with suppress(h2.exceptions.ProtocolError):
                self.connection.reset_stream(event.stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
                await self._flush()
            await self._close_stream(event.stream_id)

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        # Hypercorn forgets a stream once its app has answered, yet looks up the stream of every
        # DATA frame: a client still sending the body (trickling past its 408, or posting to a
        # route that answers without reading, e.g. a 401) raised KeyError out of the connection,
        # logged as an unhandled exception, and every other stream on it was cut. That DATA is
        # dropped instead, its flow-control credit returned so the connection window stays open.
        # The events are handed over one at a time as a stream can end while one is handled.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                await super()._handle_events([event])
        await self._flush()


class HypercornMismatch(RuntimeError):
    pass


def install() -> None:
    """Put the subclasses in place of Hypercorn's own (idempotent); HypercornMismatch if the installed
    Hypercorn is not the version they extend."""
    found = importlib.metadata.version("hypercorn")
    if found != HYPERCORN_VERSION:
        raise HypercornMismatch(
            f"Hypercorn {found} is installed; spiced extends the internals of Hypercorn {HYPERCORN_VERSION} "
            f"(spiced/http/hypercorn_patches.py): install hypercorn=={HYPERCORN_VERSION}")
    hypercorn.asyncio.run.TCPServer = _TlsAwareTCPServer  # type: ignore[attr-defined,misc]
    hypercorn.protocol.H2Protocol = _H2Protocol  # type: ignore[misc]  # looked up by ProtocolWrapper
    hypercorn.protocol.h2.StreamBuffer = _StreamBuffer  # type: ignore[misc]  # looked up by H2Protocol
