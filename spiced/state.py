"""What request handlers may read about the running runtime (shared by HTTP and Flight)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .auth import ApiKeys
from .config import RuntimeConfig
from .engine import Engine
from .metrics import Metrics
from .queries import ActiveQueries

if TYPE_CHECKING:
    from .cluster.node import ClusterNode
    from .tls.manager import TlsManager

ListenerStatus = Literal["Initializing", "Ready", "Disabled", "Error"]


@dataclass
class Endpoint:
    name: Literal["http", "flight", "metrics"]
    address: str | None = None  # "host:port" actually bound; None when disabled
    status: ListenerStatus = "Disabled"


@dataclass
class RuntimeState:
    config: RuntimeConfig
    engine: Engine
    metrics: Metrics
    api_keys: ApiKeys
    tls: TlsManager | None = None
    queries: ActiveQueries = field(default_factory=ActiveQueries)  # synchronous queries running now
    cluster: ClusterNode | None = None  # a scheduler's cluster (--role scheduler)
    endpoints: dict[str, Endpoint] = field(default_factory=lambda: {
        n: Endpoint(n) for n in ("http", "flight", "metrics")  # type: ignore[arg-type]
    })

    def serving(self) -> bool:
        """No listener is in error (e.g. while the Flight TLS front is being started again)."""
        return all(e.status != "Error" for e in self.endpoints.values())

    @property
    def client_auth_mode(self) -> str:
        return self.tls.client_auth_mode if self.tls is not None else "none"
