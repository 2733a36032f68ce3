"""API keys: constant-time comparison, never logged."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ApiKeys:
    keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def accepts(self, candidate: str | None) -> bool:
        if candidate is None:
            return False
        given = candidate.encode()
        # Compare against every key so timing does not reveal which one (or whether any) matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key.encode())
        return matched


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
