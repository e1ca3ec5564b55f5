"""Signed model bundles: signing, verification, install, canary, switch and rollback.

Most tests pack a small fake GGUF file and pass a canary runner of their own
(the ``CanaryRunner`` interface), so they need no model. Crash tests run the
install in a child process that ``FIELD_RELAY_CRASH_AT`` ends at each step.
Tests marked ``model`` run the canary through llama.cpp with the real
default model.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ModelChecksumError, ModelNotFoundError
from appliance.model_bundles import (
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    SIGNATURE_MEMBER,
    BundleFormatError,
    BundleSignatureError,
    UntrustedKeyError,
    verify_bundle,
)
from appliance.model_canary import (
    CanaryFailedError,
    CanaryReport,
    CanarySet,
    CanarySetError,
    parse_canary_set,
    run_canary,
    score_canary,
)
from appliance.model_install import (
    POINTER_NAME,
    ActivePointer,
    ModelInstallError,
    install_bundle,
    models_root,
    read_pointer,
    rollback,
)
from appliance.model_keys import KeyFileError, generate_key_pair, load_trusted_keys
from appliance.model_signing import SignRequest, sign_bundle
from appliance.models import DEFAULT_MODEL, ModelSelection, load_manifest, select_model
from tests.conftest import APPLIANCE

FAULT_CODE = 86


# Helpers -------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    """A trusted signer (public key in data/trusted-keys) and an untrusted one."""
    data_dir = tmp_path / "data"
    trusted_dir = data_dir / "trusted-keys"
    trusted_dir.mkdir(parents=True)
    vendor_id = generate_key_pair(tmp_path / "vendor.key", trusted_dir / "vendor.pub")
    stranger_id = generate_key_pair(
        tmp_path / "stranger.key", tmp_path / "stranger.pub"
    )
    return {
        "data_dir": data_dir,
        "trusted_dir": trusted_dir,
        "vendor": tmp_path / "vendor.key",
        "vendor_id": vendor_id,
        "stranger": tmp_path / "stranger.key",
        "stranger_id": stranger_id,
        "trusted": load_trusted_keys([trusted_dir]),
    }


def _fake_gguf(path: Path, filler: bytes = b"x") -> Path:
    path.write_bytes(b"GGUF" + filler * 4096)
    return path


def _sign(
    gguf: Path,
    key: Path,
    output: Path,
    *,
    name: str = "tiny",
    canary: dict[str, Any] | None = None,
) -> Path:
    request = SignRequest(
        gguf=gguf, name=name, settings=load_manifest(), version="1", canary=canary
    )
    sign_bundle(request, key, output)
    return output


def _repack(
    bundle: Path,
    output: Path,
    replace: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Copy a bundle tar file with members replaced, dropped or added."""
    with tarfile.open(bundle) as source:
        members = {m.name: source.extractfile(m).read() for m in source.getmembers()}  # type: ignore[union-attr]
    members.update(replace or {})
    members.update(extra or {})
    with tarfile.open(output, "w") as target:
        for name, data in members.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    return output


def _flip_model_byte(bundle: Path) -> None:
    with tarfile.open(bundle) as tar:
        offset = tar.getmember(MODEL_MEMBER).offset_data
    with bundle.open("r+b") as file:
        file.seek(offset + 100)
        byte = file.read(1)
        file.seek(offset + 100)
        file.write(bytes([byte[0] ^ 0xFF]))


def _passing_runner(calls: list[ModelSelection]) -> Any:
    """A canary runner whose model output matches every expected value."""

    def run(
        selection: ModelSelection, canary: CanarySet, work: Path, checks: Path | None
    ) -> CanaryReport:
        calls.append(selection)
        outcomes = [
            (
                "validated",
                1,
                {field: values[0] for field, values in item.expected.items()},
            )
            for item in canary.inputs
        ]
        return score_canary(canary, outcomes)

    return run


def _failing_runner(
    selection: ModelSelection, canary: CanarySet, work: Path, checks: Path | None
) -> CanaryReport:
    return score_canary(canary, [("dead", 3, None) for _ in canary.inputs])


def _installed_dirs(data_dir: Path) -> list[str]:
    root = models_root(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir())


# Signing and verification --------------------------------------------------------


