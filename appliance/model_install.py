"""Installing verified model bundles, switching the active model and rolling back.

Layout under ``<data dir>/models/``::

    <name>-<sha8>/           one installed model
        <name>-<sha8>.gguf       the model file
        <name>.json              its model manifest, in the form of models/*.json
        bundle.json, bundle.sig  the signed bundle manifest and its signature
        canary.json              the canary report of its installation
    active.json              the pointer: {"active", "previous", "switched_at"}
    install.lock             held by install and rollback, so they run one at a time
    .staging-*, .canary-*    work directories of an install in progress

Invariant: ``active.json`` is only ever replaced whole (a temporary file is
written and fsynced, then renamed over it with ``os.replace``), and it names a
model only after that model's directory is complete and its canary passed. A
crash at any earlier step leaves the old pointer, so the old model stays
active, and the next install removes the work directories left behind.
``null`` in ``active`` or ``previous`` stands for the built-in default model
of models/. After a switch, an install deletes the installed models that the
new pointer names in neither field.

Crash tests stop the process at the ``appliance.faults`` points
``model_install.staged`` (model copied, not yet in place),
``model_install.placed`` (in place, canary not run), ``model_install.canary_passed``
and ``model_install.pointer_staged`` (new pointer written, not yet renamed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance import faults
from appliance.errors import (
    ApplianceError,
    ModelChecksumError,
    ModelManifestError,
    ModelNotFoundError,
    SetupError,
)
from appliance.model_bundles import (
    BundleReader,
    VerifiedBundle,
    copy_model_file,
    verify_signature,
)
from appliance.model_canary import (
    CanaryFailedError,
    CanaryReport,
    CanarySet,
    parse_canary_set,
    run_canary,
)
from appliance.model_keys import TrustedKey
from appliance.model_manifest import ModelManifest, PathSource, parse_manifest
from appliance.models import ModelSelection

logger = logging.getLogger(__name__)

MODELS_SUBDIR = "models"
"""Subdirectory of the data directory that contains installed models."""
POINTER_NAME = "active.json"
LOCK_NAME = "install.lock"
STAGING_PREFIX = ".staging-"
CANARY_PREFIX = ".canary-"
GRAMMAR_CHECKS_SUBDIR = "grammar-checks"
"""Subdirectory of the data directory where the daemon remembers passed grammar
checks; the canary shares it."""

_INSTALLED_PATTERN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)-[0-9a-f]{8}")

CanaryRunner = Callable[[ModelSelection, CanarySet, Path, Path | None], CanaryReport]
"""Signature of ``run_canary``: selection, canary set, work directory, grammar
check directory. Tests pass their own runner."""


class ModelInstallError(SetupError):
    """An install or rollback cannot run, or the pointer or an installed model is broken.

    Attributes:
        path: the file or directory concerned.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclasses.dataclass(frozen=True)
class ActivePointer:
    """Contents of ``active.json``: installed directory names, None for built-in."""

    active: str | None
    previous: str | None
    """The model that was active before; ``appliance models rollback`` returns to it."""
    switched_at: str | None = None
    """UTC time of the last switch, ISO 8601."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class InstalledModel:
    """One directory under ``<data dir>/models``."""

    directory: Path
    manifest: ModelManifest
    model_path: Path

    @property
    def name(self) -> str:
        return self.directory.name

    def selection(self) -> ModelSelection:
        return ModelSelection(self.manifest, self.model_path, by_path=False)

    def canary_report(self) -> dict[str, Any] | None:
        """Return the saved canary report, or None when there is none."""
        try:
            return json.loads((self.directory / "canary.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def bundle_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.directory / "bundle.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None


@dataclasses.dataclass(frozen=True)
class InstallResult:
    """Outcome of ``install_bundle``."""

    verified: VerifiedBundle
    installed: InstalledModel
    pointer: ActivePointer
    report: CanaryReport | None
    """The canary run, or None when the bundle's model was already active."""

    @property
    def already_active(self) -> bool:
        return self.report is None


