"""The `appliance models` commands: list, verify and assemble model files.

Each command calls one library function and turns its errors into one
``error:`` line on stderr with exit code 1. None of them downloads anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from appliance.errors import ApplianceError
from appliance.model_files import VerifyStatus, assemble_model, verify_models
from appliance.models import (
    DEFAULT_MODEL,
    MANIFEST_DIR,
    ModelManifest,
    assembled_model_dir,
    list_manifests,
    model_file_path,
)


def _directory_options(func: Any) -> Any:
    func = click.option(
        "--assembled-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=assembled_model_dir,
        show_default="share/field-relay/models in the Python environment",
        help="Directory of model files assembled from chunk packages.",
    )(func)
    return click.option(
        "--manifest-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=MANIFEST_DIR,
        show_default="models/ in the source tree",
        help="Directory of model manifests (NAME.json).",
    )(func)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group("models")
def models_group() -> None:
    """List, verify and assemble the model files described in models/."""


@models_group.command("list")
@_directory_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def list_command(manifest_dir: Path, assembled_dir: Path, as_json: bool) -> None:
    """List manifests and their installed files.

    Prints each manifest in --manifest-dir with its licence, source, whether its
    GGUF file is present, the file's path and its size.
    """
    try:
        rows = [_summary(m, assembled_dir) for m in list_manifests(manifest_dir)]
    except ApplianceError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _echo_table(rows)


def _summary(manifest: ModelManifest, assembled_dir: Path) -> dict[str, Any]:
    path = model_file_path(manifest, assembled_dir)
    size = path.stat().st_size if path is not None and path.is_file() else None
    return {
        "name": manifest.name,
        "default": manifest.name == DEFAULT_MODEL,
        "description": manifest.description,
        "license": manifest.license,
        "source": manifest.source.to_json(),
        "present": size is not None,
        "path": str(path) if path is not None else None,
        "size_bytes": size,
        "expected_size_bytes": manifest.size_bytes,
        "sha256": manifest.sha256,
        "context_size": manifest.context_size,
        "chat_template": manifest.chat_template,
    }


def _echo_table(rows: list[dict[str, Any]]) -> None:
    header = ("name", "license", "present", "size", "source", "path")
    table = [header]
    for row in rows:
        size = row["size_bytes"]
        table.append(
            (
                row["name"] + (" (default)" if row["default"] else ""),
                row["license"],
                "yes" if row["present"] else "no",
                f"{size / 1e6:.1f} MB" if size is not None else "-",
                _describe_source(row["source"]),
                row["path"] or "-",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        cells = [line[i].ljust(width) for i, width in enumerate(widths)]
        click.echo("  ".join([*cells, line[-1]]))


def _describe_source(source: dict[str, Any]) -> str:
    if source["kind"] == "package":
        return f"package {source['package']}"
    if source["kind"] == "chunks":
        return f"{len(source['chunks'])} chunk packages"
    return "file"


@models_group.command("verify")
@_directory_options
@click.argument("names", nargs=-1)
def verify_command(
    manifest_dir: Path, assembled_dir: Path, names: tuple[str, ...]
) -> None:
    """Check model files against their manifests.

    Compares each file's size and SHA-256 with its manifest. Without NAMES,
    checks every model whose file is present and fails if the default model is
    missing. Other absent models are reported as not installed. With NAMES,
    each named model's file must be present. Exits 1 on any MISMATCH or
    MISSING line.
    """
    try:
        results = verify_models(
            list(names), manifest_dir=manifest_dir, assembled_dir=assembled_dir
        )
    except ApplianceError as exc:
        _fail(str(exc))
    width = max(len(status.value) for status in VerifyStatus)
    for result in results:
        line = f"{result.status.value:<{width}}  {result.name}: {result.detail}"
        if result.fix:
            line += f"; fix: {result.fix}"
        click.echo(line)
    failed = [result.name for result in results if result.failed]
    if failed:
        _fail(
            f"{len(failed)} of {len(results)} models failed verification: "
            f"{', '.join(failed)}"
        )


@models_group.command("assemble")
@_directory_options
@click.argument("name")
def assemble_command(manifest_dir: Path, assembled_dir: Path, name: str) -> None:
    """Join a model's chunk packages into one file.

    Concatenates the installed chunk packages of model NAME into one GGUF file
    and checks it against the manifest's size and SHA-256. The chunk packages
    must be installed first (`make gemma` installs them and then runs this
    command). The file is written to --assembled-dir and replaces an existing
    file only after its SHA-256 matches the manifest.
    """
    try:
        path = assemble_model(
            name, manifest_dir=manifest_dir, assembled_dir=assembled_dir
        )
    except ApplianceError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(
            f"assembling model {name!r} failed: {exc}; check the free space and "
            f"permissions of {str(assembled_dir)!r} or choose another directory "
            "with --assembled-dir"
        )
    click.echo(f"{name}: {path} (size and sha256 match the manifest)")
