"""`appliance doctor`: check ports, BLE, the model, disk, clock and sink, with fixes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.doctor import DoctorOptions, Status, format_text, run_checks, to_json
from appliance.models import MANIFEST_DIR, assembled_model_dir
from appliance.paths import default_data_dir


@click.command("doctor")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML configuration to check, as passed to `appliance run --config`.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help="Data directory of the daemon to check.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--min-free-mb",
    type=click.FloatRange(min=0),
    default=100.0,
    show_default=True,
    help="Free space, in MiB, below which the disk space check fails.",
)
@click.option(
    "--min-free-inodes",
    type=click.FloatRange(min=0, max=100),
    default=1.0,
    show_default=True,
    help="Free inodes, in percent, below which the inode check fails.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=3.0,
    show_default=True,
    help="Seconds each network, D-Bus or port check may take.",
)
@click.option(
    "--rehash",
    is_flag=True,
    help="Hash the model file even when a stored result for it is still valid.",
)
@click.option(
    "--manifest-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=MANIFEST_DIR,
    show_default="models/ in the source tree",
    help="Directory of model manifests (NAME.json).",
)
@click.option(
    "--assembled-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=assembled_model_dir,
    show_default="share/field-relay/models in the Python environment",
    help="Directory of model files assembled from chunk packages.",
)
def doctor_command(
    config_path: Path | None,
    data_dir: Path,
    as_json: bool,
    min_free_mb: float,
    min_free_inodes: float,
    timeout: float,
    rehash: bool,
    manifest_dir: Path,
    assembled_dir: Path,
) -> None:
    """Check that this machine can run the appliance and print the fix per problem.

    Prints one PASS, WARN, FAIL or INFO line per check. The checks cover the
    configuration, the data directory, free disk space and inodes, the model
    file and its SHA-256, each serial link's port and the BLE adapter. They also
    cover the clock, the sink and its credentials file, and whether a daemon is
    running. Exits 1 when a check failed, 0 otherwise.
    """
    options = DoctorOptions(
        data_dir=data_dir,
        config_path=config_path,
        min_free_bytes=int(min_free_mb * 2**20),
        min_free_inodes_percent=min_free_inodes,
        timeout=timeout,
        manifest_dir=manifest_dir,
        assembled_dir=assembled_dir,
        use_hash_cache=not rehash,
    )
    results = run_checks(options)
    click.echo(to_json(results) if as_json else format_text(results))
    if any(result.status == Status.FAIL for result in results):
        sys.exit(1)
