"""Quality evaluation: sampling, scoring, and running the model and the baseline.

Each raw line goes to the model through the daemon's workflow (prompt, output
constraint, engine, validation, retry policy) and to the keyword baseline in
``appliance.baseline``. Both are scored against the same ground truth from
``appliance.loghub``. docs/quality.md explains each figure
and its limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.baseline import classify_line
from appliance.daemon import build_workflow, db_path
from appliance.errors import ApplianceError
from appliance.inference import CachedEngine
from appliance.log_event import Severity
from appliance.loghub import DatasetFormat, LabelledLine, load_dataset
from appliance.paths import prepare_data_dir
from appliance.prompts import build_messages
from appliance.states import RecordKind, RecordState
from appliance.store import Store
from appliance.workflow import Workflow

logger = logging.getLogger(__name__)

EVAL_SUBDIR = "eval"
"""Subdirectory of the data directory that contains the evaluation's own database
and answer cache, so the daemon never infers, queues or uploads eval records."""

SEVERE = frozenset({Severity.ERROR.value, Severity.CRITICAL.value})
"""Severities scored as a positive prediction of a BGL alert."""


# Selection --------------------------------------------------------------------


def stratified_sample(
    lines: Sequence[LabelledLine], size: int, seed: int
) -> list[LabelledLine]:
    """Draw ``size`` lines so that every stratum appears, in LineId order.

    Each stratum first gets one line, then the remaining draws are shared in
    proportion to how many lines each stratum has left. When ``size`` is below
    the number of strata, ``size`` strata chosen at random get one line each.
    The same ``lines``, ``size`` and ``seed`` always give the same sample.
    """
    if size >= len(lines):
        return sorted(lines, key=lambda line: line.line_id)
    rng = random.Random(seed)
    strata: dict[str, list[LabelledLine]] = defaultdict(list)
    for line in lines:
        strata[line.stratum].append(line)
    keys = sorted(strata)

    if size < len(keys):
        quotas = dict.fromkeys(rng.sample(keys, size), 1)
    else:
        quotas = _proportional_quotas({key: len(strata[key]) for key in keys}, size)

    chosen: list[LabelledLine] = []
    for key in keys:
        if quotas.get(key):
            chosen += rng.sample(strata[key], quotas[key])
    return sorted(chosen, key=lambda line: line.line_id)


def _proportional_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    quotas = dict.fromkeys(sizes, 1)
    spare = {key: size - 1 for key, size in sizes.items()}
    remaining = total - len(sizes)
    capacity = sum(spare.values())
    # Integer shares with the largest-remainder rule. A stratum with a nonzero
    # remainder has a share below its spare lines, so one more draw still fits.
    remainders = {}
    for key in sizes:
        share, remainders[key] = divmod(remaining * spare[key], capacity)
        quotas[key] += share
    leftover = total - sum(quotas.values())
    by_remainder = sorted(sizes, key=lambda key: (-remainders[key], key))
    for key in by_remainder[:leftover]:
        quotas[key] += 1
    return quotas


# Scoring ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The scored fields of one triage; all None when the model output ended dead."""

    severity: str | None = None
    event_type: str | None = None
    action_required: bool | None = None
    component: str | None = None


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def binary_scores(
    truth: Sequence[bool], predicted: Sequence[bool | None]
) -> dict[str, Any]:
    """Score a yes/no figure: accuracy and precision/recall of each class.

    ``precision`` and ``recall`` at the top level are those of the positive
    class. A None prediction (dead output) counts as wrong in every figure. A
    ratio with a zero denominator is None, not 0.
    """
    pairs = [
        (actual, (not actual) if guess is None else guess)
        for actual, guess in zip(truth, predicted, strict=True)
    ]
    per_class = {}
    for name, value in (("positive", True), ("negative", False)):
        hits = sum(1 for actual, guess in pairs if actual == guess == value)
        support = sum(1 for actual, _ in pairs if actual == value)
        guessed = sum(1 for _, guess in pairs if guess == value)
        per_class[name] = {
            "precision": _ratio(hits, guessed),
            "recall": _ratio(hits, support),
            "support": support,
        }

    positive = per_class["positive"]
    precision, recall = positive["precision"], positive["recall"]
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = round(2 * precision * recall / (precision + recall), 4)
    negative_recall = per_class["negative"]["recall"]
    balanced = None
    if recall is not None and negative_recall is not None:
        balanced = round((recall + negative_recall) / 2, 4)
    correct = sum(1 for actual, guess in pairs if actual == guess)
    return {
        "lines": len(pairs),
        "accuracy": _ratio(correct, len(pairs)),
        "balanced_accuracy": balanced,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "per_class": per_class,
    }