def test_signed_bundle_verifies(tmp_path: Path, keys: dict[str, Any]) -> None:
    gguf = _fake_gguf(tmp_path / "tiny.gguf")
    bundle = _sign(gguf, keys["vendor"], tmp_path / "tiny.bundle")

    verified = verify_bundle(bundle, keys["trusted"])

    assert verified.key.key_id == keys["vendor_id"]
    assert verified.manifest.name == "tiny"
    assert verified.manifest.size_bytes == gguf.stat().st_size
    assert verified.manifest.run["chat_template"] == "chatml"
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert names == [MANIFEST_MEMBER, SIGNATURE_MEMBER, MODEL_MEMBER]


def test_tampered_gguf_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    _flip_model_byte(bundle)

    with pytest.raises(ModelChecksumError) as caught:
        verify_bundle(bundle, keys["trusted"])

    message = str(caught.value)
    assert "model.gguf has sha256" in message
    assert "changed after signing" in message
    assert caught.value.expected != caught.value.actual


def test_tampered_gguf_install_leaves_nothing(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    _flip_model_byte(bundle)
    calls: list[ModelSelection] = []

    with pytest.raises(ModelChecksumError):
        install_bundle(
            bundle,
            keys["data_dir"],
            keys["trusted"],
            canary_runner=_passing_runner(calls),
        )

    assert calls == []
    assert _installed_dirs(keys["data_dir"]) == []
    assert read_pointer(keys["data_dir"]) == ActivePointer(None, None)


def test_truncated_gguf_rejected_by_size(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    with tarfile.open(bundle) as tar:
        model = tar.extractfile(MODEL_MEMBER).read()  # type: ignore[union-attr]
    cut = _repack(bundle, tmp_path / "cut", replace={MODEL_MEMBER: model[:-10]})

    with pytest.raises(ModelChecksumError) as caught:
        verify_bundle(cut, keys["trusted"])

    assert "bytes but the signed manifest says" in str(caught.value)


def test_tampered_manifest_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    with tarfile.open(bundle) as tar:
        manifest = json.loads(tar.extractfile(MANIFEST_MEMBER).read())  # type: ignore[union-attr]
    manifest["run"]["n_threads"] = 4
    changed = _repack(
        bundle,
        tmp_path / "changed",
        replace={MANIFEST_MEMBER: json.dumps(manifest).encode()},
    )

    with pytest.raises(BundleSignatureError) as caught:
        verify_bundle(changed, keys["trusted"])

    assert not isinstance(caught.value, UntrustedKeyError)
    assert "does not match manifest.json" in str(caught.value)
    assert "do not install it" in str(caught.value)


def test_unknown_key_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["stranger"], tmp_path / "b")

    with pytest.raises(UntrustedKeyError) as caught:
        verify_bundle(bundle, keys["trusted"])

    assert caught.value.key_id == keys["stranger_id"]
    assert f"signed by key {keys['stranger_id']}" in str(caught.value)
    assert "not trusted" in str(caught.value)
    assert keys["vendor_id"] in str(caught.value)


def test_forged_key_id_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["stranger"], tmp_path / "b")
    with tarfile.open(bundle) as tar:
        signature = json.loads(tar.extractfile(SIGNATURE_MEMBER).read())  # type: ignore[union-attr]
    signature["key_id"] = keys["vendor_id"]
    forged = _repack(
        bundle,
        tmp_path / "forged",
        replace={SIGNATURE_MEMBER: json.dumps(signature).encode()},
    )

    with pytest.raises(BundleSignatureError) as caught:
        verify_bundle(forged, keys["trusted"])

    assert not isinstance(caught.value, UntrustedKeyError)
    assert "does not match" in str(caught.value)


def test_missing_signature_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    unsigned = _repack(bundle, tmp_path / "unsigned", drop=(SIGNATURE_MEMBER,))

    with pytest.raises(BundleSignatureError) as caught:
        verify_bundle(unsigned, keys["trusted"])

    assert "is not signed" in str(caught.value)


def test_malformed_signature_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    broken = _repack(bundle, tmp_path / "broken", replace={SIGNATURE_MEMBER: b"{"})

    with pytest.raises(BundleSignatureError) as caught:
        verify_bundle(broken, keys["trusted"])

    assert "manifest.sig is not UTF-8 JSON" in str(caught.value)


def test_unexpected_member_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    padded = _repack(bundle, tmp_path / "padded", extra={"../evil.sh": b"#!/bin/sh"})

    with pytest.raises(BundleFormatError) as caught:
        verify_bundle(padded, keys["trusted"])

    assert "unexpected member '../evil.sh'" in str(caught.value)


