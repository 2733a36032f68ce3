"""What one on-demand refresh may change (`POST /v1/datasets/{name}/acceleration/refresh`'s body,
`spice refresh --refresh-sql/--refresh-mode`): upstream's `RefreshOverrides`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RefreshMode = Literal["full", "append"]


@dataclass(frozen=True, slots=True)
class RefreshOverrides:
    refresh_sql: str | None = None
    refresh_mode: RefreshMode | None = None
    refresh_jitter_max: float | None = None  # seconds: a random delay of up to this before the refresh
