"""The canary: golden log lines that a new model must triage before it is activated.

Each input is a raw log line with expected values for some of the fields that
``appliance eval`` scores (severity, component, event type, action required).
The lines go through the daemon's prompt, output constraint, validation and
retry policy with the new model. Two figures decide:

- valid rate: the share of inputs whose record ended validated;
- accuracy: the share of expected field values that the output matched, where
  every expected value of an input that ended dead counts as missed.

A model passes when both figures reach their thresholds. The canary is a smoke
check that catches a broken or mismatched model (wrong chat template, garbage
output, the same output for every line). It is not a quality figure, which
``appliance eval`` measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.errors import SetupError
from appliance.models import MANIFEST_DIR, ModelSelection

logger = logging.getLogger(__name__)

DEFAULT_CANARY_PATH = MANIFEST_DIR / "canary" / "default.json"
"""Canary set used when a bundle brings none, and for thresholds it leaves out."""
EXPECTED_FIELDS = ("severity", "component", "event_type", "action_required")
"""``log_event`` fields that an input may set expected values for."""
MAX_CANARY_INPUTS = 20
"""Largest canary set accepted; each input costs one or more model calls."""
CANARY_LINK = "canary"
"""Link name of the canary's records, in a database of their own."""

_SET_KEYS = {"description", "min_valid_rate", "min_accuracy", "inputs"}


class CanarySetError(SetupError):
    """A canary set is invalid; the message names the field."""


class CanaryFailedError(SetupError):
    """A model scored below a canary threshold and was not activated.

    Attributes:
        report: the canary's scores and each input's outcome.
    """

    def __init__(self, message: str, report: CanaryReport) -> None:
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class CanaryInput:
    """One golden line and the values its triage must have."""

    raw: str
    expected: dict[str, tuple[str | bool, ...]]
    """Accepted values per field; strings compare without regard to case."""


@dataclasses.dataclass(frozen=True)
class CanarySet:
    """Golden inputs and the thresholds a model must reach on them."""

    inputs: tuple[CanaryInput, ...]
    min_valid_rate: float
    """Minimum share of inputs that must end validated, 0 to 1."""
    min_accuracy: float
    """Minimum share of expected values that must match, 0 to 1."""

    def with_floor(
        self, min_valid_rate: float | None, min_accuracy: float | None
    ) -> CanarySet:
        """Return this set with each threshold raised to the given floor, if higher.

        An operator's threshold can make a bundle's canary stricter but never
        more lenient.
        """
        return dataclasses.replace(
            self,
            min_valid_rate=max(self.min_valid_rate, min_valid_rate or 0.0),
            min_accuracy=max(self.min_accuracy, min_accuracy or 0.0),
        )


def parse_canary_set(data: dict[str, Any] | None) -> CanarySet:
    """Validate a canary set in the form of models/canary/default.json.

    ``None`` selects the default set. A set without ``inputs`` uses the default
    inputs, and a missing threshold takes the default set's value.

    Raises:
        CanarySetError: a field is missing or invalid, naming it.
    """
    default = _load_default()
    if data is None:
        data = default
    unknown = sorted(set(data) - _SET_KEYS)
    if unknown:
        raise CanarySetError(
            f"unknown keys {unknown!r}; allowed are {sorted(_SET_KEYS)}"
        )
    thresholds = {}
    for key in ("min_valid_rate", "min_accuracy"):
        value = data.get(key, default[key])
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CanarySetError(f"{key} {value!r} is not a number")
        if not 0 <= value <= 1:
            raise CanarySetError(f"{key} {value!r} is not between 0 and 1")
        thresholds[key] = float(value)
    raw_inputs = data.get("inputs", default["inputs"])
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise CanarySetError("inputs must be a non-empty list")
    if len(raw_inputs) > MAX_CANARY_INPUTS:
        raise CanarySetError(
            f"inputs has {len(raw_inputs)} entries, more than the {MAX_CANARY_INPUTS} "
            "allowed"
        )
    inputs = tuple(_parse_input(item, index) for index, item in enumerate(raw_inputs))
    return CanarySet(inputs, **thresholds)