def test_directory_bundle_verifies(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(bundle) as tar:
        tar.extractall(unpacked, filter="data")

    assert verify_bundle(unpacked, keys["trusted"]).manifest.name == "tiny"


def test_no_trusted_keys_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    bundle = _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")

    with pytest.raises(KeyFileError) as caught:
        verify_bundle(bundle, load_trusted_keys([tmp_path / "no-such-dir"]))

    assert "no trusted public keys" in str(caught.value)


def test_group_writable_key_dir_rejected(keys: dict[str, Any]) -> None:
    os.chmod(keys["trusted_dir"], 0o775)

    with pytest.raises(KeyFileError) as caught:
        load_trusted_keys([keys["trusted_dir"]])

    assert "chmod go-w" in str(caught.value)


def test_readable_private_key_rejected(tmp_path: Path, keys: dict[str, Any]) -> None:
    os.chmod(keys["vendor"], 0o644)

    with pytest.raises(KeyFileError) as caught:
        _sign(_fake_gguf(tmp_path / "tiny.gguf"), keys["vendor"], tmp_path / "b")

    assert "chmod 600" in str(caught.value)


def test_sign_rejects_non_gguf(tmp_path: Path, keys: dict[str, Any]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")

    with pytest.raises(BundleFormatError) as caught:
        _sign(text, keys["vendor"], tmp_path / "b")

    assert "is not a GGUF file" in str(caught.value)


def test_sign_rejects_invalid_canary(tmp_path: Path, keys: dict[str, Any]) -> None:
    with pytest.raises(BundleFormatError) as caught:
        _sign(
            _fake_gguf(tmp_path / "tiny.gguf"),
            keys["vendor"],
            tmp_path / "b",
            canary={"min_accuracy": 2},
        )

    assert "canary" in str(caught.value)
    assert not (tmp_path / "b").exists()


def test_keygen_keeps_existing_files(tmp_path: Path, keys: dict[str, Any]) -> None:
    before = keys["vendor"].read_bytes()

    with pytest.raises(KeyFileError):
        generate_key_pair(keys["vendor"], tmp_path / "new.pub")

    assert keys["vendor"].read_bytes() == before
    assert oct(keys["vendor"].stat().st_mode & 0o777) == "0o600"


# Canary sets and scores ------------------------------------------------------------


def test_default_canary_set_parses() -> None:
    canary = parse_canary_set(None)

    assert 3 <= len(canary.inputs) <= 5
    assert canary.min_valid_rate == 1.0
    assert canary.min_accuracy == 0.9


def test_canary_set_without_inputs_uses_default_inputs() -> None:
    canary = parse_canary_set({"min_accuracy": 0.5})

    assert canary.inputs == parse_canary_set(None).inputs
    assert canary.min_accuracy == 0.5
    assert canary.min_valid_rate == 1.0


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"inputs": []}, "non-empty list"),
        ({"inputs": [{"raw": "x", "expected": {"mood": "ok"}}]}, "mood"),
        (
            {"inputs": [{"raw": "x", "expected": {"action_required": "yes"}}]},
            "must be a bool",
        ),
        ({"min_valid_rate": 1.5}, "between 0 and 1"),
        ({"threshold": 1}, "unknown keys"),
    ],
)
def test_invalid_canary_set_rejected(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CanarySetError) as caught:
        parse_canary_set(data)

    assert fragment in str(caught.value)


def test_canary_floor_only_raises_thresholds() -> None:
    canary = parse_canary_set({"min_valid_rate": 0.5, "min_accuracy": 0.8})

    raised = canary.with_floor(0.75, 0.5)

    assert raised.min_valid_rate == 0.75
    assert raised.min_accuracy == 0.8


def test_canary_score_counts_dead_as_missed() -> None:
    canary = parse_canary_set(
        {
            "min_valid_rate": 0.5,
            "min_accuracy": 0.5,
            "inputs": [
                {"raw": "a", "expected": {"severity": ["error", "critical"]}},
                {
                    "raw": "b",
                    "expected": {"component": "KERNEL", "action_required": True},
                },
            ],
        }
    )

    report = score_canary(
        canary, [("validated", 1, {"severity": "Critical"}), ("dead", 3, None)]
    )

    assert report.valid == 1
    assert report.matched == 1
    assert report.checks == 3
    assert report.passed is False
    assert report.results[1]["mismatches"][0]["actual"] is None


