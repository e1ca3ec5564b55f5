"""The `appliance eval` command: model and keyword baseline scored on labelled lines."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from appliance.cli_options import model_options
from appliance.errors import ApplianceError
from appliance.paths import default_data_dir

logger = logging.getLogger(__name__)

SCORE_ROWS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "binary": [
        ("accuracy", ("accuracy",)),
        ("balanced accuracy", ("balanced_accuracy",)),
        ("precision, positive class", ("precision",)),
        ("recall, positive class", ("recall",)),
        ("f1, positive class", ("f1",)),
        ("precision, negative class", ("per_class", "negative", "precision")),
        ("recall, negative class", ("per_class", "negative", "recall")),
    ],
    "match": [("accuracy", ("accuracy",)), ("answered", ("coverage",))],
    "consistency": [("majority share", ("share",))],
}
"""Table rows per kind of figure: the label and the key path into its scores."""

POSITIVE_CLASS = {
    "bgl": "positive class: an alert (Label is not -); for severity, a "
    "prediction of error or critical counts as positive",
    "hpc": "positive class: action required, by the hand labels per template "
    "in docs/quality.md",
}
"""Table footer per dataset format that names the positive class."""


@click.command("eval")
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--limit", type=click.IntRange(min=1), help="Score the first N rows only."
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    help="Score a sample of N rows, stratified by BGL Label or HPC State.",
)
@click.option(
    "--seed",
    type=int,
    help="Random seed of --sample; the same seed draws the same rows. [default: 0]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help="Data directory; eval records and their answer cache go to its eval/ folder.",
)
@model_options
@click.option("-v", "--verbose", is_flag=True, help="Log every state change.")
def eval_command(
    dataset: Path,
    limit: int | None,
    sample: int | None,
    seed: int | None,
    as_json: bool,
    data_dir: Path,
    model: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Score the model and a keyword baseline on a labelled loghub CSV file.

    DATASET is a loghub BGL or HPC *_log_structured.csv file. Every selected
    row goes through the daemon's prompt, output constraint, model, validation and retry
    policy, and the same raw line goes to the keyword baseline. Without
    --limit or --sample every row is scored; docs/benchmarks.md gives the
    model's time per line.
    """
    from appliance.evaluation import EvalRequest, run_evaluation

    if limit is not None and sample is not None:
        raise click.UsageError("pass at most one of --limit and --sample")
    if seed is not None and sample is None:
        raise click.UsageError("--seed only applies together with --sample")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    request = EvalRequest(
        dataset=dataset,
        limit=limit,
        sample=sample,
        seed=seed or 0,
        model=model,
        threads=threads,
    )
    try:
        report = run_evaluation(data_dir, request)
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo(format_report(report))


def format_report(report: dict[str, Any]) -> str:
    """Render an evaluation report as a header and a model-vs-baseline table."""
    records = report["records"]
    if report["sample"] is not None:
        selection = f"stratified sample, seed {report['seed']}"
    elif report["limit"] is not None:
        selection = "first rows"
    else:
        selection = "all rows"
    strata = ", ".join(f"{key} {n}" for key, n in report["strata"].items())
    valid_share = 100.0 * report["valid"] / records if records else 0.0
    lines = [
        f"dataset  {report['dataset']} ({report['format']})",
        f"lines    {records}: {selection}",
        f"strata   {strata}",
        f"valid    {report['valid']} of {records} ({valid_share:.1f} %), "
        f"{report['first_attempt_valid']} on the first attempt",
        f"model    {report['model_name']}, prompt sha256 "
        f"{report['prompt_sha256'][:12]}, threads {report['threads']}, "
        f"{report['duration_s']:.1f} s",
        "",
        f"{'figure':<24}{'score':<28}{'model':>8}{'baseline':>10}  lines",
    ]
    for figure, model_scores in report["model"].items():
        baseline_scores = report["baseline"][figure]
        for index, (label, path) in enumerate(SCORE_ROWS[_kind(model_scores)]):
            name = figure if index == 0 else ""
            count = str(model_scores["lines"]) if index == 0 else ""
            row = (
                f"{name:<24}{label:<28}"
                f"{_format_value(_lookup(model_scores, path)):>8}"
                f"{_format_value(_lookup(baseline_scores, path)):>10}  {count}"
            )
            lines.append(row.rstrip())
    lines += [
        "",
        POSITIVE_CLASS.get(report["format"], ""),
        "dead outputs count as wrong",
    ]
    return "\n".join(lines)


def _kind(scores: dict[str, Any]) -> str:
    if "per_class" in scores:
        return "binary"
    if "share" in scores:
        return "consistency"
    return "match"


def _lookup(scores: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = scores
    for key in path:
        value = value[key]
    return value


def _format_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
