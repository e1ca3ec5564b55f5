"""Labelled loghub CSV files read as raw device lines with separate ground truth.

Each CSV row becomes a ``LabelledLine``: the raw line a device prints, built
only from the columns that the original log line holds, and the ground truth
kept apart from it. Two layouts are known: loghub's BGL and HPC 2k samples.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import SetupError
from appliance.log_event import EventType


class DatasetFormat(enum.StrEnum):
    """Layout of a loghub structured CSV file."""

    BGL = "bgl"
    """Blue Gene/L, with the administrators' alert tag in ``Label``."""
    HPC = "hpc"
    """LANL HPC cluster, without anomaly labels."""


LINE_COLUMNS: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.BGL: (
        "Timestamp",
        "Date",
        "Node",
        "Time",
        "NodeRepeat",
        "Type",
        "Component",
        "Level",
        "Content",
    ),
    DatasetFormat.HPC: (
        "LogId",
        "Node",
        "Component",
        "State",
        "Time",
        "Flag",
        "Content",
    ),
}
"""Columns joined with single spaces into the raw line, in the original log's
order. BGL's ``Label`` column is ground truth and is deliberately absent."""

TRUTH_COLUMNS: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.BGL: ("LineId", "Label", "Component", "EventId"),
    DatasetFormat.HPC: ("LineId", "Component", "State", "EventId"),
}
"""Columns read for ids and ground truth, besides ``LINE_COLUMNS``."""

HPC_STATE_EVENT_TYPE: dict[str, EventType] = {
    "temperature": EventType.HARDWARE,
    "temphigh": EventType.HARDWARE,
    "fan": EventType.HARDWARE,
    "psu": EventType.HARDWARE,
    "control": EventType.HARDWARE,
    "net.niff.up": EventType.NETWORK,
    "net.niff.down": EventType.NETWORK,
    "bcast-error": EventType.NETWORK,
    "clusterfilesystem.not_served": EventType.STORAGE,
    "clusterfilesystem.no_server": EventType.STORAGE,
    "fdmn.full": EventType.STORAGE,
    "fdmn.panic": EventType.STORAGE,
    "start": EventType.JOB,
    "success": EventType.JOB,
    "abort": EventType.JOB,
    "new": EventType.JOB,
    "status": EventType.STATUS,
}
"""Expected ``event_type`` for an HPC ``State`` value. ``error`` is resolved by
``HPC_ERROR_EVENT_TYPE``. ``state_change.unavailable`` is left unscored because
it covers both SCSI disks and network interfaces."""

HPC_ERROR_EVENT_TYPE: dict[str, EventType] = {
    "switch_module": EventType.NETWORK,
    "action": EventType.JOB,
    "boot_cmd": EventType.JOB,
}
"""Expected ``event_type`` of HPC ``error`` lines by ``Component``: switch
modules report link errors, and action and boot_cmd report failed commands."""

HPC_ACTION_TEMPLATES = "E5 E10 E15 E16 E23 E27 E32 E33 E34 E35 E37 E39 E40 E44".split()
HPC_NO_ACTION_TEMPLATES = (
    "E1 E2 E4 E6 E7 E8 E12 E18 E19 E25 E28 E29 E30 E31 E36 E38 E41 E42 E43 E45"
).split()
HPC_ACTION_LABELS: dict[str, bool] = {
    **dict.fromkeys(HPC_ACTION_TEMPLATES, True),
    **dict.fromkeys(HPC_NO_ACTION_TEMPLATES, False),
}
"""Hand labels of ``action_required`` per HPC template (EventId).

The source marks no anomalies, so these are judgements made for this
evaluation, listed with their templates in docs/quality.md. Templates whose
urgency a single line cannot show (a temperature "warning", a node "configured
out", one link error or reset, a command aborted) have no label and are not
scored."""


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Ground truth of one line; None marks a figure that is not scored on it."""

    event_id: str
    """loghub's template id; lines of one template should get one event type."""
    component: str
    action_required: bool | None = None
    severe: bool | None = None
    """True when the severity should be error or critical (BGL: an alert)."""
    event_type: EventType | None = None


@dataclasses.dataclass(frozen=True)
class LabelledLine:
    """One dataset row: the raw line for the model and baseline, and its truth."""

    line_id: int
    raw: str
    stratum: str
    """Group that stratified sampling draws from: BGL ``Label``, HPC ``State``."""
    truth: GroundTruth


def build_raw_line(row: dict[str, str], dataset_format: DatasetFormat) -> str:
    """Return the line the device printed for ``row``, without any truth column."""
    return " ".join(row[column] for column in LINE_COLUMNS[dataset_format])


def load_dataset(path: Path) -> tuple[DatasetFormat, list[LabelledLine]]:
    """Read a loghub BGL or HPC structured CSV file.

    Raises:
        SetupError: the file cannot be read, its header matches neither
            layout, or a row has no valid ``LineId``.
    """
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            dataset_format = _detect_format(path, header)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SetupError(f"cannot read dataset {str(path)!r}: {exc}") from exc

    lines = [_labelled_line(path, row, dataset_format) for row in rows]
    if not lines:
        raise SetupError(f"dataset {str(path)!r} has a header but no rows")
    return dataset_format, lines


def _detect_format(path: Path, header: Sequence[str]) -> DatasetFormat:
    for dataset_format in DatasetFormat:
        needed = {*LINE_COLUMNS[dataset_format], *TRUTH_COLUMNS[dataset_format]}
        if needed <= set(header):
            return dataset_format
    raise SetupError(
        f"dataset {str(path)!r} is not a loghub BGL or HPC structured CSV: its "
        f"header is {header!r}; pass a *_2k.log_structured.csv file from loghub"
    )


def _labelled_line(
    path: Path, row: dict[str, str], dataset_format: DatasetFormat
) -> LabelledLine:
    try:
        line_id = int(row["LineId"])
    except (TypeError, ValueError) as exc:
        raise SetupError(
            f"dataset {str(path)!r}: invalid LineId {row.get('LineId')!r}"
        ) from exc
    raw = build_raw_line(row, dataset_format)
    if dataset_format is DatasetFormat.BGL:
        alert = row["Label"] != "-"
        truth = GroundTruth(
            event_id=row["EventId"],
            component=row["Component"],
            action_required=alert,
            severe=alert,
        )
        return LabelledLine(line_id, raw, row["Label"], truth)

    state = row["State"]
    event_type = HPC_STATE_EVENT_TYPE.get(state)
    if state == "error":
        event_type = HPC_ERROR_EVENT_TYPE.get(row["Component"])
    truth = GroundTruth(
        event_id=row["EventId"],
        component=row["Component"],
        action_required=HPC_ACTION_LABELS.get(row["EventId"]),
        event_type=event_type,
    )
    return LabelledLine(line_id, raw, state, truth)
