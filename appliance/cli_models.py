"""The `appliance models` commands: manifests, signed bundles and the active model.

``list``, ``verify`` and ``assemble`` work on the manifests in models/.
``keygen`` and ``sign`` are the signer's side of a bundle, ``install``,
``rollback`` and ``active`` the appliance's (docs/models.md). Each command calls
one library function and turns its errors into one ``error:`` line on stderr
with exit code 1. None of them downloads anything.
"""

from __future__ import annotations

import json
import logging
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
from appliance.paths import default_data_dir


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


def _data_dir_option(func: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=default_data_dir,
        show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
        help="Data directory; installed models are in its models/ folder.",
    )(func)


def _bundle_options(func: Any) -> Any:
    func = click.option(
        "--trusted-keys",
        "trusted_keys",
        multiple=True,
        type=click.Path(path_type=Path, file_okay=False),
        help="Directory of trusted public keys (*.pub); repeat for more. "
        "Default: DATA_DIR/trusted-keys and /etc/field-relay/trusted-keys.",
    )(func)
    return _data_dir_option(func)


def _trusted_keys(data_dir: Path, directories: tuple[Path, ...]) -> dict[str, Any]:
    from appliance.model_keys import default_trusted_key_dirs, load_trusted_keys

    return load_trusted_keys(list(directories) or default_trusted_key_dirs(data_dir))


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group("models")
def models_group() -> None:
    """Manage model files and signed model bundles (docs/models.md)."""


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
@_bundle_options
@click.option(
    "--bundle",
    type=click.Path(path_type=Path, exists=True),
    help="Check this bundle's signature and model file instead; installs nothing.",
)
@click.argument("names", nargs=-1)
def verify_command(
    manifest_dir: Path,
    assembled_dir: Path,
    data_dir: Path,
    trusted_keys: tuple[Path, ...],
    bundle: Path | None,
    names: tuple[str, ...],
) -> None:
    """Check model files against their manifests, or a bundle against its signature.

    Compares each file's size and SHA-256 with its manifest. Without NAMES,
    checks every model whose file is present and fails if the default model is
    missing. Other absent models are reported as not installed. With NAMES,
    each named model's file must be present. Exits 1 on any MISMATCH or
    MISSING line.

    With --bundle, checks that the bundle is signed by a trusted key and that
    its model file matches the signed manifest, and exits 1 if not.
    """
    if bundle is not None:
        if names:
            raise click.UsageError("pass either NAMES or --bundle, not both")
        _verify_bundle(bundle, data_dir, trusted_keys)
        return
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


def _verify_bundle(bundle: Path, data_dir: Path, directories: tuple[Path, ...]) -> None:
    from appliance.model_bundles import verify_bundle

    try:
        verified = verify_bundle(bundle, _trusted_keys(data_dir, directories))
    except ApplianceError as exc:
        _fail(str(exc))
    manifest = verified.manifest
    click.echo(
        f"OK  {bundle}: model {manifest.name} {manifest.version}".rstrip()
        + f", {manifest.size_bytes} bytes, sha256 {manifest.sha256}, signed by key "
        f"{verified.key.key_id} ({verified.key.path})"
    )


# Signer's side ------------------------------------------------------------------


@models_group.command("keygen")
@click.option(
    "--private-key",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="File for the new private signing key (PEM, mode 0600).",
)
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File for the public key (PEM). [default: the private key's path + .pub]",
)
@click.option("--force", is_flag=True, help="Replace existing key files.")
def keygen_command(private_key: Path, public_key: Path | None, force: bool) -> None:
    """Create an Ed25519 key pair for signing model bundles.

    The private key is written unencrypted, so keep it on the signing machine
    only. Appliances trust bundles signed with it once the public key is in
    DATA_DIR/trusted-keys/ or /etc/field-relay/trusted-keys/.
    """
    from appliance.model_keys import generate_key_pair

    public_path = public_key or private_key.with_name(private_key.name + ".pub")
    try:
        identifier = generate_key_pair(private_key, public_path, force=force)
    except ApplianceError as exc:
        _fail(str(exc))
    click.echo(f"key {identifier}: private key {private_key}, public key {public_path}")