def match_accuracy(
    truth: Sequence[str], predicted: Sequence[str | None]
) -> dict[str, Any]:
    """Score exact, case-insensitive matches; a None prediction is a miss."""
    correct = sum(
        1
        for actual, guess in zip(truth, predicted, strict=True)
        if guess is not None and guess.casefold() == actual.casefold()
    )
    answered = sum(1 for guess in predicted if guess is not None)
    return {
        "lines": len(truth),
        "accuracy": _ratio(correct, len(truth)),
        "coverage": _ratio(answered, len(truth)),
    }


def template_consistency(
    event_ids: Sequence[str], predicted: Sequence[str | None]
) -> dict[str, Any]:
    """Measure how often lines of one template get that template's majority type.

    Only templates with at least two lines count, because a single line always
    agrees with itself. A None prediction never counts towards the majority.
    The share does not measure correctness: a constant prediction scores 1.0.
    """
    groups: dict[str, list[str | None]] = defaultdict(list)
    for event_id, guess in zip(event_ids, predicted, strict=True):
        groups[event_id].append(guess)
    repeated = [guesses for guesses in groups.values() if len(guesses) > 1]
    agreeing = 0
    for guesses in repeated:
        counts = Counter(guess for guess in guesses if guess is not None)
        agreeing += counts.most_common(1)[0][1] if counts else 0
    lines = sum(len(guesses) for guesses in repeated)
    return {
        "lines": lines,
        "templates": len(repeated),
        "share": _ratio(agreeing, lines),
    }


FIGURES: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.BGL: (
        "action_required",
        "severity",
        "event_type_consistency",
        "component",
    ),
    DatasetFormat.HPC: (
        "action_required",
        "event_type",
        "event_type_consistency",
        "component",
    ),
}
"""Figures scored per dataset; docs/quality.md gives the truth behind each."""


def score_predictions(
    dataset_format: DatasetFormat,
    lines: Sequence[LabelledLine],
    predictions: Sequence[Prediction],
) -> dict[str, dict[str, Any]]:
    """Score ``predictions`` (one per line, same order) on every figure of the format."""
    scores: dict[str, dict[str, Any]] = {}
    for figure in FIGURES[dataset_format]:
        scores[figure] = _score_figure(figure, lines, predictions)
    return scores


def _score_figure(
    figure: str, lines: Sequence[LabelledLine], predictions: Sequence[Prediction]
) -> dict[str, Any]:
    pairs = list(zip(lines, predictions, strict=True))
    if figure == "action_required":
        labelled = [(ln, p) for ln, p in pairs if ln.truth.action_required is not None]
        return binary_scores(
            [bool(ln.truth.action_required) for ln, _ in labelled],
            [p.action_required for _, p in labelled],
        )
    if figure == "severity":
        labelled = [(ln, p) for ln, p in pairs if ln.truth.severe is not None]
        return binary_scores(
            [bool(ln.truth.severe) for ln, _ in labelled],
            [None if p.severity is None else p.severity in SEVERE for _, p in labelled],
        )
    if figure == "event_type":
        labelled = [(ln, p) for ln, p in pairs if ln.truth.event_type is not None]
        return match_accuracy(
            [str(ln.truth.event_type) for ln, _ in labelled],
            [p.event_type for _, p in labelled],
        )
    if figure == "event_type_consistency":
        return template_consistency(
            [ln.truth.event_id for ln, _ in pairs], [p.event_type for _, p in pairs]
        )
    if figure == "component":
        return match_accuracy(
            [ln.truth.component for ln, _ in pairs], [p.component for _, p in pairs]
        )
    raise ValueError(f"unknown figure {figure!r}")


def baseline_prediction(raw: str) -> Prediction:
    """Return the keyword baseline's triage of ``raw`` as a ``Prediction``."""
    triage = classify_line(raw)
    return Prediction(
        severity=str(triage.severity),
        event_type=str(triage.event_type),
        action_required=triage.action_required,
        component=triage.component,
    )


# Running ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """Settings of one ``appliance eval`` run: the lines to score and the model."""

    dataset: Path
    limit: int | None = None
    """Score the first N rows; exclusive with ``sample``."""
    sample: int | None = None
    """Score a stratified sample of N rows drawn with ``seed``."""
    seed: int = 0
    model: str | None = None
    """Model manifest name or GGUF file; None uses the default model."""
    threads: int | None = None
    """llama.cpp CPU threads; None uses the model manifest's ``n_threads``."""


@dataclasses.dataclass(frozen=True)
class ModelOutcome:
    """Final state of one line's record and the prediction read from its data."""

    state: RecordState
    attempts: int
    prediction: Prediction


def select_lines(
    lines: Sequence[LabelledLine], request: EvalRequest
) -> list[LabelledLine]:
    """Apply ``--limit`` or ``--sample`` to the dataset's lines."""
    if request.sample is not None:
        return stratified_sample(lines, request.sample, request.seed)
    if request.limit is not None:
        return list(lines[: request.limit])
    return list(lines)


def prompt_sha256() -> str:
    """Return a digest of the fixed part of the prompt: system message and examples."""
    messages = build_messages("")[:-1]
    encoded = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()


