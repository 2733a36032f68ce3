"""The TLS profile every listener serves: Mozilla "intermediate", plus the resumption rules of
client-auth listeners.

Python's `ssl` cannot set a *list* of key-exchange groups (`set_ecdh_curve` sets one) nor turn off
the server's TLS 1.2 session-ID cache. Both are one `SSL_CTX_ctrl` call in the libssl that `_ssl`
is linked against, made here through ctypes. The `SSL_CTX*` is read from the `SSLContext` object
and checked (its options must read back equal to `ctx.options`) before anything is changed; where
that is not possible the fallbacks below keep the profile safe, if narrower.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import ssl
import sys
from functools import cache

log = logging.getLogger("runtime.tls")

# Mozilla intermediate (TLS 1.2 part). TLS 1.3 suites are OpenSSL's defaults, which match the profile.
# The DHE suites of the profile are left out: without DH parameters OpenSSL never picks them anyway.
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
INTERMEDIATE_GROUPS = "X25519:P-256:P-384"
FALLBACK_CURVE = "prime256v1"  # when the group list cannot be set: one allowed curve rather than five

_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_SESS_CACHE_OFF = 0


class _LibSsl:
    """`SSL_CTX_ctrl` on the `SSL_CTX` behind a Python `SSLContext`."""

    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # dlsym through it finds the libssl `_ssl` itself uses
        self._ctrl = lib.SSL_CTX_ctrl
        self._ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self._ctrl.restype = ctypes.c_long
        self._get_options = lib.SSL_CTX_get_options
        self._get_options.argtypes = [ctypes.c_void_p]
        self._get_options.restype = ctypes.c_uint64

    def ssl_ctx(self, ctx: ssl.SSLContext) -> int:
        # CPython's PySSLContext starts with PyObject_HEAD followed by `SSL_CTX *ctx`.
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or self._get_options(ptr) != int(ctx.options):
            raise RuntimeError("SSLContext layout not recognised")
        return ptr

    def ctrl(self, ctx: ssl.SSLContext, cmd: int, larg: int, parg: bytes | None) -> int:
        return int(self._ctrl(self.ssl_ctx(ctx), cmd, larg, parg))


@cache
def _libssl() -> _LibSsl | None:
    if platform.python_implementation() != "CPython" or ssl.OPENSSL_VERSION_INFO < (3,) or sys.version_info >= (3, 15):
        return None
    try:
        return _LibSsl()
    except (OSError, AttributeError):
        return None


def native_controls() -> bool:
    """Whether the group list and the session cache can be set (true on CPython with OpenSSL 3)."""
    lib = _libssl()
    if lib is None:
        return False
    try:
        lib.ssl_ctx(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    except RuntimeError:
        return False
    return True


def harden(ctx: ssl.SSLContext) -> None:
    """TLS 1.2+ only, intermediate ciphers and groups, no compression, no renegotiation."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    if not _set_groups(ctx, INTERMEDIATE_GROUPS):
        ctx.set_ecdh_curve(FALLBACK_CURVE)


def _set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    lib = _libssl()
    if lib is None:
        return False
    try:
        return lib.ctrl(ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) == 1
    except RuntimeError:
        return False


def forbid_resumption(ctx: ssl.SSLContext) -> None:
    """Make every connection to a client-auth listener verify its certificate in full.

    A resumed session skips client-certificate verification, so after a client-CA change a client
    of the removed CA could come back on its old session. TLS 1.3: no tickets are issued. TLS 1.2:
    no tickets and no session-ID cache; if the cache cannot be switched off, TLS 1.2 is refused on
    this listener instead. These settings stay with the listener context across the SNI swap.
    """
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    lib = _libssl()
    try:
        if lib is not None:
            lib.ctrl(ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
            return
    except RuntimeError:
        pass
    log.debug("TLS session cache cannot be disabled here; client-auth listeners require TLS 1.3")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
