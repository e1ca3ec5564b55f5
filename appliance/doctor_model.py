"""`appliance doctor` check of the model file, with its hash result cached.

Hashing the default model reads about 100 MB, so the result is kept in the data
directory and reused while the file's size and mtime stay the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from appliance.config import Config
from appliance.doctor_result import CheckResult, Status
from appliance.errors import ModelManifestError, ModelNotFoundError
from appliance.model_files import VerifyResult, VerifyStatus, verify_model
from appliance.models import (
    DEFAULT_MODEL,
    ModelManifest,
    load_manifest,
    model_file_path,
    select_model,
)

logger = logging.getLogger(__name__)

HASH_CACHE_NAME = "doctor-cache.json"
"""File in the data directory that keeps model hash results by file size and mtime."""


def check_model(
    config: Config,
    manifest_dir: Path | None,
    assembled_dir: Path | None,
    cache_path: Path | None,
) -> CheckResult:
    """Check that the configured model file exists and matches its manifest."""
    name = config.model.name
    try:
        selection = select_model(
            name, manifest_dir=manifest_dir, assembled_dir=assembled_dir
        )
    except ModelManifestError as exc:
        fix = "correct the manifest field named above"
        return CheckResult("model", Status.FAIL, str(exc), fix)
    except ModelNotFoundError as exc:
        manifest = _named_manifest(name, manifest_dir)
        if manifest is None:
            fix = (
                "set [model] name to an existing GGUF file or to a model from "
                "`appliance models list`"
            )
            return CheckResult("model", Status.FAIL, str(exc), fix)
        result = verify_model(manifest, required=True, assembled_dir=assembled_dir)
        return _model_result(result)
    if selection.by_path:
        size = selection.path.stat().st_size
        detail = (
            f"{selection.path} ({size} bytes), given by path, so no manifest "
            "SHA-256 applies to it"
        )
        return CheckResult("model", Status.PASS, detail)
    result, cached = _verify_cached(selection.manifest, assembled_dir, cache_path)
    outcome = _model_result(result)
    if cached:
        note = "; cached result, the file's size and mtime are unchanged"
        outcome = dataclasses.replace(outcome, detail=outcome.detail + note)
    return outcome


def _named_manifest(
    name: str | None, manifest_dir: Path | None
) -> ModelManifest | None:
    try:
        return load_manifest(name or DEFAULT_MODEL, manifest_dir)
    except (ModelNotFoundError, ModelManifestError):
        return None


def _model_result(result: VerifyResult) -> CheckResult:
    status = Status.PASS if result.status is VerifyStatus.OK else Status.FAIL
    detail = f"{result.name}: {result.status.value}, {result.detail}"
    return CheckResult("model", status, detail, result.fix)


def hash_cache_path(data_dir: Path) -> Path | None:
    """Return the hash cache file, or None while the data directory does not exist."""
    return data_dir / HASH_CACHE_NAME if data_dir.is_dir() else None


def _verify_cached(
    manifest: ModelManifest, assembled_dir: Path | None, cache_path: Path | None
) -> tuple[VerifyResult, bool]:
    """Verify the model's file, reusing a stored result for an unchanged file.

    The stored result is keyed by the file's size and mtime and by the
    manifest's expected size and SHA-256.
    NOTE: a file rewritten with the same size and an mtime set back is not
    detected; `appliance doctor --rehash` or `appliance models verify` hash it.
    """
    path = model_file_path(manifest, assembled_dir)
    if cache_path is None or path is None or not path.is_file():
        return verify_model(manifest, required=True, assembled_dir=assembled_dir), False
    info = path.stat()
    key = [info.st_size, info.st_mtime_ns, manifest.size_bytes, manifest.sha256]
    entries = _read_cache(cache_path)
    stored = _stored_result(entries.get(str(path)), key, manifest.name, path)
    if stored is not None:
        return stored, True
    result = verify_model(manifest, required=True, assembled_dir=assembled_dir)
    if result.status in (VerifyStatus.OK, VerifyStatus.MISMATCH):
        entries[str(path)] = {
            "key": key,
            "status": result.status.value,
            "detail": result.detail,
            "fix": result.fix,
        }
        _write_cache(cache_path, entries)
    return result, False


def _stored_result(
    entry: Any, key: list[Any], name: str, path: Path
) -> VerifyResult | None:
    """Return the cached result when ``entry`` is well formed and ``key`` matches."""
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    try:
        status = VerifyStatus(entry["status"])
        return VerifyResult(name, status, path, str(entry["detail"]), str(entry["fix"]))
    except (KeyError, ValueError):
        return None


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Replace the cache file atomically; a failure only costs a rehash next time."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(entries, indent=1), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        logger.debug("model hash cache %s not written: %s", path, exc)
        temporary.unlink(missing_ok=True)
