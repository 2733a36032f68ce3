"""Byte-exact TLS peers for misbehaviour tests: a client whose every record, close_notify, FIN and
reset is sent when the test says so, a gRPC DoGet spoken over it by hand, and `openssl s_client`
for what Python's ssl cannot do (renegotiation, key updates).

    with RawTls.connect(port, client_context(pki, alpn=["h2"])) as conn:   # handshake done
        conn.send(H2_PREFACE)              # application data, encrypted and sent
        record = conn.seal(b"x" * 1000)    # encrypted but not sent: send part of it raw
        conn.sock.sendall(record[:10])
        conn.send_close_notify()           # close_notify only; no FIN
        conn.reset()                       # SO_LINGER 0, close: an RST

    table = GrpcDoGet(conn.send, conn.recv).call(b"SELECT 1 AS one")         # a real Flight DoGet
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pyarrow as pa
import pyarrow.ipc

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0
DOGET_PATH = "/arrow.flight.protocol.FlightService/DoGet"
MAX_WINDOW = 2**31 - 1


def ping_frame(payload: bytes) -> bytes:
    assert len(payload) == 8
    return b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + payload


def ping_ack_frame(payload: bytes) -> bytes:
    return b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + payload


class RawTls:
    """A TLS client on memory BIOs over a blocking TCP socket."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    @classmethod
    def connect(cls, port: int, ctx: ssl.SSLContext, *, timeout: float = 5.0, rcvbuf: int | None = None) -> RawTls:
        """Connected and handshaken; `rcvbuf` (set before connecting) bounds what the kernel takes in."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", port))
            conn = cls(sock, ctx)
            conn.handshake()
        except BaseException:
            sock.close()
            raise
        return conn

    def __enter__(self) -> RawTls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                if not self._pull():
                    raise ConnectionError("the server closed the connection during the handshake") from None
        self.flush()

    def _pull(self) -> bool:
        """One recv into the TLS object; False at EOF."""
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def seal(self, data: bytes) -> bytes:
        """The records carrying `data`, not sent."""
        self.tls.write(data)
        return self.outgoing.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.seal(data))

    def recv(self, timeout: float = 5.0) -> bytes:
        """The next application data (b"" once the server has closed, cleanly or not)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            self.flush()  # a TLS 1.3 key update may want an answer
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no data from the server within {timeout}s")
            self.sock.settimeout(left)
            try:
                if not self._pull():
                    continue  # the read reports the end
            except ConnectionResetError:
                return b""
            except TimeoutError:
                raise TimeoutError(f"no data from the server within {timeout}s") from None

    def recv_until(self, wanted: bytes, timeout: float = 5.0) -> bytes:
        """Application data until it contains `wanted`."""
        deadline = time.monotonic() + timeout
        got = b""
        while wanted not in got:
            chunk = self.recv(max(deadline - time.monotonic(), 0.01))
            if not chunk:
                raise ConnectionError(f"the server closed before sending {wanted!r}; got {got[:200]!r}")
            got += chunk
        return got

    def send_close_notify(self) -> None:
        """Our close_notify, and nothing else: the socket stays open both ways."""
        try:
            self.tls.unwrap()  # OpenSSL writes our close_notify, then looks for the server's
        except ssl.SSLWantReadError:
            pass  # the server's close_notify has not come yet; it is not awaited here
        except ssl.SSLError as e:
            if e.reason != "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
                raise
            # records the server sent before it saw ours were already in; ours is written all the same
        self.flush()

    def reset(self) -> None:
        """Close with an RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def wait_server_closed(self, timeout: float) -> bytes:
        """Read the raw socket until the server closes its side (FIN or RST); returns the raw bytes
        read. Fails if the server keeps it open for `timeout` seconds."""
        return wait_closed(self.sock, timeout)


def wait_closed(sock: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server kept the connection open for {timeout}s (it sent {len(got)} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return got
        except TimeoutError:
            continue
        if not chunk:
            return got
        got += chunk


def client_hello(ctx: ssl.SSLContext, server_hostname: str = "localhost") -> bytes:
    """The first flight a real client sends: its ClientHello record(s)."""
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# ---------------------------------------------------------------------- gRPC DoGet by hand


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_fields(message: bytes) -> Iterator[tuple[int, bytes]]:
    """The length-delimited fields of a protobuf message (FlightData has no others that matter)."""
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, i = _varint(message, i)
            yield field, message[i:i + n]
            i += n
        elif wire == 0:
            _, i = _varint(message, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


def ticket_message(sql: bytes) -> bytes:
    """A length-prefixed gRPC message carrying `Ticket{ticket: sql}`."""
    body = b"\x0a" + _encode_varint(len(sql)) + sql
    return b"\x00" + struct.pack(">I", len(body)) + body


def flight_data_to_table(payload: bytes) -> pa.Table:
    """A DoGet response body (gRPC messages of FlightData) as the Arrow table it carries."""
    stream = bytearray()
    i = 0
    while i < len(payload):
        compressed, length = payload[i], struct.unpack(">I", payload[i + 1:i + 5])[0]
        assert compressed == 0, "compressed gRPC messages are not expected"
        fields = dict(_bytes_fields(payload[i + 5:i + 5 + length]))
        i += 5 + length
        header, body = fields.get(2, b""), fields.get(1000, b"")
        if header:
            pad = (-len(header)) % 8
            stream += b"\xff\xff\xff\xff" + struct.pack("<i", len(header) + pad) + header + b"\x00" * pad + body
    stream += b"\xff\xff\xff\xff\x00\x00\x00\x00"
    return pa.ipc.open_stream(bytes(stream)).read_all()


class GrpcDoGet:
    """One HTTP/2 connection, spoken with `h2` over any byte pipe (`send`, and `recv(timeout)`
    returning b"" at the end), carrying Flight DoGet calls."""

    def __init__(self, send: Callable[[bytes], None], recv: Callable[[float], bytes], *,
                 open_window: bool = False) -> None:
        """`open_window`: grant the server the largest windows HTTP/2 allows at once (2 GiB on the
        connection and on every stream), so that only the transport can hold its data back."""
        self._send, self._recv = send, recv
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        if open_window:
            self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        self.h2.initiate_connection()
        if open_window:
            self.h2.increment_flow_control_window(MAX_WINDOW - 65535)
        self.received = 0  # response body bytes so far, every stream
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self._send(data)

    def start(self, sql: bytes) -> int:
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream, [(":method", "POST"), (":scheme", "https"), (":path", DOGET_PATH),
                                      (":authority", "localhost"), ("content-type", "application/grpc"),
                                      ("te", "trailers")])
        self.h2.send_data(stream, ticket_message(sql), end_stream=True)
        self._flush()
        return stream

    def pump(self, timeout: float) -> list[h2.events.Event]:
        """Read once from the pipe; the events it brought (flow control is granted as data arrives)."""
        data = self._recv(timeout)
        if not data:
            raise ConnectionError("the connection ended")
        events = self.h2.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.received += len(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self._flush()
        return events

    def call(self, sql: bytes, timeout: float = 10.0) -> pa.Table:
        """A whole DoGet: the table it returns; fails unless grpc-status is 0."""
        stream = self.start(sql)
        deadline = time.monotonic() + timeout
        body = bytearray()
        trailers: dict[str, str] = {}
        done = False
        while not done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DoGet not answered within {timeout}s")
            for event in self.pump(left):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                elif isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)) \
                        and event.stream_id == stream:
                    trailers.update(dict(event.headers))  # type: ignore[arg-type]
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise ConnectionError(f"DoGet ended by {event}")
        assert trailers.get("grpc-status") == "0", f"DoGet failed: {trailers}"
        return flight_data_to_table(bytes(body))


# ---------------------------------------------------------------------- openssl s_client


class SClient:
    """`openssl s_client` connected to 127.0.0.1:port, its stdin writable, its stdout (application
    data, with -brief) and stderr (summary, command echoes) collected as they come."""

    def __init__(self, port: int, ca: Path, *args: str, msgfile: Path | None = None) -> None:
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                "-CAfile", str(ca), "-verify_return_error", "-alpn", "h2", *args]
        if msgfile is not None:
            argv += ["-msg", "-msgfile", str(msgfile)]
        self.msgfile = msgfile
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._out = bytearray()
        self._err = bytearray()
        self._taken = 0  # how much of stdout `recv` has handed out
        self._cond = threading.Condition()
        self._open = 2
        for pipe, buf in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            threading.Thread(target=self._collect, args=(pipe, buf), daemon=True).start()

    def _collect(self, pipe: object, buf: bytearray) -> None:
        read = pipe.read1  # type: ignore[attr-defined]
        while chunk := read(65536):
            with self._cond:
                buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def __enter__(self) -> SClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def out(self) -> bytes:
        with self._cond:
            return bytes(self._out)

    @property
    def err(self) -> str:
        with self._cond:
            return self._err.decode(errors="replace")

    def messages(self) -> str:
        """The -msg trace so far (s_client flushes it as it goes)."""
        assert self.msgfile is not None
        return self.msgfile.read_text(errors="replace") if self.msgfile.exists() else ""

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def command(self, letter: str) -> None:
        """An s_client command ("R", "K", "k", "Q"): a line holding just that letter."""
        self.write(letter.encode() + b"\n")

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"s_client: no {what} within {timeout}s; "
                                         f"stderr:\n{self._err.decode(errors='replace')}")
                self._cond.wait(min(left, 0.1))

    def wait_err(self, text: str, timeout: float = 5.0) -> None:
        self.wait(lambda: text in self._err.decode(errors="replace"), timeout, repr(text))

    def wait_out(self, data: bytes, timeout: float = 5.0) -> None:
        self.wait(lambda: data in self._out, timeout, repr(data))

    def wait_exit(self, timeout: float = 5.0) -> int:
        self.proc.wait(timeout)
        self.wait(lambda: self._open == 0, timeout, "end of output")
        return self.proc.returncode

    def recv(self, timeout: float) -> bytes:
        """Stdout not handed out yet (b"" once s_client has exited and everything was taken)."""
        with self._cond:
            deadline = time.monotonic() + timeout
            while len(self._out) == self._taken and self._open:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no output from s_client within {timeout}s")
                self._cond.wait(left)
            data = bytes(self._out[self._taken:])
            self._taken = len(self._out)
            return data

    def kill(self) -> None:
        """End s_client without a close_notify: the kernel closes its socket (FIN, or RST with unread data)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

