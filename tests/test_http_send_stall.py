"""SEND_STALL_SECONDS (spiced/http/hypercorn_patches.py): a client that stops taking its response loses it
once the bound has passed, and its query ends. HTTP/1.1: the connection is dropped. h2: the
stream is reset (CANCEL) while the connection and its other streams go on. In-process Hypercorn
with the bound set to 1 s; the clients are raw sockets that simply stop reading."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from spiced.http import hypercorn_patches
from tests.http_rig import ApiServer, api_server, make_state, sample_value
from tests.support import write_pod
from tests.tlsprobe import LoopThread, wait_for

BIG = b"SELECT value, 'padding-padding-padding-padding' AS p FROM generate_series(1, 20000000)"  # ~1 GB of CSV


@pytest.fixture
def api(loop: LoopThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    monkeypatch.setattr(hypercorn_patches, "SEND_STALL_SECONDS", 1.0)
    with api_server(loop, make_state(write_pod(tmp_path))) as s:
        yield s


def active(api: ApiServer) -> float:
    return sample_value(api.state.metrics.exposition().body.decode(), "query_active_count", protocol="http")


def test_an_http1_client_that_stops_reading_is_dropped_and_its_query_ends(api: ApiServer) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.connect(("127.0.0.1", api.port))
        s.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nAccept: text/csv\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(BIG), BIG))
        assert s.recv(16).startswith(b"HTTP/1.1 200")
        wait_for(lambda: active(api) == 1, timeout=5)
        waited = wait_for(lambda: active(api) == 0, timeout=15)  # without ever reading again
        assert waited < 8
        s.settimeout(10)
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
                assert received < 100_000_000, "the response went on"
        except ConnectionResetError:
            pass
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as other:
        other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert other.recv(64).startswith(b"HTTP/1.1 200")


def test_an_http1_client_that_reads_slowly_keeps_its_response(api: ApiServer) -> None:
    # 32 KB/s: a single write (a batch of CSV, hundreds of KB) takes far longer than the bound to
    # leave, but the client keeps taking bytes, so nothing is cut.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.connect(("127.0.0.1", api.port))
        s.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nAccept: text/csv\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(BIG), BIG))
        received = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            chunk = s.recv(16 * 1024)
            assert chunk, f"cut after {received} bytes"
            received += len(chunk)
            time.sleep(0.5)
        assert active(api) == 1


class H2c:
    """An h2 client (prior knowledge, plaintext) that grants connection credit but, for the streams
    in `withheld`, no stream credit: those stall once the initial 64 KiB window is spent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=0.2)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.withheld: set[int] = set()
        self.events: list[h2.events.Event] = []
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "x")]
        self.conn.send_headers(sid, headers, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def pump(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                if event.stream_id in self.withheld:
                    self.conn.increment_flow_control_window(event.flow_controlled_length)  # connection only
                else:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()

    def until(self, found: type[h2.events.Event], stream_id: int, timeout: float) -> h2.events.Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if isinstance(event, found) and getattr(event, "stream_id", None) == stream_id:
                    return event
            self.pump()
        raise AssertionError(f"no {found.__name__} on stream {stream_id} within {timeout}s")


def test_an_h2_stream_without_credit_is_reset_and_the_connection_goes_on(api: ApiServer) -> None:
    client = H2c(api.port)
    try:
        stalled = client.conn.get_next_available_stream_id()
        client.withheld.add(stalled)
        assert client.request("POST", "/v1/sql", BIG) == stalled
        client.until(h2.events.ResponseReceived, stalled, timeout=10)
        start = time.monotonic()
        reset = client.until(h2.events.StreamReset, stalled, timeout=15)
        assert isinstance(reset, h2.events.StreamReset) and reset.error_code == h2.errors.ErrorCodes.CANCEL
        assert time.monotonic() - start < 8
        wait_for(lambda: active(api) == 0, timeout=5)
        health = client.request("GET", "/health")
        response = client.until(h2.events.ResponseReceived, health, timeout=10)
        assert isinstance(response, h2.events.ResponseReceived) and dict(response.headers)[":status"] == "200"
    finally:
        client.sock.close()


def test_an_h2_stream_granted_credit_slowly_keeps_its_response(api: ApiServer) -> None:
    client = H2c(api.port)
    try:
        slow = client.conn.get_next_available_stream_id()
        client.withheld.add(slow)
        client.request("POST", "/v1/sql", BIG)
        client.until(h2.events.ResponseReceived, slow, timeout=10)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # 16 KiB of credit every half second
            client.conn.increment_flow_control_window(16 * 1024, stream_id=slow)
            client.flush()
            time.sleep(0.5)
            client.pump()
        assert not any(isinstance(e, h2.events.StreamReset) for e in client.events)
        assert active(api) == 1
    finally:
        client.sock.close()
