"""`appliance eval`: loghub loading, sampling, scoring, the baseline and real runs.

The loghub CSV files are not part of the repository. Tests that read them
are skipped when the files are missing.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from appliance.baseline import classify_line
from appliance.errors import SetupError
from appliance.evaluation import (
    Prediction,
    _proportional_quotas,
    baseline_prediction,
    binary_scores,
    insert_records,
    match_accuracy,
    score_predictions,
    settle_records,
    stratified_sample,
    template_consistency,
)
from appliance.grammar import schema_to_gbnf
from appliance.inference import SamplingParams
from appliance.log_event import EventType, Severity, log_event_schema
from appliance.loghub import (
    DatasetFormat,
    GroundTruth,
    LabelledLine,
    build_raw_line,
    load_dataset,
)
from appliance.states import RecordState
from appliance.store import Store
from appliance.workflow import Workflow
from tests.conftest import APPLIANCE, REPO_ROOT, SAMPLE, FakeEngine

# Copies of the loghub CSVs, with their licence notice in the same folder.
DATA = REPO_ROOT / "tests" / "data" / "loghub"
BGL_CSV = DATA / "BGL_2k.log_structured.csv"
HPC_CSV = DATA / "HPC_2k.log_structured.csv"
EVAL_TIMEOUT = 300.0
"""Seconds one `appliance eval` subprocess may take before the test fails."""

VALID_OUTPUT = json.dumps(
    {
        "severity": "critical",
        "component": "kernel",
        "event_type": "hardware",
        "summary": "A data TLB error interrupt stopped the node.",
        "action_required": True,
        "suggested_action": "Replace the node card.",
    }
)


def _dataset(path: Path) -> tuple[DatasetFormat, list[LabelledLine]]:
    if not path.is_file():
        pytest.skip(f"loghub dataset {path} is not present")
    return load_dataset(path)


@pytest.fixture(scope="module")
def bgl() -> list[LabelledLine]:
    return _dataset(BGL_CSV)[1]


@pytest.fixture(scope="module")
def hpc() -> list[LabelledLine]:
    return _dataset(HPC_CSV)[1]


def _line(line_id: int, stratum: str, alert: bool = False) -> LabelledLine:
    truth = GroundTruth(
        event_id=f"E{line_id % 3}",
        component="KERNEL",
        action_required=alert,
        severe=alert,
    )
    return LabelledLine(line_id, f"line {line_id}", stratum, truth)


# Scoring ----------------------------------------------------------------------


def test_binary_scores_mixed_case() -> None:
    scores = binary_scores([True, True, False, False], [True, False, True, False])
    assert scores["accuracy"] == 0.5
    assert scores["precision"] == 0.5
    assert scores["recall"] == 0.5
    assert scores["f1"] == 0.5
    assert scores["balanced_accuracy"] == 0.5
    assert scores["per_class"]["negative"] == {
        "precision": 0.5,
        "recall": 0.5,
        "support": 2,
    }


def test_binary_scores_zero_division_is_none() -> None:
    scores = binary_scores([False, False, False], [False, False, False])
    assert scores["accuracy"] == 1.0
    assert scores["precision"] is None
    assert scores["recall"] is None
    assert scores["f1"] is None
    assert scores["balanced_accuracy"] is None
    assert scores["per_class"]["negative"]["recall"] == 1.0


def test_binary_scores_no_positive_prediction() -> None:
    scores = binary_scores([True, False], [False, False])
    assert scores["precision"] is None
    assert scores["recall"] == 0.0
    assert scores["accuracy"] == 0.5


def test_binary_scores_dead_output_is_wrong() -> None:
    scores = binary_scores([True, False], [None, None])
    assert scores["accuracy"] == 0.0
    assert scores["recall"] == 0.0
    assert scores["precision"] == 0.0
    assert scores["per_class"]["negative"]["recall"] == 0.0


def test_binary_scores_empty_input() -> None:
    scores = binary_scores([], [])
    assert scores["lines"] == 0
    assert scores["accuracy"] is None


def test_match_accuracy_ignores_case() -> None:
    scores = match_accuracy(["KERNEL", "APP", "MMCS"], ["kernel", None, "app"])
    assert scores["accuracy"] == round(1 / 3, 4)
    assert scores["coverage"] == round(2 / 3, 4)


def test_consistency_skips_single_line_templates() -> None:
    scores = template_consistency(
        ["E1", "E1", "E1", "E2"], ["memory", "memory", "kernel", "other"]
    )
    assert scores["templates"] == 1
    assert scores["lines"] == 3
    assert scores["share"] == round(2 / 3, 4)


def test_consistency_dead_output_never_agrees() -> None:
    scores = template_consistency(["E1", "E1", "E2", "E2"], [None, None, "job", None])
    assert scores["share"] == 0.25


def test_consistency_without_repeats_is_none() -> None:
    scores = template_consistency(["E1", "E2"], ["job", "job"])
    assert scores["share"] is None


def test_severity_error_or_critical_is_alert() -> None:
    lines = [_line(1, "KERNDTLB", alert=True), _line(2, "-"), _line(3, "-")]
    predictions = [
        Prediction(severity="error"),
        Prediction(severity="critical"),
        Prediction(severity="warning"),
    ]
    scores = score_predictions(DatasetFormat.BGL, lines, predictions)["severity"]
    assert scores["recall"] == 1.0
    assert scores["precision"] == 0.5
    assert scores["accuracy"] == round(2 / 3, 4)


def test_hpc_action_skips_unlabelled_lines(hpc: list[LabelledLine]) -> None:
    lines = []
    for event_id in ("E26", "E35", "E2"):
        lines += [line for line in hpc if line.truth.event_id == event_id][:2]
    predictions = [Prediction(action_required=True) for _ in lines]
    scores = score_predictions(DatasetFormat.HPC, lines, predictions)
    assert scores["action_required"]["lines"] == 4
    assert scores["action_required"]["precision"] == 0.5
    assert "severity" not in scores


# Sampling ---------------------------------------------------------------------


def test_sample_same_seed_same_lines(bgl: list[LabelledLine]) -> None:
    first = stratified_sample(bgl, 40, seed=1)
    second = stratified_sample(bgl, 40, seed=1)
    assert [line.line_id for line in first] == [line.line_id for line in second]


def test_sample_other_seed_other_lines(bgl: list[LabelledLine]) -> None:
    first = stratified_sample(bgl, 40, seed=1)
    second = stratified_sample(bgl, 40, seed=2)
    assert [line.line_id for line in first] != [line.line_id for line in second]


def test_sample_has_every_bgl_label(bgl: list[LabelledLine]) -> None:
    sample = stratified_sample(bgl, 40, seed=1)
    assert len(sample) == 40
    assert {line.stratum for line in sample} == {line.stratum for line in bgl}
    assert Counter(line.stratum for line in sample)["APPCHILD"] == 1


def test_sample_has_every_hpc_state(hpc: list[LabelledLine]) -> None:
    sample = stratified_sample(hpc, 40, seed=1)
    assert len(sample) == 40
    assert {line.stratum for line in sample} == {line.stratum for line in hpc}


def test_sample_is_in_line_order(bgl: list[LabelledLine]) -> None:
    ids = [line.line_id for line in stratified_sample(bgl, 40, seed=3)]
    assert ids == sorted(ids)


def test_sample_below_strata_count() -> None:
    lines = [_line(i, f"s{i % 5}") for i in range(1, 21)]
    sample = stratified_sample(lines, 3, seed=0)
    assert len(sample) == 3
    assert len({line.stratum for line in sample}) == 3


def test_sample_larger_than_dataset_takes_all() -> None:
    lines = [_line(i, "-") for i in range(3, 0, -1)]
    sample = stratified_sample(lines, 10, seed=0)
    assert [line.line_id for line in sample] == [1, 2, 3]


@pytest.mark.parametrize("total", [4, 5, 17, 50, 99])
def test_quotas_sum_and_fit_strata(total: int) -> None:
    sizes = {"a": 1, "b": 2, "c": 7, "d": 90}
    quotas = _proportional_quotas(sizes, total)
    assert sum(quotas.values()) == total
    assert all(1 <= quotas[key] <= sizes[key] for key in sizes)


# Raw lines: ground truth never reaches the model or the baseline ------------------


def test_bgl_raw_line_drops_label(bgl: list[LabelledLine]) -> None:
    log_lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    expected = [line.split(" ", 1)[1] for line in log_lines]
    assert [line.raw for line in bgl] == expected


def test_bgl_raw_line_has_no_alert_tag(bgl: list[LabelledLine]) -> None:
    tags = {line.stratum for line in bgl} - {"-"}
    leaked = [line.line_id for line in bgl if tags & set(line.raw.split())]
    assert leaked == []


def test_bgl_raw_line_builder_skips_label() -> None:
    row = {
        "LineId": "7",
        "Label": "KERNDTLB",
        "Timestamp": "1118536327",
        "Date": "2005.06.11",
        "Node": "R30-M0-N9-C:J16-U01",
        "Time": "2005-06-11-17.18.47.314932",
        "NodeRepeat": "R30-M0-N9-C:J16-U01",
        "Type": "RAS",
        "Component": "KERNEL",
        "Level": "FATAL",
        "Content": "data TLB error interrupt",
        "EventId": "E45",
        "EventTemplate": "data TLB error interrupt",
    }
    raw = build_raw_line(row, DatasetFormat.BGL)
    assert "KERNDTLB" not in raw
    assert "E45" not in raw
    assert raw.startswith("1118536327 2005.06.11 ")
    assert raw.endswith("RAS KERNEL FATAL data TLB error interrupt")


def test_hpc_raw_line_joins_log_columns(hpc: list[LabelledLine]) -> None:
    first = hpc[0]
    assert first.raw.startswith("134681 node-246 unix.hw state_change.unavailable ")
    assert first.truth.event_id == "E13"
    assert first.truth.event_id not in first.raw.split()


def test_unknown_csv_header_names_file(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(SetupError, match="other.csv"):
        load_dataset(path)


def test_csv_without_rows_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    header = "LineId,LogId,Node,Component,State,Time,Flag,Content,EventId,EventTemplate"
    path.write_text(header + "\n", encoding="utf-8")
    with pytest.raises(SetupError, match="no rows"):
        load_dataset(path)


def test_hpc_truth_maps_state_to_event_type(hpc: list[LabelledLine]) -> None:
    by_event = {line.truth.event_id: line.truth for line in hpc}
    assert by_event["E35"].event_type is EventType.HARDWARE
    assert by_event["E26"].event_type is EventType.NETWORK
    assert by_event["E16"].event_type is EventType.JOB
    assert by_event["E13"].event_type is None
    assert by_event["E35"].action_required is True
    assert by_event["E26"].action_required is None


# Baseline ---------------------------------------------------------------------


def test_baseline_fatal_is_critical_action() -> None:
    triage = classify_line("1 2005.06.11 R30 RAS KERNEL FATAL data TLB error interrupt")
    assert triage.severity is Severity.CRITICAL
    assert triage.action_required is True
    assert triage.component == "KERNEL"
    assert triage.event_type is EventType.MEMORY


def test_baseline_level_wins_over_error_word() -> None:
    triage = classify_line("RAS KERNEL INFO instruction cache parity error corrected")
    assert triage.severity is Severity.INFO
    assert triage.action_required is False


def test_baseline_failed_without_level_is_error() -> None:
    triage = classify_line("node-69 unix.hw detected a failed network connection")
    assert triage.severity is Severity.ERROR
    assert triage.action_required is True
    assert triage.component is None
    assert triage.event_type is EventType.NETWORK


def test_baseline_warning_word_needs_no_action() -> None:
    triage = classify_line("switch_module Temperature (41C) exceeds warning threshold")
    assert triage.severity is Severity.WARNING
    assert triage.action_required is False
    assert triage.event_type is EventType.HARDWARE


def test_baseline_ignores_error_inside_word() -> None:
    triage = classify_line("switch_module 1 Linkerror event interval expired")
    assert triage.severity is Severity.INFO


def test_baseline_plain_line_is_info_other() -> None:
    triage = classify_line("node-1 running")
    assert triage.severity is Severity.INFO
    assert triage.event_type is EventType.OTHER


def test_baseline_prediction_uses_schema_values() -> None:
    prediction = baseline_prediction("RAS KERNEL FATAL data TLB error interrupt")
    assert prediction == Prediction(
        severity="critical",
        event_type="memory",
        action_required=True,
        component="KERNEL",
    )


# Workflow stepping with a fake model -------------------------------------------


def test_dead_record_scored_as_wrong(tmp_path: Path) -> None:
    store = Store(tmp_path / "appliance.db")
    engine = FakeEngine([VALID_OUTPUT, "not json", "not json", "not json"])
    workflow = Workflow(
        store.path, engine, schema_to_gbnf(log_event_schema()), SamplingParams()
    )
    lines = [_line(1, "KERNDTLB", alert=True), _line(2, "KERNDTLB", alert=True)]
    try:
        record_ids = insert_records(store, "eval:test", lines)
        outcomes = settle_records(workflow, store, record_ids, lines)
    finally:
        store.close()
    assert [o.state for o in outcomes] == [RecordState.VALIDATED, RecordState.DEAD]
    assert outcomes[1].attempts == 3
    assert outcomes[1].prediction == Prediction()
    scores = score_predictions(
        DatasetFormat.BGL, lines, [o.prediction for o in outcomes]
    )
    assert scores["action_required"]["recall"] == 0.5
    assert scores["component"]["accuracy"] == 0.5


def test_insert_records_uses_line_id_as_seq(tmp_path: Path) -> None:
    store = Store(tmp_path / "appliance.db")
    try:
        insert_records(store, "eval:test", [_line(7, "-"), _line(9, "-")])
        seqs = [row["seq"] for row in store.list_records()]
    finally:
        store.close()
    assert seqs == [7, 9]


# The command ------------------------------------------------------------------


def _eval(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APPLIANCE, "eval", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=EVAL_TIMEOUT,
        check=False,
    )


def test_limit_with_sample_is_usage_error(tmp_path: Path) -> None:
    result = _eval(str(SAMPLE), "--limit", "2", "--sample", "2", data_dir=tmp_path)
    assert result.returncode == 2
    assert "--limit" in result.stderr


def test_seed_without_sample_is_usage_error(tmp_path: Path) -> None:
    result = _eval(str(SAMPLE), "--seed", "1", data_dir=tmp_path)
    assert result.returncode == 2
    assert "--sample" in result.stderr


def test_non_csv_dataset_is_error(tmp_path: Path) -> None:
    result = _eval(str(SAMPLE), "--limit", "1", data_dir=tmp_path)
    assert result.returncode == 1
    assert str(SAMPLE) in result.stderr


@pytest.fixture(scope="module")
def bgl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One real `appliance eval --sample 6 --seed 1 --json` run on BGL."""
    if not BGL_CSV.is_file():
        pytest.skip(f"loghub dataset {BGL_CSV} is not present")
    data_dir = tmp_path_factory.mktemp("eval")
    result = _eval(
        str(BGL_CSV), "--sample", "6", "--seed", "1", "--json", data_dir=data_dir
    )
    assert result.returncode == 0, result.stderr
    return data_dir, json.loads(result.stdout)