def test_canary_score_bool_does_not_match_string() -> None:
    canary = parse_canary_set(
        {"inputs": [{"raw": "a", "expected": {"action_required": True}}]}
    )

    report = score_canary(canary, [("validated", 1, {"action_required": "True"})])

    assert report.matched == 0


# Install, switch and rollback ------------------------------------------------------


def test_install_switches_and_rollback_returns(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    data_dir = keys["data_dir"]
    first = _sign(_fake_gguf(tmp_path / "a.gguf", b"a"), keys["vendor"], tmp_path / "a")
    second = _sign(
        _fake_gguf(tmp_path / "b.gguf", b"b"), keys["vendor"], tmp_path / "b"
    )
    calls: list[ModelSelection] = []
    runner = _passing_runner(calls)

    installed_a = install_bundle(first, data_dir, keys["trusted"], canary_runner=runner)
    installed_b = install_bundle(
        second, data_dir, keys["trusted"], canary_runner=runner
    )
    name_a = installed_a.installed.name
    name_b = installed_b.installed.name

    assert [selection.path for selection in calls] == [
        installed_a.installed.model_path,
        installed_b.installed.model_path,
    ]
    assert read_pointer(data_dir).active == name_b
    assert read_pointer(data_dir).previous == name_a
    selected = select_model(None, data_dir=data_dir)
    assert selected.path == installed_b.installed.model_path
    assert selected.sha256 == installed_b.verified.manifest.sha256
    assert selected.chat_template == "chatml"

    assert rollback(data_dir).active == name_a
    assert (
        select_model(None, data_dir=data_dir).path == installed_a.installed.model_path
    )
    assert rollback(data_dir) == ActivePointer(
        name_b, name_a, read_pointer(data_dir).switched_at
    )


def test_install_keeps_only_active_and_previous(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    data_dir = keys["data_dir"]
    runner = _passing_runner([])
    names = []
    for filler in (b"a", b"b", b"c"):
        gguf = _fake_gguf(tmp_path / f"{filler.decode()}.gguf", filler)
        bundle = _sign(gguf, keys["vendor"], tmp_path / f"{filler.decode()}.bundle")
        result = install_bundle(bundle, data_dir, keys["trusted"], canary_runner=runner)
        names.append(result.installed.name)

    assert _installed_dirs(data_dir) == sorted(names[1:])


def test_rollback_to_builtin_and_back(tmp_path: Path, keys: dict[str, Any]) -> None:
    data_dir = keys["data_dir"]
    bundle = _sign(_fake_gguf(tmp_path / "a.gguf"), keys["vendor"], tmp_path / "a")
    name = install_bundle(
        bundle, data_dir, keys["trusted"], canary_runner=_passing_runner([])
    ).installed.name

    assert rollback(data_dir).active is None
    assert select_model(None, data_dir=data_dir).manifest.name == DEFAULT_MODEL
    assert rollback(data_dir).active == name


def test_rollback_without_previous_rejected(keys: dict[str, Any]) -> None:
    models_root(keys["data_dir"]).mkdir(parents=True)

    with pytest.raises(ModelInstallError) as caught:
        rollback(keys["data_dir"])

    assert "nothing to roll back to" in str(caught.value)


def test_rollback_rejects_damaged_previous(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    data_dir = keys["data_dir"]
    runner = _passing_runner([])
    first = _sign(_fake_gguf(tmp_path / "a.gguf", b"a"), keys["vendor"], tmp_path / "a")
    second = _sign(
        _fake_gguf(tmp_path / "b.gguf", b"b"), keys["vendor"], tmp_path / "b"
    )
    old = install_bundle(first, data_dir, keys["trusted"], canary_runner=runner)
    install_bundle(second, data_dir, keys["trusted"], canary_runner=runner)
    pointer = read_pointer(data_dir)
    with old.installed.model_path.open("r+b") as file:
        file.write(b"GGUF-changed")

    with pytest.raises(ModelChecksumError):
        rollback(data_dir)

    assert read_pointer(data_dir) == pointer


def test_canary_failure_rejects_model(tmp_path: Path, keys: dict[str, Any]) -> None:
    data_dir = keys["data_dir"]
    good = _sign(_fake_gguf(tmp_path / "a.gguf", b"a"), keys["vendor"], tmp_path / "a")
    bad = _sign(_fake_gguf(tmp_path / "b.gguf", b"b"), keys["vendor"], tmp_path / "b")
    active_name = install_bundle(
        good, data_dir, keys["trusted"], canary_runner=_passing_runner([])
    ).installed.name
    pointer = read_pointer(data_dir)

    with pytest.raises(CanaryFailedError) as caught:
        install_bundle(bad, data_dir, keys["trusted"], canary_runner=_failing_runner)

    assert "failed its canary and was not activated" in str(caught.value)
    assert f"the active model is still {active_name}" in str(caught.value)
    assert caught.value.report.valid == 0
    assert read_pointer(data_dir) == pointer
    assert _installed_dirs(data_dir) == [active_name]


def test_operator_threshold_rejects_model(tmp_path: Path, keys: dict[str, Any]) -> None:
    canary = {
        "min_accuracy": 0.5,
        "inputs": [
            {"raw": "a", "expected": {"severity": "info"}},
            {"raw": "b", "expected": {"severity": "error"}},
        ],
    }
    bundle = _sign(
        _fake_gguf(tmp_path / "a.gguf"), keys["vendor"], tmp_path / "a", canary=canary
    )

    def half_right(
        selection: ModelSelection, canary: CanarySet, work: Path, checks: Path | None
    ) -> CanaryReport:
        fields = {"severity": "info"}
        return score_canary(
            canary, [("validated", 1, fields), ("validated", 1, fields)]
        )

    with pytest.raises(CanaryFailedError) as caught:
        install_bundle(
            bundle,
            keys["data_dir"],
            keys["trusted"],
            min_accuracy=0.9,
            canary_runner=half_right,
        )

    assert caught.value.report.min_accuracy == 0.9
    assert caught.value.report.accuracy == 0.5


def test_reinstall_of_active_bundle_changes_nothing(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    data_dir = keys["data_dir"]
    bundle = _sign(_fake_gguf(tmp_path / "a.gguf"), keys["vendor"], tmp_path / "a")
    calls: list[ModelSelection] = []
    install_bundle(
        bundle, data_dir, keys["trusted"], canary_runner=_passing_runner(calls)
    )
    pointer = read_pointer(data_dir)

    again = install_bundle(
        bundle, data_dir, keys["trusted"], canary_runner=_passing_runner(calls)
    )

    assert again.already_active
    assert len(calls) == 1
    assert read_pointer(data_dir) == pointer


def test_invalid_pointer_names_fix(keys: dict[str, Any]) -> None:
    root = models_root(keys["data_dir"])
    root.mkdir(parents=True)
    (root / POINTER_NAME).write_text("{not json")

    with pytest.raises(ModelInstallError) as caught:
        select_model(None, data_dir=keys["data_dir"])

    assert "delete it to use the built-in default model" in str(caught.value)


def test_missing_active_file_names_fix(tmp_path: Path, keys: dict[str, Any]) -> None:
    data_dir = keys["data_dir"]
    bundle = _sign(_fake_gguf(tmp_path / "a.gguf"), keys["vendor"], tmp_path / "a")
    result = install_bundle(
        bundle, data_dir, keys["trusted"], canary_runner=_passing_runner([])
    )
    result.installed.model_path.unlink()

    with pytest.raises(ModelNotFoundError) as caught:
        select_model(None, data_dir=data_dir)

    assert "appliance models rollback" in str(caught.value)


# Crashes between steps ----------------------------------------------------------------

_CHILD_INSTALL = """
import sys
from pathlib import Path
from appliance.model_keys import load_trusted_keys
from appliance.model_canary import score_canary
from appliance.model_install import install_bundle

def passing(selection, canary, work, checks):
    return score_canary(canary, [
        ("validated", 1, {field: values[0] for field, values in item.expected.items()})
        for item in canary.inputs
    ])

bundle, data_dir, trusted = map(Path, sys.argv[1:4])
install_bundle(bundle, data_dir, load_trusted_keys([trusted]), canary_runner=passing)
"""


@pytest.mark.parametrize(
    "point",
    [
        "model_install.staged",
        "model_install.placed",
        "model_install.canary_passed",
        "model_install.pointer_staged",
    ],
)
def test_crash_during_install_keeps_old_model(
    tmp_path: Path, keys: dict[str, Any], point: str
) -> None:
    data_dir = keys["data_dir"]
    old = _sign(_fake_gguf(tmp_path / "a.gguf", b"a"), keys["vendor"], tmp_path / "a")
    new = _sign(_fake_gguf(tmp_path / "b.gguf", b"b"), keys["vendor"], tmp_path / "b")
    old_name = install_bundle(
        old, data_dir, keys["trusted"], canary_runner=_passing_runner([])
    ).installed.name
    pointer = read_pointer(data_dir)

    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD_INSTALL,
            str(new),
            str(data_dir),
            str(keys["trusted_dir"]),
        ],
        env={**os.environ, "FIELD_RELAY_CRASH_AT": f"{point}:1"},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert child.returncode == FAULT_CODE, child.stderr
    assert read_pointer(data_dir) == pointer
    assert select_model(None, data_dir=data_dir).path.parent.name == old_name

    result = install_bundle(
        new, data_dir, keys["trusted"], canary_runner=_passing_runner([])
    )

    assert read_pointer(data_dir).active == result.installed.name
    assert read_pointer(data_dir).previous == old_name
    leftovers = [
        p.name for p in models_root(data_dir).iterdir() if p.name.startswith(".")
    ]
    assert leftovers == []


# Command line -----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APPLIANCE, *args], capture_output=True, text=True, timeout=300
    )


def test_cli_rejects_tampered_and_unknown(tmp_path: Path, keys: dict[str, Any]) -> None:
    gguf = _fake_gguf(tmp_path / "tiny.gguf")
    tampered = _sign(gguf, keys["vendor"], tmp_path / "tampered.bundle")
    _flip_model_byte(tampered)
    signed = _cli(
        "models",
        "sign",
        str(gguf),
        "--key",
        str(keys["stranger"]),
        "--output",
        str(tmp_path / "stranger.bundle"),
    )
    assert signed.returncode == 0, signed.stderr

    cases = {
        "tampered.bundle": "the file was changed after signing",
        "stranger.bundle": f"signed by key {keys['stranger_id']}, which is not trusted",
    }
    for name, fragment in cases.items():
        result = _cli(
            "models",
            "install",
            str(tmp_path / name),
            "--data-dir",
            str(keys["data_dir"]),
        )
        assert result.returncode == 1, name
        assert result.stderr.startswith("error: "), name
        assert fragment in result.stderr, name
    assert _installed_dirs(keys["data_dir"]) == []


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bundle of the real default model with a one-line canary set."""
    root = tmp_path_factory.mktemp("real")
    trusted = root / "trusted"
    trusted.mkdir()
    generate_key_pair(root / "vendor.key", trusted / "vendor.pub")
    gguf = select_model(DEFAULT_MODEL).path
    line = parse_canary_set(None).inputs[1]
    passing = {
        "inputs": [{"raw": line.raw, "expected": {"severity": ["error", "critical"]}}]
    }
    failing = {"inputs": [{"raw": line.raw, "expected": {"severity": "debug"}}]}
    return {
        "trusted": trusted,
        "passing": _sign(
            gguf, root / "vendor.key", root / "pass.bundle", name="smol", canary=passing
        ),
        "failing": _sign(
            gguf,
            root / "vendor.key",
            root / "fail.bundle",
            name="smol-bad",
            canary=failing,
        ),
    }


@pytest.mark.model
def test_cli_install_real_model(tmp_path: Path, real_bundle: dict[str, Any]) -> None:
    data_dir = tmp_path / "data"
    trusted = str(real_bundle["trusted"])

    installed = _cli(
        "models",
        "install",
        str(real_bundle["passing"]),
        "--data-dir",
        str(data_dir),
        "--trusted-keys",
        trusted,
    )
    rejected = _cli(
        "models",
        "install",
        str(real_bundle["failing"]),
        "--data-dir",
        str(data_dir),
        "--trusted-keys",
        trusted,
    )
    active = _cli("models", "active", "--data-dir", str(data_dir), "--json")

    assert installed.returncode == 0, installed.stderr
    assert "canary: valid 1/1" in installed.stdout
    assert rejected.returncode == 1
    assert "failed its canary and was not activated" in rejected.stderr
    assert "severity expected ['debug']" in rejected.stderr
    listing = json.loads(active.stdout)
    assert listing["active"].startswith("smol-")
    assert [row["name"] for row in listing["installed"]] == [listing["active"]]
    assert (
        select_model(None, data_dir=data_dir).path.name == f"{listing['active']}.gguf"
    )


@pytest.mark.model
def test_default_canary_passes_default_model(tmp_path: Path) -> None:
    """The golden lines of models/canary/default.json suit the default model."""
    report = run_canary(select_model(DEFAULT_MODEL), parse_canary_set(None), tmp_path)

    assert report.valid == report.inputs, report.results
    assert report.passed, report.results
