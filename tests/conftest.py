"""Shared fixtures: the real default model, a fake engine, data directories."""

from __future__ import annotations

import os
import sys
from collections import deque
from pathlib import Path

import pytest

from appliance.inference import Completion, SamplingParams
from appliance.models import load_manifest, resolve_model_path

REPO_ROOT = Path(__file__).resolve().parent.parent
APPLIANCE = str(Path(sys.executable).with_name("appliance"))
SAMPLE = REPO_ROOT / "firmware_bridge" / "samples" / "BGL_2k.log"


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The bundled SmolLM2 GGUF file; `make test` installs it."""
    return resolve_model_path(None, load_manifest())


@pytest.fixture(scope="session")
def engine(model_path: Path):
    """One real llama.cpp engine shared by the model tests (loading takes ~0.3 s,
    but every load also re-evaluates the shared prompt prefix)."""
    from appliance.inference import LlamaEngine

    loaded = LlamaEngine(model_path, n_ctx=4096, n_threads=1)
    yield loaded
    loaded.close()


class FakeEngine:
    """A model stand-in with queued answers, implementing the workflow's Engine
    protocol; used where a test checks the workflow, not the model."""

    model_name = "fake"

    def __init__(self, answers: list[str | Exception]) -> None:
        self.answers: deque[str | Exception] = deque(answers)
        self.calls: list[SamplingParams] = []

    def complete(self, messages, grammar, params: SamplingParams) -> Completion:
        self.calls.append(params)
        answer = self.answers.popleft() if self.answers else "{}"
        if isinstance(answer, Exception):
            raise answer
        finish = "length" if answer.endswith("…") else "stop"
        return Completion(answer.rstrip("…"), 10, 20, finish, 0.01)


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for CLI subprocesses, without a data directory override."""
    env = dict(os.environ)
    env.pop("FIELD_RELAY_DATA_DIR", None)
    return env


# The --ble-hardware flag and the ble_hardware marker.
pytest_plugins = ["tests.conftest_ble"]