@pytest.mark.model
def test_eval_json_counts_records(bgl_run: tuple[Path, dict]) -> None:
    _, report = bgl_run
    assert report["records"] == 6
    assert report["valid"] == report["records"]
    assert report["sample"] == 6
    assert report["seed"] == 1
    assert report["dataset"] == str(BGL_CSV.resolve())
    assert report["model_name"].endswith(".gguf")
    assert report["duration_s"] > 0


@pytest.mark.model
@pytest.mark.parametrize("side", ["model", "baseline"])
def test_eval_json_has_accuracy_figures(bgl_run: tuple[Path, dict], side: str) -> None:
    scores = bgl_run[1][side]
    for figure in ("action_required", "severity", "component"):
        assert isinstance(scores[figure]["accuracy"], float), figure
    assert set(scores["action_required"]["per_class"]) == {"positive", "negative"}
    assert "share" in scores["event_type_consistency"]


@pytest.mark.model
def test_eval_prints_table(bgl_run: tuple[Path, dict]) -> None:
    # The answer cache in this data directory contains the JSON run's
    # completions, so this run reads them instead of running the model again.
    data_dir, report = bgl_run
    result = _eval(str(BGL_CSV), "--sample", "6", "--seed", "1", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "action_required" in result.stdout
    assert f"valid    {report['valid']} of 6" in result.stdout


@pytest.mark.model
def test_eval_hpc_limit(tmp_path: Path) -> None:
    if not HPC_CSV.is_file():
        pytest.skip(f"loghub dataset {HPC_CSV} is not present")
    result = _eval(str(HPC_CSV), "--limit", "2", "--json", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["records"] == 2
    assert report["format"] == "hpc"
    assert "event_type" in report["model"]
