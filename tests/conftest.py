"""Fixtures shared by every test module: the test-only models, registered only for the modules that use them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tinynets


@pytest.fixture(scope="module")
def tiny_models() -> Iterator[None]:
    """``tiny_test_net`` and ``tiny_test_dbb`` in the registry for the module (tinynets.py); gone after it."""
    with tinynets.registered():
        yield