def models_root(data_dir: Path) -> Path:
    return data_dir / MODELS_SUBDIR


# The pointer --------------------------------------------------------------------


def read_pointer(data_dir: Path) -> ActivePointer:
    """Read ``active.json``; without one, the built-in model is active.

    Raises:
        ModelInstallError: the file is unreadable or not a valid pointer.
    """
    path = models_root(data_dir) / POINTER_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ActivePointer(None, None)
    except OSError as exc:
        raise ModelInstallError(
            f"cannot read the active model pointer {str(path)!r}: {exc.strerror}", path
        ) from exc
    try:
        data = json.loads(text)
        pointer = ActivePointer(
            data["active"], data["previous"], data.get("switched_at")
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelInstallError(
            f"the active model pointer {str(path)!r} is invalid ({exc!r}); delete it "
            "to use the built-in default model, then install a bundle again",
            path,
        ) from exc
    for value in (pointer.active, pointer.previous):
        if value is not None and not _is_installed_name(value):
            raise ModelInstallError(
                f"the active model pointer {str(path)!r} names {value!r}, which is "
                "not an installed model directory; delete the file to use the "
                "built-in default model",
                path,
            )
    return pointer


def _is_installed_name(value: Any) -> bool:
    return isinstance(value, str) and _INSTALLED_PATTERN.fullmatch(value) is not None


def write_pointer(data_dir: Path, pointer: ActivePointer) -> None:
    """Replace ``active.json`` atomically and durably.

    Raises:
        OSError: the file cannot be written; the old pointer is still in place.
    """
    root = models_root(data_dir)
    handle, name = tempfile.mkstemp(dir=root, prefix=".active-", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(pointer.to_json(), file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        faults.point("model_install.pointer_staged")
        os.replace(temporary, root / POINTER_NAME)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(root)
    logger.info(
        "active model is now %s (previous %s)",
        pointer.active or "the built-in default",
        pointer.previous or "the built-in default",
    )


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Installed models ---------------------------------------------------------------


def load_installed(data_dir: Path, directory: str) -> InstalledModel:
    """Load an installed model's manifest and locate its file.

    Raises:
        ModelNotFoundError: the directory, its manifest or its model file is
            missing.
        ModelManifestError: its manifest is invalid.
    """
    match = _INSTALLED_PATTERN.fullmatch(directory)
    path = models_root(data_dir) / directory
    manifest_path = path / f"{match['name'] if match else directory}.json"
    fix = (
        "run `appliance models rollback`, install its bundle again with "
        "`appliance models install`, or delete "
        f"{str(models_root(data_dir) / POINTER_NAME)!r} to use the built-in model"
    )
    if not manifest_path.is_file():
        raise ModelNotFoundError(
            f"installed model {directory!r} is missing its manifest "
            f"{str(manifest_path)!r}; {fix}",
            manifest_path,
        )
    manifest = parse_manifest(manifest_path)
    if not isinstance(manifest.source, PathSource):
        raise ModelManifestError(
            f"installed model manifest {str(manifest_path)!r} must have a 'path' "
            "source",
            manifest_path,
            "source.kind",
        )
    model_path = manifest.source.path
    if not model_path.is_file():
        raise ModelNotFoundError(
            f"installed model {directory!r} is missing its file {str(model_path)!r}; "
            f"{fix}",
            model_path,
        )
    return InstalledModel(path, manifest, model_path)


def active_selection(data_dir: Path) -> ModelSelection | None:
    """Return the installed model that ``active.json`` names, or None for built-in.

    Raises:
        ModelInstallError: the pointer is invalid.
        ModelNotFoundError: the active model's directory or file is missing.
        ModelManifestError: its manifest is invalid.
    """
    pointer = read_pointer(data_dir)
    if pointer.active is None:
        return None
    return load_installed(data_dir, pointer.active).selection()


def list_installed(data_dir: Path) -> list[InstalledModel | ApplianceError]:
    """Load every installed model, oldest first; a broken one is listed as its error."""
    root = models_root(data_dir)
    if not root.is_dir():
        return []
    entries: list[InstalledModel | ApplianceError] = []
    directories = [
        path
        for path in root.iterdir()
        if path.is_dir() and _INSTALLED_PATTERN.fullmatch(path.name)
    ]
    for path in sorted(directories, key=lambda item: item.stat().st_mtime):
        try:
            entries.append(load_installed(data_dir, path.name))
        except ApplianceError as exc:
            entries.append(exc)
    return entries


# Install and rollback -----------------------------------------------------------


def install_bundle(
    bundle: Path,
    data_dir: Path,
    trusted_keys: dict[str, TrustedKey],
    *,
    min_valid_rate: float | None = None,
    min_accuracy: float | None = None,
    canary_runner: CanaryRunner = run_canary,
) -> InstallResult:
    """Verify, copy, canary-test and activate a bundle; keep the old model for rollback.

    The steps are: verify the signature with ``trusted_keys``, copy the model
    into a staging directory while checking its hash, move it into place, run
    the canary, and switch ``active.json``. ``min_valid_rate`` and
    ``min_accuracy`` raise the canary set's thresholds; they never lower them.
    A bundle whose model is already active is verified and left as it is.

    Raises:
        BundleError, KeyFileError: the bundle or its signature is invalid or
            not trusted (see ``model_bundles.verify_signature``).
        ModelChecksumError: the model file differs from the signed manifest.
        CanaryFailedError: the model scored below a threshold. The active model
            is unchanged, and the new one was removed unless it is the previous
            model, which stays for rollback.
        ModelInstallError: another install or rollback is running.
        SetupError: the canary could not load or run the model; it was removed
            as above.
        OSError: the data directory cannot be written.
    """
    root = models_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root):
        _remove_work_directories(root)
        pointer = read_pointer(data_dir)
        with BundleReader(bundle) as reader:
            verified = verify_signature(reader, trusted_keys)
            manifest = verified.manifest
            directory = f"{manifest.name}-{manifest.sha256[:8]}"
            if pointer.active == directory and (root / directory).is_dir():
                copy_model_file(reader, manifest, None)
                installed = load_installed(data_dir, directory)
                logger.info("bundle %s: model %s is already active", bundle, directory)
                return InstallResult(verified, installed, pointer, None)
            staging = _stage(reader, verified, root, directory)
        target = root / directory
        _move_into_place(staging, target)
        faults.point("model_install.placed")

        canary = parse_canary_set(manifest.canary).with_floor(
            min_valid_rate, min_accuracy
        )
        try:
            report = _run_canary(data_dir, target, canary, canary_runner)
        except ApplianceError:
            _discard(target, pointer)
            raise
        if not report.passed:
            _discard(target, pointer)
            raise CanaryFailedError(
                f"model {directory} from bundle {str(bundle)!r} failed its canary "
                f"and was not activated: {report.summary()}; the active model is "
                f"still {pointer.active or 'the built-in default'}",
                report,
            )
        faults.point("model_install.canary_passed")

        switched = ActivePointer(directory, pointer.active, _now())
        write_pointer(data_dir, switched)
        _prune(data_dir, switched)
        installed = load_installed(data_dir, directory)
        return InstallResult(verified, installed, switched, report)


def _stage(
    reader: BundleReader, verified: VerifiedBundle, root: Path, directory: str
) -> Path:
    """Copy and check the model and write its manifests into a new staging directory."""
    manifest = verified.manifest
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        model_file = f"{directory}.gguf"
        copy_model_file(reader, manifest, staging / model_file)
        os.chmod(staging / model_file, 0o644)
        files = {
            f"{manifest.name}.json": json.dumps(
                manifest.model_manifest_json(model_file), indent=2
            ).encode("utf-8"),
            "bundle.json": verified.manifest_bytes,
            "bundle.sig": verified.signature_bytes,
        }
        for name, data in files.items():
            _write_synced(staging / name, data)
        os.chmod(staging, 0o755)
        _fsync_directory(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    faults.point("model_install.staged")
    return staging


def _move_into_place(staging: Path, target: Path) -> None:
    # A directory of the same name is left over from a refused or interrupted
    # install, or it is the previous model being installed again. It is moved
    # aside first because a rename cannot replace a non-empty directory.
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
        os.replace(target, aside / target.name)
        os.replace(staging, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_directory(target.parent)


def _run_canary(
    data_dir: Path, target: Path, canary: CanarySet, runner: CanaryRunner
) -> CanaryReport:
    installed = load_installed(data_dir, target.name)
    with tempfile.TemporaryDirectory(prefix=CANARY_PREFIX, dir=target.parent) as work:
        report = runner(
            installed.selection(), canary, Path(work), data_dir / GRAMMAR_CHECKS_SUBDIR
        )
    _write_synced(
        target / "canary.json", json.dumps(report.to_json(), indent=2).encode("utf-8")
    )
    return report


def _discard(target: Path, pointer: ActivePointer) -> None:
    # The previous model installed again has the same directory name. Its
    # content is identical (same SHA-256), and it stays for rollback.
    if target.name not in (pointer.active, pointer.previous):
        shutil.rmtree(target, ignore_errors=True)


def rollback(data_dir: Path) -> ActivePointer:
    """Make the previous model active again; the model it replaces becomes previous.

    Rolling back twice therefore returns to where it started. The previous
    model's file is checked against its manifest's SHA-256 first.

    Raises:
        ModelInstallError: no model was active before, or another install or
            rollback is running.
        ModelNotFoundError, ModelChecksumError: the previous model is missing or
            damaged; the pointer is unchanged.
    """
    root = models_root(data_dir)
    if not root.is_dir():
        raise ModelInstallError(
            f"no installed models in {str(root)!r}, so there is nothing to roll "
            "back to",
            root,
        )
    with _exclusive_lock(root):
        pointer = read_pointer(data_dir)
        if pointer.active is None and pointer.previous is None:
            raise ModelInstallError(
                "nothing to roll back to: the built-in default model is active and "
                "no installed model was active before it",
                root / POINTER_NAME,
            )
        if pointer.previous is not None:
            _check_file(load_installed(data_dir, pointer.previous))
        switched = ActivePointer(pointer.previous, pointer.active, _now())
        write_pointer(data_dir, switched)
        return switched


def _check_file(installed: InstalledModel) -> None:
    from appliance.model_files import sha256_file

    actual = sha256_file(installed.model_path)
    if actual != installed.manifest.sha256:
        raise ModelChecksumError(
            f"installed model {installed.name!r}: {str(installed.model_path)!r} has "
            f"sha256 {actual}, its manifest says {installed.manifest.sha256}; "
            "install its bundle again",
            installed.model_path,
            installed.manifest.sha256,
            actual,
        )


# Housekeeping -------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(root: Path) -> Iterator[None]:
    path = root / LOCK_NAME
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ModelInstallError(
                f"another model install or rollback is running (pid {holder}, lock "
                f"{str(path)!r}); wait for it to finish",
                path,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def _remove_work_directories(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith((STAGING_PREFIX, CANARY_PREFIX)) and path.is_dir():
            logger.info("removing %s, left by an interrupted install", path)
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".active-") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def _prune(data_dir: Path, pointer: ActivePointer) -> None:
    keep = {pointer.active, pointer.previous}
    root = models_root(data_dir)
    for path in root.iterdir():
        if (
            path.is_dir()
            and _INSTALLED_PATTERN.fullmatch(path.name)
            and path.name not in keep
        ):
            logger.info(
                "removing installed model %s: neither active nor previous", path
            )
            shutil.rmtree(path, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