@models_group.command("sign")
@click.argument("gguf", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Private signing key from `appliance models keygen`.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Bundle file to write (a tar file).",
)
@click.option(
    "--name",
    help="Model name in the bundle. [default: the --settings-from manifest's name]",
)
@click.option(
    "--settings-from",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Manifest in --manifest-dir whose context size, chat template, sampling, "
    "threads, batch size, description and licence the bundle copies.",
)
@click.option(
    "--manifest-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=MANIFEST_DIR,
    show_default="models/ in the source tree",
    help="Directory of model manifests (NAME.json).",
)
@click.option("--version", "version", default="", help="Free-text model version.")
@click.option("--description", help="Replaces the copied description.")
@click.option("--license", "license_", help="Replaces the copied licence.")
@click.option(
    "--canary",
    "canary_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Canary set (JSON, as models/canary/default.json) to include; default: "
    "the installing appliance's default set.",
)
@click.option(
    "--min-valid-rate",
    type=click.FloatRange(0, 1),
    help="Canary threshold: share of inputs that must validate, 0 to 1.",
)
@click.option(
    "--min-accuracy",
    type=click.FloatRange(0, 1),
    help="Canary threshold: share of expected values that must match, 0 to 1.",
)
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
def sign_command(
    gguf: Path,
    key_path: Path,
    output: Path,
    name: str | None,
    settings_from: str,
    manifest_dir: Path,
    version: str,
    description: str | None,
    license_: str | None,
    canary_file: Path | None,
    min_valid_rate: float | None,
    min_accuracy: float | None,
    force: bool,
) -> None:
    """Pack GGUF into a bundle with a manifest signed by --key.

    The manifest contains the file's SHA-256 and size, the run settings of
    --settings-from and the canary set, and is signed with Ed25519. The
    finished bundle is verified with the key before it replaces --output.
    """
    from appliance.model_signing import SignRequest, sign_bundle
    from appliance.models import load_manifest

    try:
        canary = _read_canary(canary_file, min_valid_rate, min_accuracy)
        settings = load_manifest(settings_from, manifest_dir)
        request = SignRequest(
            gguf=gguf,
            name=name or settings.name,
            settings=settings,
            version=version,
            description=description,
            license=license_,
            canary=canary,
        )
        verified = sign_bundle(request, key_path, output, force=force)
    except ApplianceError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"writing bundle {str(output)!r} failed: {exc}")
    manifest = verified.manifest
    click.echo(
        f"{output}: model {manifest.name}, {manifest.size_bytes} bytes, sha256 "
        f"{manifest.sha256}, signed by key {verified.key.key_id}"
    )


def _read_canary(
    path: Path | None, min_valid_rate: float | None, min_accuracy: float | None
) -> dict[str, Any] | None:
    canary: dict[str, Any] | None = None
    if path is not None:
        try:
            canary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            _fail(f"cannot read canary set {str(path)!r}: {exc}")
        if not isinstance(canary, dict):
            _fail(f"canary set {str(path)!r} is not a JSON object")
    if min_valid_rate is not None:
        canary = {**(canary or {}), "min_valid_rate": min_valid_rate}
    if min_accuracy is not None:
        canary = {**(canary or {}), "min_accuracy": min_accuracy}
    return canary


# Appliance's side ---------------------------------------------------------------


@models_group.command("install")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@_bundle_options
@click.option(
    "--min-valid-rate",
    type=click.FloatRange(0, 1),
    help="Raise the canary's valid-rate threshold to this value, 0 to 1.",
)
@click.option(
    "--min-accuracy",
    type=click.FloatRange(0, 1),
    help="Raise the canary's accuracy threshold to this value, 0 to 1.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log each canary step.")
def install_command(
    bundle: Path,
    data_dir: Path,
    trusted_keys: tuple[Path, ...],
    min_valid_rate: float | None,
    min_accuracy: float | None,
    verbose: bool,
) -> None:
    """Verify BUNDLE, run its canary with the new model and make it active.

    The bundle must be signed by a trusted key and its model file must match
    the signed manifest. The model is copied into DATA_DIR/models/ and must
    reach the canary thresholds (the bundle's, raised by --min-valid-rate and
    --min-accuracy) before it becomes active. The model it replaces is kept
    for `appliance models rollback`. A running daemon keeps its model until it
    is restarted.
    """
    from appliance.model_canary import CanaryFailedError
    from appliance.model_install import install_bundle
    from appliance.paths import prepare_data_dir

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        prepare_data_dir(data_dir)
        result = install_bundle(
            bundle,
            data_dir,
            _trusted_keys(data_dir, trusted_keys),
            min_valid_rate=min_valid_rate,
            min_accuracy=min_accuracy,
        )
    except CanaryFailedError as exc:
        for index, outcome in enumerate(exc.report.results, start=1):
            for miss in outcome["mismatches"]:
                click.echo(
                    f"canary input {index} ({outcome['state']}): {miss['field']} "
                    f"expected {miss['expected']}, got {miss['actual']!r}",
                    err=True,
                )
        _fail(str(exc))
    except ApplianceError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(
            f"installing {str(bundle)!r} failed: {exc}; check the free space of {str(data_dir)!r}"
        )
    key = result.verified.key
    if result.report is None:
        click.echo(
            f"{result.installed.name} is already the active model; nothing changed"
        )
        return
    click.echo(
        f"installed {result.installed.name} (signed by key {key.key_id}, {key.path})"
    )
    click.echo(f"canary: {result.report.summary()}")
    click.echo(
        f"active: {result.pointer.active}, previous: "
        f"{result.pointer.previous or 'built-in default'}; restart the daemon to load it"
    )


@models_group.command("rollback")
@_data_dir_option
def rollback_command(data_dir: Path) -> None:
    """Make the previously active model active again.

    The model it replaces becomes the previous one, so a second rollback undoes
    the first. A running daemon keeps its model until it is restarted.
    """
    from appliance.model_install import rollback

    try:
        pointer = rollback(data_dir)
    except ApplianceError as exc:
        _fail(str(exc))
    click.echo(
        f"active: {pointer.active or 'built-in default'}, previous: "
        f"{pointer.previous or 'built-in default'}; restart the daemon to load it"
    )


@models_group.command("active")
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def active_command(data_dir: Path, as_json: bool) -> None:
    """Show the active and previous model and every installed model.

    A command that infers without --model loads the active model; with none
    installed, it loads the built-in default model.
    """
    from appliance.model_install import list_installed, read_pointer

    try:
        pointer = read_pointer(data_dir)
        installed = list_installed(data_dir)
    except ApplianceError as exc:
        _fail(str(exc))
    rows = [_installed_row(entry, pointer.active) for entry in installed]
    if as_json:
        click.echo(json.dumps({**pointer.to_json(), "installed": rows}, indent=2))
        return
    click.echo(f"active:   {pointer.active or f'built-in default ({DEFAULT_MODEL})'}")
    click.echo(f"previous: {pointer.previous or 'built-in default'}")
    for row in rows:
        mark = "*" if row["active"] else " "
        click.echo(f"{mark} {row['name']}  {row['detail']}")


def _installed_row(entry: Any, active: str | None) -> dict[str, Any]:
    if isinstance(entry, ApplianceError):
        return {
            "name": str(getattr(entry, "path", "?")),
            "active": False,
            "detail": f"broken: {entry}",
        }
    bundle = entry.bundle_manifest() or {}
    canary = entry.canary_report() or {}
    return {
        "name": entry.name,
        "active": entry.name == active,
        "path": str(entry.model_path),
        "version": bundle.get("version", ""),
        "sha256": entry.manifest.sha256,
        "canary_accuracy": canary.get("accuracy"),
        "detail": f"version {bundle.get('version') or '-'}, canary accuracy "
        f"{canary.get('accuracy', '-')}, {entry.model_path}",
    }