def _load_default() -> dict[str, Any]:
    try:
        data = json.loads(DEFAULT_CANARY_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CanarySetError(
            f"cannot read the default canary set {str(DEFAULT_CANARY_PATH)!r}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise CanarySetError(f"{str(DEFAULT_CANARY_PATH)!r} is not a JSON object")
    return data


def _parse_input(item: Any, index: int) -> CanaryInput:
    where = f"inputs[{index}]"
    if not isinstance(item, dict) or set(item) != {"raw", "expected"}:
        raise CanarySetError(f"{where} must be an object with raw and expected")
    raw = item["raw"]
    if not isinstance(raw, str) or not raw.strip():
        raise CanarySetError(f"{where}.raw must be a non-empty string")
    expected = item["expected"]
    if not isinstance(expected, dict) or not expected:
        raise CanarySetError(f"{where}.expected must be a non-empty object")
    parsed: dict[str, tuple[str | bool, ...]] = {}
    for field, value in expected.items():
        if field not in EXPECTED_FIELDS:
            raise CanarySetError(
                f"{where}.expected.{field} is not one of {list(EXPECTED_FIELDS)}"
            )
        accepted = tuple(value) if isinstance(value, list) else (value,)
        kind = bool if field == "action_required" else str
        if not accepted or not all(type(item) is kind for item in accepted):
            raise CanarySetError(
                f"{where}.expected.{field} must be a {kind.__name__} or a non-empty "
                f"list of them, got {value!r}"
            )
        parsed[field] = accepted
    return CanaryInput(raw, parsed)


@dataclasses.dataclass(frozen=True)
class CanaryReport:
    """Scores of one canary run and the outcome of each input."""

    inputs: int
    valid: int
    checks: int
    """Expected values over all inputs."""
    matched: int
    min_valid_rate: float
    min_accuracy: float
    duration_s: float
    results: tuple[dict[str, Any], ...]
    """Per input: raw line, final state, attempts, output fields, mismatches."""

    @property
    def valid_rate(self) -> float:
        return self.valid / self.inputs if self.inputs else 0.0

    @property
    def accuracy(self) -> float:
        return self.matched / self.checks if self.checks else 0.0

    @property
    def passed(self) -> bool:
        return (
            self.valid_rate >= self.min_valid_rate
            and self.accuracy >= self.min_accuracy
        )

    def summary(self) -> str:
        """Return one line with both figures and their thresholds."""
        return (
            f"valid {self.valid}/{self.inputs} ({self.valid_rate:.2f}, minimum "
            f"{self.min_valid_rate:.2f}), matched {self.matched}/{self.checks} "
            f"expected values ({self.accuracy:.2f}, minimum {self.min_accuracy:.2f})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "results": list(self.results),
            "valid_rate": round(self.valid_rate, 4),
            "accuracy": round(self.accuracy, 4),
            "passed": self.passed,
        }


def score_canary(
    canary: CanarySet,
    outcomes: Sequence[tuple[str, int, dict[str, Any] | None]],
    duration_s: float = 0.0,
) -> CanaryReport:
    """Score one outcome per input: ``(final state, attempts, fields or None)``.

    ``fields`` is None when the record ended dead, and then every expected
    value of that input counts as missed.
    """
    valid = checks = matched = 0
    results = []
    for item, (state, attempts, fields) in zip(canary.inputs, outcomes, strict=True):
        mismatches = []
        if fields is not None:
            valid += 1
        for field, accepted in item.expected.items():
            checks += 1
            actual = None if fields is None else fields.get(field)
            if _matches(actual, accepted):
                matched += 1
            else:
                mismatches.append(
                    {"field": field, "expected": list(accepted), "actual": actual}
                )
        results.append(
            {
                "raw": item.raw,
                "state": state,
                "attempts": attempts,
                "output": fields,
                "mismatches": mismatches,
            }
        )
    return CanaryReport(
        inputs=len(canary.inputs),
        valid=valid,
        checks=checks,
        matched=matched,
        min_valid_rate=canary.min_valid_rate,
        min_accuracy=canary.min_accuracy,
        duration_s=round(duration_s, 2),
        results=tuple(results),
    )


def _matches(actual: Any, accepted: tuple[str | bool, ...]) -> bool:
    if isinstance(actual, bool):
        return any(value is actual for value in accepted)
    if isinstance(actual, str):
        folded = actual.casefold()
        return any(isinstance(a, str) and a.casefold() == folded for a in accepted)
    return False


def run_canary(
    selection: ModelSelection,
    canary: CanarySet,
    work_dir: Path,
    grammar_check_dir: Path | None = None,
) -> CanaryReport:
    """Run the canary inputs through the real workflow with ``selection``'s model.

    Records go to a new database in ``work_dir`` with an empty answer cache, so
    every input is inferred by the model under test. ``grammar_check_dir``
    keeps passed grammar checks, as the daemon's does.

    Raises:
        ModelLoadError: llama.cpp cannot load the model.
        GrammarError: llama.cpp rejects the grammar for this model's vocabulary.
        ApplianceError: the canary database failed.
    """
    # Imported here because evaluation pulls in the daemon and llama.cpp, which
    # verifying or listing bundles never needs.
    from appliance.daemon import db_path
    from appliance.evaluation import insert_records, settle_records
    from appliance.loghub import GroundTruth, LabelledLine
    from appliance.store import Store

    started = time.perf_counter()
    lines = [
        LabelledLine(number, item.raw, CANARY_LINK, GroundTruth(CANARY_LINK, ""))
        for number, item in enumerate(canary.inputs, start=1)
    ]
    workflow = _canary_workflow(selection, work_dir, grammar_check_dir)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(workflow.engine.close)
        store = Store(db_path(work_dir))
        cleanup.callback(store.close)
        record_ids = insert_records(store, CANARY_LINK, lines)
        outcomes = settle_records(workflow, store, record_ids, lines)
        rows = [store.get_record(record_id) for record_id in record_ids]
    scored = []
    for outcome, row in zip(outcomes, rows, strict=True):
        fields = json.loads(row["data"]) if row is not None and row["data"] else None
        scored.append((str(outcome.state), outcome.attempts, fields))
    report = score_canary(canary, scored, time.perf_counter() - started)
    logger.info("canary of %s: %s", selection.path.name, report.summary())
    return report


def _canary_workflow(
    selection: ModelSelection, work_dir: Path, grammar_check_dir: Path | None
) -> Any:
    """Build the daemon's workflow around ``selection`` in ``work_dir``.

    This repeats ``daemon.build_workflow``, which takes a model name or path
    and so cannot load a model that is installed but not yet active.
    """
    from appliance.daemon import db_path
    from appliance.decoding import plan_from_schema
    from appliance.grammar import schema_to_gbnf
    from appliance.grammar_check import check_grammar
    from appliance.inference import (
        CachedEngine,
        OutputSpec,
        SamplingParams,
        load_engine,
    )
    from appliance.log_event import SCHEMA_ID, log_event_schema
    from appliance.workflow import Workflow

    manifest = selection.manifest
    schema = log_event_schema()
    grammar = schema_to_gbnf(schema)
    check_grammar(grammar, selection.path, grammar_check_dir)
    engine = load_engine(selection)
    try:
        cached = CachedEngine(engine, work_dir / "answer-cache")
    except BaseException:
        engine.close()
        raise
    output = OutputSpec(SCHEMA_ID, grammar, plan_from_schema(schema))
    sampling = SamplingParams(
        temperature=float(manifest.sampling.get("temperature", 0.0)),
        top_p=float(manifest.sampling.get("top_p", 1.0)),
        max_tokens=int(manifest.sampling.get("max_tokens", 320)),
    )
    return Workflow(db_path(work_dir), cached, output, sampling)
