"""Fixtures shared by the test modules: one generated PKI and one event-loop thread per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pki import Pki
from tests.tlsprobe import LoopThread


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt
