"""The one TLS manager: per-listener contexts, validated reloads, one atomic swap, the counter.

A reload never touches a live context: it validates the new files on scratch contexts, composes
new-if-valid-else-last-good for the cert/key pair and for the client CA independently, builds a
fresh current context for every profile (see `contexts`), and publishes them with one assignment.
Handshakes in flight finish on what they hold; open connections keep their material. Subscribers
(the Flight front process) hear of each publication and mirror it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable, Mapping

from ..config import ClientAuthMode, MaterialSource, TlsSettings
from ..errors import MaterialError, ReloadResult, TlsConfigError
from ..metrics import Metrics
from . import contexts, material
from .contexts import PROFILES, Profile
from .expiry import CertificateFacts, ExpiryMonitor, facts_of
from .material import CaBundle, CertKeyPair
from .watch import FileWatch, notify, poll

SCOPE = "public"
Subscriber = Callable[[CertKeyPair, "CaBundle | None"], None]

log = logging.getLogger("runtime")
reload_log = logging.getLogger("runtime.tls.reload")


class TlsManager:
    def __init__(self, settings: TlsSettings, metrics: Metrics, files: FileWatch | None,
                 pair: CertKeyPair, ca: CaBundle | None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._files = files  # None: nothing reloads (inline material somewhere)
        self._pair = pair
        self._ca = ca
        self._lock = threading.Lock()
        self._listeners: dict[Profile, ssl.SSLContext] = {}
        self._current: Mapping[Profile, ssl.SSLContext] = self._build_all(pair, ca)
        self._subscribers: list[Subscriber] = []
        self._certificates = self._facts(pair, ca)
        self.expiry = ExpiryMonitor(lambda: self._certificates, metrics, settings.expiry_warning_days)

    # ------------------------------------------------------------------ startup

    @classmethod
    def create(cls, settings: TlsSettings, metrics: Metrics) -> TlsManager:
        """Load and validate all material, or raise `TlsConfigError` with upstream's detail."""
        files = None
        if settings.reloadable:
            files = FileWatch(s.path for s in _sources(settings) if s.path is not None)
        try:
            pair = material.load_pair(_read(settings.certificate, files), _read(settings.key, files))
            ca = None
            if settings.client_ca is not None:
                ca = material.load_ca_bundle(_read(settings.client_ca, files))
            return cls(settings, metrics, files, pair, ca)
        except MaterialError as e:
            raise TlsConfigError(str(e)) from None
        except ssl.SSLError as e:
            raise TlsConfigError(f"failed to build the TLS context: {e.reason or e}") from None

    @property
    def client_auth_mode(self) -> ClientAuthMode:
        return self._settings.client_auth_mode

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the leaf being served to new handshakes."""
        return self._pair.fingerprint

    def subject_line(self) -> str:
        return material.startup_line(self._pair.leaf)

    def certificates(self) -> tuple[CertificateFacts, ...]:
        """The certificate served (`server`) and the client CAs trusted (`client_ca`) right now."""
        return self._certificates

    def _facts(self, pair: CertKeyPair, ca: CaBundle | None) -> tuple[CertificateFacts, ...]:
        s = self._settings
        served = facts_of([pair.leaf], SCOPE, "server", s.certificate.describe())
        trusted = facts_of(ca.certificates(), SCOPE, "client_ca", s.client_ca.describe()) \
            if ca is not None and s.client_ca is not None else []
        return (*served, *trusted)

    def log_startup(self) -> None:
        log.info("%s", self.subject_line())
        mode, ca = self._settings.client_auth_mode, self._settings.client_ca
        if mode == "none" or ca is None:
            log.debug("Public TLS client certificates: not requested (client_auth_mode=none)")
            return
        state = "required" if mode == "required" else "requested but optional"
        log.info("Public TLS client certificates: %s (client_auth_mode=%s); CA from %s", state, mode, ca.describe())

    # ------------------------------------------------------------------ contexts

    def listener_context(self, profile: Profile) -> ssl.SSLContext:
        """The listener's long-lived context (one per profile); new handshakes switch to the current one."""
        with self._lock:
            ctx = self._listeners.get(profile)
            if ctx is None:
                ctx = contexts.listener_context(profile, self._settings.client_auth_mode,
                                                lambda: self._current[profile])
                self._listeners[profile] = ctx
            return ctx

    def subscribe(self, subscriber: Subscriber) -> tuple[CertKeyPair, CaBundle | None]:
        """Call `subscriber` with every pair and CA published from now on (under the manager's lock,
        so calls arrive in publication order); returns the current ones."""
        with self._lock:
            self._subscribers.append(subscriber)
            return self._pair, self._ca

    def _build_all(self, pair: CertKeyPair, ca: CaBundle | None) -> dict[Profile, ssl.SSLContext]:
        mode = self._settings.client_auth_mode
        return {profile: contexts.current_context(profile, mode, pair, ca) for profile in PROFILES}

    # ------------------------------------------------------------------ reload

    def reload_all(self, reason: str = "sighup") -> None:
        """Re-read and swap every file-backed material now, changed or not (SIGHUP)."""
        if self._files is None:
            return
        if reason == "sighup":
            reload_log.info("TLS reload: SIGHUP triggered manual reload of all registered material",
                            extra={"fields": {"callbacks": 1 + (self._settings.client_ca is not None)}})
        self._reload(pair_due=True, ca_due=self._settings.client_ca is not None, forced=True)

    def check_for_changes(self) -> None:
        """One poll: reload whatever material's files changed since they were last read."""
        if self._files is None:
            return
        changed = self._files.changed()
        if not changed:
            return
        s = self._settings
        pair_due = bool(changed & {s.certificate.path, s.key.path})
        ca_due = s.client_ca is not None and s.client_ca.path in changed
        self._reload(pair_due=pair_due, ca_due=ca_due, forced=False)

    async def watch(self, stop: asyncio.Event, interval: float = 2.0, notifications: bool = True) -> None:
        """Check the material files for changes until `stop` is set: every `interval` seconds, and,
        with `notifications`, within milliseconds of the filesystem reporting a change next to them
        (polling stays on beside them, for filesystems that drop or never send notifications)."""
        if self._files is None:
            return
        watchers = [poll(stop, interval, self.check_for_changes)]
        if notifications:
            watchers.append(notify(stop, self._files.paths, self.check_for_changes))
        await asyncio.gather(*watchers)

    def _reload(self, *, pair_due: bool, ca_due: bool, forced: bool) -> None:
        with self._lock:
            pair_result, new_pair = self._attempt_pair(forced) if pair_due else (None, None)
            ca_result, new_ca = self._attempt_ca(forced) if ca_due else (None, None)
            if new_pair is not None or new_ca is not None:
                pair, ca = new_pair or self._pair, new_ca or self._ca
                try:
                    built = self._build_all(pair, ca)
                except (ssl.SSLError, ValueError, OSError) as e:
                    # Validated material should always build; if it does not, keep everything as it was.
                    self._warn_rejected(new_pair, new_ca, f"{e}")
                    pair_result = "parse_error" if new_pair is not None else pair_result
                    ca_result = "parse_error" if new_ca is not None else ca_result
                else:
                    self._current = built  # the publication: one assignment
                    self._pair, self._ca = pair, ca
                    self._certificates = self._facts(pair, ca)
                    self._log_swapped(new_pair, new_ca)
                    self.expiry.check()
                    for subscriber in self._subscribers:
                        subscriber(pair, ca)
            for result in (pair_result, ca_result):
                if result is not None:
                    self._metrics.tls_reload.add(1, {"scope": SCOPE, "result": result})

    def _attempt_pair(self, forced: bool) -> tuple[ReloadResult | None, CertKeyPair | None]:
        assert self._files is not None and self._settings.certificate.path and self._settings.key.path
        paths = {"cert": self._settings.certificate.path, "key": self._settings.key.path}
        # Both files are read every time, so both stamps are recorded.
        reads = {what: self._files.read(path) for what, path in paths.items()}
        if not forced and not any(r.changed for r in reads.values()):
            return None, None
        for what, read in reads.items():
            if read.error is not None:
                reload_log.warning("TLS reload: failed to read %s file: %s", what, material.os_error_text(read.error),
                                   extra={"fields": {"path": paths[what]}})
                return "io_error", None
        cert, key = reads["cert"].data, reads["key"].data
        assert cert is not None and key is not None
        try:
            return "ok", material.load_pair(cert, key)
        except MaterialError as e:
            reload_log.warning("TLS reload: rejected new material, keeping old: %s", e,
                               extra={"fields": {"cert_path": paths["cert"]}})
            return e.result, None

    def _attempt_ca(self, forced: bool) -> tuple[ReloadResult | None, CaBundle | None]:
        assert self._files is not None and self._settings.client_ca and self._settings.client_ca.path
        path = self._settings.client_ca.path
        read = self._files.read(path)
        if not forced and not read.changed:
            return None, None
        if read.error is not None:
            reload_log.warning("TLS reload: failed to read client CA file: %s", material.os_error_text(read.error),
                               extra={"fields": {"path": path}})
            return "io_error", None
        assert read.data is not None
        try:
            return "ok", material.load_ca_bundle(read.data)
        except MaterialError as e:
            reload_log.warning("TLS reload: rejected new client CA bundle, keeping old: %s", e,
                               extra={"fields": {"ca_path": path}})
            return e.result, None

    def _log_swapped(self, pair: CertKeyPair | None, ca: CaBundle | None) -> None:
        s = self._settings
        if pair is not None:
            reload_log.info("TLS reload: swapped server certificate", extra={"fields": {
                "cert_path": s.certificate.path, "fingerprint": pair.fingerprint, "scope": SCOPE}})
        if ca is not None and s.client_ca is not None:
            reload_log.info("TLS reload: swapped client CA bundle", extra={"fields": {
                "ca_path": s.client_ca.path, "scope": SCOPE}})

    def _warn_rejected(self, pair: CertKeyPair | None, ca: CaBundle | None, reason: str) -> None:
        s = self._settings
        if pair is not None:
            reload_log.warning("TLS reload: rejected new material, keeping old: %s", reason,
                               extra={"fields": {"cert_path": s.certificate.path}})
        if ca is not None and s.client_ca is not None:
            reload_log.warning("TLS reload: rejected new client CA bundle, keeping old: %s", reason,
                               extra={"fields": {"ca_path": s.client_ca.path}})


def _sources(settings: TlsSettings) -> list[MaterialSource]:
    return [s for s in (settings.certificate, settings.key, settings.client_ca) if s is not None]


def _read(source: MaterialSource, files: FileWatch | None) -> bytes:
    if source.path is None:
        assert source.pem is not None
        return source.pem
    if files is None:
        return material.read_file(source.path)
    read = files.read(source.path)
    if read.error is not None:
        raise MaterialError(f"failed to read TLS file at {source.path}: {material.os_error_text(read.error)}",
                            "io_error")
    assert read.data is not None
    return read.data
