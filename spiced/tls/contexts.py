"""How a listener's TLS contexts are built: shared by the manager and by the Flight front process,
which mirrors the manager's "flight" contexts from the material the manager sends it.

Each listener gets a long-lived *listener context*, built once; its `sni_callback` (OpenSSL runs it
for every ClientHello, SNI or not) switches the connection to the profile's *current context*,
built afresh from each published certificate/key pair and client CA.

What comes from where during a handshake (measured, OpenSSL 3.0):
  current context  → certificate, key, chain, ALPN, the trust store that verifies client certs
  listener context → verify mode, session cache and tickets, protocol bounds, options, groups
so ALPN is set on the current contexts and everything else on both.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import material, policy
from .material import CaBundle, CertKeyPair

if TYPE_CHECKING:  # spiced.config pulls in the spicepod parser, which the front process never needs
    from ..config import ClientAuthMode

Profile = Literal["http", "flight", "metrics"]
PROFILES: tuple[Profile, ...] = ("http", "flight", "metrics")
ALPN: Mapping[Profile, tuple[str, ...]] = {"http": ("h2", "http/1.1"), "flight": ("h2",), "metrics": ("http/1.1",)}


def verify_mode(profile: Profile, mode: ClientAuthMode) -> ssl.VerifyMode:
    """HTTP enforces `required` with a 401 (so /health stays open); Flight at the handshake; metrics never asks."""
    if mode == "none" or profile == "metrics":
        return ssl.CERT_NONE
    if mode == "required" and profile == "flight":
        return ssl.CERT_REQUIRED
    return ssl.CERT_OPTIONAL


def base_context(profile: Profile, mode: ClientAuthMode) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    policy.harden(ctx)
    ctx.set_alpn_protocols(list(ALPN[profile]))
    ctx.verify_mode = verify_mode(profile, mode)
    return ctx


def current_context(profile: Profile, mode: ClientAuthMode, pair: CertKeyPair, ca: CaBundle | None) -> ssl.SSLContext:
    ctx = base_context(profile, mode)
    material.load_chain_into(ctx, pair)
    if ca is not None:
        ctx.load_verify_locations(cadata=ca.pem)
    return ctx


@dataclass
class HandshakeWatch:
    """Set (in `handshake_watch`) by whoever hands an accepted socket to the event loop's TLS
    transport: a failed handshake's alert is sent on `sock`, and its reason kept in `failure`."""

    sock: socket.socket
    failure: ssl.SSLError | None = None


# The loop's TLS transport runs the handshake in a copy of the context of the task that handed it
# the socket, so a watch set in that task reaches `AlertingSSLObject`.
handshake_watch: ContextVar[HandshakeWatch | None] = ContextVar("handshake_watch", default=None)


class AlertingSSLObject(ssl.SSLObject):
    """An SSLObject whose failed handshake still sends its alert, where a `HandshakeWatch` is set.

    The event loops' TLS transports (asyncio's and uvloop's) close the connection as soon as
    `do_handshake` raises, dropping the alert OpenSSL has just queued: a client without the
    required certificate sees a bare EOF instead of `certificate_required` (which RFC 8446 §4.4.2.4
    says the server MUST send), a foreign one no `unknown_ca`. So the queued bytes are sent on the
    watched socket first. Nothing the transport wrote can be behind them: what OpenSSL queues
    leaves the BIO only through the transport, and the peer's last flight answered its last one."""

    _outgoing: ssl.MemoryBIO

    @classmethod
    def _create(cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any) -> AlertingSSLObject:
        self: AlertingSSLObject = super()._create(incoming, outgoing, *args, **kwargs)  # type: ignore[misc]
        self._outgoing = outgoing
        return self

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            watch = handshake_watch.get()
            if watch is not None:
                watch.failure = e
                alert = self._outgoing.read()
                if alert:
                    with suppress(OSError):
                        watch.sock.send(alert)
            raise


def listener_context(profile: Profile, mode: ClientAuthMode, current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """A listener's context: every handshake switches to `current()` once the ClientHello is in."""
    ctx = base_context(profile, mode)
    ctx.sslobject_class = AlertingSSLObject
    if ctx.verify_mode != ssl.CERT_NONE:
        policy.forbid_resumption(ctx)

    def select(conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _listener: ssl.SSLContext) -> None:
        conn.context = current()

    ctx.sni_callback = select
    return ctx


class ContextMirror:
    """One profile's contexts in a process that does not own the material: the owner's manager sends
    each pair and CA it publishes, and new handshakes use the latest."""

    def __init__(self, profile: Profile, mode: ClientAuthMode, pair: CertKeyPair, ca: CaBundle | None) -> None:
        self._profile = profile
        self._mode = mode
        self._current = current_context(profile, mode, pair, ca)
        self.listener = listener_context(profile, mode, lambda: self._current)

    def publish(self, pair: CertKeyPair, ca: CaBundle | None) -> None:
        self._current = current_context(self._profile, self._mode, pair, ca)  # one assignment
