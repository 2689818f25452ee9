"""Fixtures shared by every test module: the test-only models, registered only for the modules that use them; no
request to the real Hugging Face Hub."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

import tinynets


@pytest.fixture(scope="module")
def tiny_models() -> Iterator[None]:
    """``tiny_test_net`` and ``tiny_test_dbb`` in the registry for the module (tinynets.py); gone after it."""
    with tinynets.registered():
        yield


@pytest.fixture(autouse=True)
def no_hub_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub asks ``{endpoint}/api/agent-harnesses`` once per process for its user-agent telemetry, at the
    endpoint of its import (huggingface.co, whatever HF_ENDPOINT a test sets later) and caches the answer in
    ~/.cache/huggingface: off, in this process and in the processes a test spawns."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
