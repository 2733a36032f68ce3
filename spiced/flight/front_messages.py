"""What the runtime and its Flight TLS front process say to each other over their control channel
(a socketpair carrying pickled `multiprocessing.connection` messages). One definition for both ends;
a module of its own because the front runs as `python -m spiced.flight.front_process`, whose
classes would otherwise pickle as `__main__.…`."""

from __future__ import annotations

from dataclasses import dataclass

from ..identity import ClientIdentity

# ---------------------------------------------------------------------- runtime → front


@dataclass(frozen=True, slots=True)
class Material:
    """The certificate chain, key and client CA to serve from now on (the key never gets logged)."""

    chain: bytes
    key: bytes
    ca_pem: str | None

    def __repr__(self) -> str:
        return "Material(…)"


@dataclass(frozen=True, slots=True)
class Ping:
    """Answered with `Pong` from the front's event-loop thread: proves the loop is turning."""

    key: int


@dataclass(frozen=True, slots=True)
class AskSettled:
    """Whether no byte has crossed the front for `quiet` seconds and none waits in it."""

    key: int
    quiet: float


@dataclass(frozen=True, slots=True)
class StopAccepting:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    grace: float


# ---------------------------------------------------------------------- front → runtime


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class PeerConnected:
    peer: str
    identity: ClientIdentity | None


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer: str


@dataclass(frozen=True, slots=True)
class Pong:
    key: int


@dataclass(frozen=True, slots=True)
class Settled:
    key: int
    settled: bool


ToFront = Material | Ping | AskSettled | StopAccepting | Stop
ToRuntime = Ready | Failed | PeerConnected | PeerGone | Pong | Settled