def run_evaluation(data_dir: Path, request: EvalRequest) -> dict[str, Any]:
    """Run the model and the baseline over the selected lines and score both.

    Records are written to a fresh link ``eval:<dataset path>#<run id>`` in
    ``DATA_DIR/eval``, so each run infers with the current model and prompt.
    The answer cache there still makes a repeated run fast.

    Raises:
        SetupError: the dataset, data directory or model cannot be used.
        ApplianceError: the workflow or database failed.
    """
    started = time.perf_counter()
    dataset_format, lines = load_dataset(request.dataset)
    selected = select_lines(lines, request)
    eval_dir = prepare_data_dir(data_dir / EVAL_SUBDIR)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    link = f"eval:{request.dataset.resolve()}#{run_id}"

    workflow = build_workflow(
        eval_dir, request.model, request.threads, models_home=eval_dir.parent
    )
    engine = workflow.engine
    assert isinstance(engine, CachedEngine)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(engine.close)
        store = Store(db_path(eval_dir))
        cleanup.callback(store.close)
        logger.info(
            "eval %s: %d of %d lines (%s) with %s, records on link %s",
            request.dataset,
            len(selected),
            len(lines),
            dataset_format,
            engine.model_name,
            link,
        )
        record_ids = insert_records(store, link, selected)
        outcomes = settle_records(workflow, store, record_ids, selected)

    baseline = [baseline_prediction(line.raw) for line in selected]
    valid = sum(1 for o in outcomes if o.state is RecordState.VALIDATED)
    first_try = sum(
        1 for o in outcomes if o.state is RecordState.VALIDATED and o.attempts == 1
    )
    return {
        "dataset": str(request.dataset.resolve()),
        "format": str(dataset_format),
        "sample": request.sample,
        "seed": request.seed if request.sample is not None else None,
        "limit": request.limit,
        "records": len(selected),
        "valid": valid,
        "dead": len(selected) - valid,
        "first_attempt_valid": first_try,
        "strata": dict(sorted(Counter(line.stratum for line in selected).items())),
        "model_name": engine.model_name,
        "prompt_sha256": prompt_sha256(),
        "threads": engine.engine.n_threads,
        "link": link,
        "duration_s": round(time.perf_counter() - started, 1),
        "model": score_predictions(
            dataset_format, selected, [o.prediction for o in outcomes]
        ),
        "baseline": score_predictions(dataset_format, selected, baseline),
    }


def insert_records(store: Store, link: str, lines: Sequence[LabelledLine]) -> list[str]:
    """Commit one received ``log_event`` record per line, with seq = LineId.

    Raises:
        ApplianceError: a record with the same link and LineId exists, which
            means the dataset repeats a LineId.
    """
    record_ids = []
    with store.transaction() as conn:
        for line in lines:
            record_id = store.insert_record(
                conn,
                link,
                line.line_id,
                line.raw,
                line.raw.encode("utf-8"),
                RecordKind.LOG_EVENT,
            )
            if record_id is None:
                raise ApplianceError(
                    f"record {link}#{line.line_id} already exists: the dataset "
                    f"repeats LineId {line.line_id}"
                )
            record_ids.append(record_id)
    return record_ids


def settle_records(
    workflow: Workflow,
    store: Store,
    record_ids: Sequence[str],
    lines: Sequence[LabelledLine],
) -> list[ModelOutcome]:
    """Step the workflow on each record until it is validated or dead.

    ``infer`` and ``validate``, the daemon's own activities, alternate under
    the workflow's retry policy. Records are not enqueued, so they never enter
    the outbox. Returns the outcomes in line order.
    """
    return [
        _settle(workflow, store, record_id, line.line_id)
        for record_id, line in zip(record_ids, lines, strict=True)
    ]


def _settle(
    workflow: Workflow, store: Store, record_id: str, line_id: int
) -> ModelOutcome:
    started = time.perf_counter()
    while True:
        row = store.get_record(record_id)
        assert row is not None
        state = RecordState(row["state"])
        if state in (RecordState.VALIDATED, RecordState.DEAD):
            break
        # A retry may be scheduled later than now; the default policy has no delay.
        time.sleep(max(0.0, (row["next_attempt_at"] or 0.0) - time.time()))
        step = workflow.infer if state is RecordState.RECEIVED else workflow.validate
        if not step(store, record_id):
            raise ApplianceError(
                f"record {record_id} (LineId {line_id}) did not leave state "
                f"{state}; another process may be using {str(store.path)!r}"
            )

    prediction = Prediction()
    if state is RecordState.VALIDATED:
        data = json.loads(row["data"])
        prediction = Prediction(
            severity=data["severity"],
            event_type=data["event_type"],
            action_required=data["action_required"],
            component=data["component"],
        )
    logger.info(
        "eval line %d: %s after attempt %d, %.1f s",
        line_id,
        state,
        row["attempts"],
        time.perf_counter() - started,
    )
    return ModelOutcome(state, row["attempts"], prediction)
