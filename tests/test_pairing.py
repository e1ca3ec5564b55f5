"""Tests for the pairing store, key exports and the pairing commands."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from firmware_bridge.errors import PairingError
from firmware_bridge.pairing import (
    FORMAT_VERSION,
    DeviceKey,
    PairingStore,
    load_export,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store(tmp_path: Path) -> PairingStore:
    return PairingStore(tmp_path / "devices")


def test_pair_key_file_mode_0600(store: PairingStore):
    key = store.pair("pump-1")

    assert mode_of(store.key_path(key.device_id)) == 0o600


def test_pair_directory_mode_0700(store: PairingStore):
    store.pair("pump-1")

    assert mode_of(store.directory) == 0o700


def test_pair_modes_ignore_permissive_umask(store: PairingStore):
    previous = os.umask(0)
    try:
        key = store.pair("pump-1")
    finally:
        os.umask(previous)

    assert mode_of(store.directory) == 0o700
    assert mode_of(store.key_path(key.device_id)) == 0o600


def test_pair_draws_id_and_key_sizes(store: PairingStore):
    key = store.pair("pump-1")

    assert len(key.device_id) == 8
    assert len(key.psk) == 32


def test_pair_writes_hex_json(store: PairingStore):
    key = store.pair("pump-1")

    document = json.loads(store.key_path(key.device_id).read_text())

    assert document["format_version"] == FORMAT_VERSION
    assert document["device_id"] == key.device_id.hex()
    assert document["key"] == key.psk.hex()
    assert document["name"] == "pump-1"


def test_pair_leaves_no_temporary_files(store: PairingStore):
    first = store.pair("pump-1")
    second = store.pair("pump-2")

    names = sorted(path.name for path in store.directory.iterdir())

    expected = sorted(
        [".lock", f"{first.device_id.hex()}.json", f"{second.device_id.hex()}.json"]
    )
    assert names == expected


def test_pair_taken_name_rejected(store: PairingStore):
    store.pair("pump-1")

    with pytest.raises(PairingError) as raised:
        store.pair("pump-1")

    assert "'pump-1'" in str(raised.value)
    assert "--replace" in str(raised.value)


def test_pair_replace_issues_new_key(store: PairingStore):
    old = store.pair("pump-1")

    new = store.pair("pump-1", replace=True)

    assert new.device_id != old.device_id
    assert new.psk != old.psk
    assert store.lookup(old.device_id) is None
    assert store.lookup(new.device_id) == new.psk
    assert [key.name for key in store.list()] == ["pump-1"]


@pytest.mark.parametrize(
    "name",
    ["", " pump", "pump ", "pump\n1", "x" * 65, "0123456789abcdef"],
)
def test_pair_invalid_name_rejected(store: PairingStore, name: str):
    with pytest.raises(PairingError) as raised:
        store.pair(name)

    assert repr(name) in str(raised.value)


def test_pair_concurrent_same_name_one_wins(tmp_path: Path):
    errors: list[PairingError] = []
    keys: list[DeviceKey] = []

    def pair() -> None:
        # Separate stores, as separate `appliance pair` processes would have.
        try:
            keys.append(PairingStore(tmp_path / "devices").pair("pump-1"))
        except PairingError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pair) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(keys) == 1
    assert len(errors) == 3


def test_lookup_returns_psk(store: PairingStore):
    key = store.pair("pump-1")

    assert store.lookup(key.device_id) == key.psk


def test_lookup_unknown_device_none(store: PairingStore):
    store.pair("pump-1")

    assert store.lookup(bytes(8)) is None


def test_lookup_without_directory_none(store: PairingStore):
    assert store.lookup(bytes(8)) is None


def test_lookup_sees_changes_by_other_store(tmp_path: Path):
    appliance_store = PairingStore(tmp_path / "devices")
    cli_store = PairingStore(tmp_path / "devices")
    key = cli_store.pair("pump-1")
    assert appliance_store.lookup(key.device_id) == key.psk

    cli_store.forget("pump-1")

    assert appliance_store.lookup(key.device_id) is None


def test_lookup_sees_chmod_after_caching(store: PairingStore):
    key = store.pair("pump-1")
    assert store.lookup(key.device_id) == key.psk
    path = store.key_path(key.device_id)

    path.chmod(0o644)

    with pytest.raises(PairingError) as raised:
        store.lookup(key.device_id)
    assert str(path) in str(raised.value)


def test_world_readable_key_rejected(store: PairingStore):
    key = store.pair("pump-1")
    path = store.key_path(key.device_id)
    path.chmod(0o644)

    with pytest.raises(PairingError) as raised:
        store.list()

    assert str(path) in str(raised.value)
    assert f"chmod 600 {path}" in str(raised.value)


def test_group_readable_key_rejected(store: PairingStore):
    key = store.pair("pump-1")
    path = store.key_path(key.device_id)
    path.chmod(0o640)

    with pytest.raises(PairingError) as raised:
        store.lookup(key.device_id)

    assert "0640" in str(raised.value)


def test_open_directory_rejected(store: PairingStore):
    store.pair("pump-1")
    store.directory.chmod(0o755)

    with pytest.raises(PairingError) as raised:
        store.list()

    assert f"chmod 700 {store.directory}" in str(raised.value)


def test_key_file_with_other_id_rejected(store: PairingStore):
    key = store.pair("pump-1")
    moved = store.directory / "00000000000000ff.json"
    store.key_path(key.device_id).rename(moved)

    with pytest.raises(PairingError) as raised:
        store.lookup(bytes.fromhex("00000000000000ff"))

    assert str(moved) in str(raised.value)
    assert f"{key.device_id.hex()}.json" in str(raised.value)


def test_list_oldest_first(store: PairingStore):
    paired_at = {"a": "2024-05-02T00:00:00+00:00", "b": "2024-05-03T00:00:00+00:00"}
    paired_at["c"] = "2024-05-01T00:00:00+00:00"
    for name, created_at in paired_at.items():
        path = store.key_path(store.pair(name).device_id)
        document = json.loads(path.read_text())
        document["created_at"] = created_at
        path.write_text(json.dumps(document))

    names = [key.name for key in store.list()]

    assert names == ["c", "a", "b"]


def test_list_empty_store(store: PairingStore):
    assert store.list() == []


def test_forget_by_name(store: PairingStore):
    key = store.pair("pump-1")

    removed = store.forget("pump-1")

    assert removed.device_id == key.device_id
    assert not store.key_path(key.device_id).exists()


def test_forget_by_hex_id(store: PairingStore):
    key = store.pair("pump-1")

    store.forget(key.device_id.hex())

    assert store.list() == []


def test_forget_by_bytes_id(store: PairingStore):
    key = store.pair("pump-1")

    store.forget(key.device_id)

    assert store.lookup(key.device_id) is None


def test_forget_unknown_device_named(store: PairingStore):
    store.pair("pump-1")

    with pytest.raises(PairingError) as raised:
        store.forget("pump-9")

    assert "'pump-9'" in str(raised.value)


def test_export_round_trip(store: PairingStore, tmp_path: Path):
    key = store.pair("pump-1")
    target = tmp_path / "pump-1.json"

    store.export("pump-1", target)
    loaded = load_export(target)

    assert loaded == key
    assert mode_of(target) == 0o600


def test_export_failure_keeps_target(store: PairingStore, tmp_path: Path):
    store.pair("pump-1")
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "file").write_text("kept")

    with pytest.raises(PairingError) as raised:
        store.export("pump-1", target)

    assert str(target) in str(raised.value)
    assert (target / "file").read_text() == "kept"
    assert [path.name for path in tmp_path.iterdir() if ".tmp" in path.name] == []


def test_key_repr_hides_psk(store: PairingStore):
    key = store.pair("pump-1")

    assert key.psk.hex() not in repr(key)
    assert repr(key.psk) not in repr(key)


def write_export(path: Path, document: object, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(document))
    path.chmod(mode)
    return path


def valid_document() -> dict[str, object]:
    return {
        "format_version": FORMAT_VERSION,
        "device_id": "00" * 8,
        "key": "11" * 32,
        "name": "pump-1",
    }


def test_load_export_without_created_at(tmp_path: Path):
    path = write_export(tmp_path / "key.json", valid_document())

    key = load_export(path)

    assert key.device_id == bytes(8)
    assert key.psk == bytes([0x11]) * 32


def test_load_export_missing_file(tmp_path: Path):
    path = tmp_path / "missing.json"

    with pytest.raises(PairingError) as raised:
        load_export(path)

    assert str(path) in str(raised.value)
    assert "not found" in str(raised.value)


def test_load_export_bad_json(tmp_path: Path):
    path = tmp_path / "key.json"
    path.write_text("{not json")
    path.chmod(0o600)

    with pytest.raises(PairingError) as raised:
        load_export(path)

    assert str(path) in str(raised.value)
    assert "not valid JSON" in str(raised.value)


def test_load_export_world_readable(tmp_path: Path):
    path = write_export(tmp_path / "key.json", valid_document(), mode=0o644)

    with pytest.raises(PairingError) as raised:
        load_export(path)

    assert f"chmod 600 {path}" in str(raised.value)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("device_id", "00" * 7, "'device_id' must be 8 bytes"),
        ("device_id", "zz" * 8, "'device_id' must be 8 bytes"),
        ("key", "11" * 16, "'key' must be 32 bytes"),
        ("key", None, "'key' must be 32 bytes"),
        ("format_version", 2, "format_version 2"),
        ("name", 5, "'name'"),
        ("created_at", "yesterday", "'created_at'"),
    ],
)
def test_load_export_bad_field(
    tmp_path: Path, field: str, value: object, expected: str
):
    document = valid_document()
    document[field] = value
    path = write_export(tmp_path / "key.json", document)

    with pytest.raises(PairingError) as raised:
        load_export(path)

    assert str(path) in str(raised.value)
    assert expected in str(raised.value)


def test_load_export_not_object(tmp_path: Path):
    path = write_export(tmp_path / "key.json", ["00" * 8])

    with pytest.raises(PairingError) as raised:
        load_export(path)

    assert "JSON object" in str(raised.value)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_pair_prints_device_id(tmp_path: Path):
    result = invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    key = PairingStore(tmp_path / "devices").list()[0]
    assert result.exit_code == 0
    assert key.device_id.hex() in result.stdout


def test_cli_pair_exports_key(tmp_path: Path):
    export = tmp_path / "pump-1.json"

    result = invoke(
        "pair", "pump-1", "--data-dir", str(tmp_path), "--export", str(export)
    )

    assert result.exit_code == 0
    assert load_export(export).name == "pump-1"
    assert mode_of(export) == 0o600


def test_cli_pair_taken_name_one_error_line(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    result = invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    assert result.exit_code == 1
    assert result.stderr.startswith("error: device name 'pump-1'")
    assert len(result.stderr.splitlines()) == 1


def test_cli_devices_json(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    invoke("pair", "pump-2", "--data-dir", str(tmp_path))

    result = invoke("devices", "--json", "--data-dir", str(tmp_path))

    rows = json.loads(result.stdout)
    assert sorted(row["name"] for row in rows) == ["pump-1", "pump-2"]
    assert all("key" not in row for row in rows)


def test_cli_devices_table_hides_keys(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    key = PairingStore(tmp_path / "devices").list()[0]

    result = invoke("devices", "--data-dir", str(tmp_path))

    assert key.device_id.hex() in result.stdout
    assert key.psk.hex() not in result.stdout


def test_cli_devices_empty(tmp_path: Path):
    result = invoke("devices", "--data-dir", str(tmp_path))

    assert result.exit_code == 0
    assert "no paired devices" in result.stdout


def test_cli_devices_world_readable_key(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    key = PairingStore(tmp_path / "devices").list()[0]
    path = tmp_path / "devices" / f"{key.device_id.hex()}.json"
    path.chmod(0o644)

    result = invoke("devices", "--data-dir", str(tmp_path))

    assert result.exit_code == 0
    assert f"chmod 600 {path}" in result.stderr
    assert "no usable paired devices" in result.stdout


def test_cli_devices_strict_world_readable_key(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    key = PairingStore(tmp_path / "devices").list()[0]
    path = tmp_path / "devices" / f"{key.device_id.hex()}.json"
    path.chmod(0o644)

    result = invoke("devices", "--strict", "--data-dir", str(tmp_path))

    assert result.exit_code == 1
    assert f"chmod 600 {path}" in result.stderr


def test_cli_unpair_by_name(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    result = invoke("unpair", "pump-1", "--data-dir", str(tmp_path))

    assert result.exit_code == 0
    assert PairingStore(tmp_path / "devices").list() == []


def test_cli_unpair_unknown_device(tmp_path: Path):
    result = invoke("unpair", "pump-9", "--data-dir", str(tmp_path))

    assert result.exit_code == 1
    assert "'pump-9'" in result.stderr


def test_cli_export_key(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    export = tmp_path / "out.json"

    result = invoke("export-key", "pump-1", str(export), "--data-dir", str(tmp_path))

    assert result.exit_code == 0
    assert load_export(export).name == "pump-1"


SECRET_HEX = "5ec7e7" * 10
"""A recognisable wrong-length key: 60 hex digits instead of 64."""


def test_bad_key_field_hides_value(tmp_path: Path):
    document = valid_document()
    document["key"] = SECRET_HEX
    path = write_export(tmp_path / "key.json", document)

    with pytest.raises(PairingError) as raised:
        load_export(path)

    message = str(raised.value)
    assert "5ec7e7" not in message
    assert "'key' must be 32 bytes as 64 hex digits" in message
    assert "it has 60 hex digits" in message


def test_non_hex_key_field_hides_value(tmp_path: Path):
    document = valid_document()
    document["key"] = "zz5ec7" + "11" * 29
    path = write_export(tmp_path / "key.json", document)

    with pytest.raises(PairingError) as raised:
        load_export(path)

    message = str(raised.value)
    assert "5ec7" not in message
    assert "it has 64 characters, not all of them hex digits" in message


def test_lookup_bad_key_hides_value(store: PairingStore):
    key = store.pair("pump-1")
    path = store.key_path(key.device_id)
    document = json.loads(path.read_text())
    document["key"] = key.psk.hex()[:-2]
    path.write_text(json.dumps(document))

    with pytest.raises(PairingError) as raised:
        store.lookup(key.device_id)

    message = str(raised.value)
    assert key.psk.hex()[:8] not in message
    assert "it has 62 hex digits" in message


def test_non_utf8_key_file_hides_byte(tmp_path: Path):
    path = tmp_path / "key.json"
    path.write_bytes(b'{"key": "\xa7')
    path.chmod(0o600)

    with pytest.raises(PairingError) as raised:
        load_export(path)

    message = str(raised.value)
    assert "0xa7" not in message
    assert "offset 9" in message


def damage(store: PairingStore, name: str) -> Path:
    """Pair ``name`` and overwrite its key file with text that is not JSON."""
    path = store.key_path(store.pair(name).device_id)
    path.write_text("{truncated")
    return path


def test_scan_separates_unusable_files(store: PairingStore):
    damaged = damage(store, "broken")
    good = store.pair("pump-1")

    keys, unusable = store.scan()

    assert [key.device_id for key in keys] == [good.device_id]
    assert [problem.path for problem in unusable] == [damaged]
    assert unusable[0].device_id.hex() == damaged.stem
    assert f"appliance unpair {damaged.stem}" in str(unusable[0].error)


def test_list_raises_on_damaged_file(store: PairingStore):
    damaged = damage(store, "broken")

    with pytest.raises(PairingError) as raised:
        store.list()

    assert str(damaged) in str(raised.value)


def test_pair_with_damaged_file_elsewhere(store: PairingStore):
    damage(store, "broken")

    key = store.pair("pump-1")

    assert store.lookup(key.device_id) == key.psk


def test_pair_taken_name_beside_damaged(store: PairingStore):
    damage(store, "broken")
    store.pair("pump-1")

    with pytest.raises(PairingError) as raised:
        store.pair("pump-1")

    assert "already paired" in str(raised.value)


def test_pair_name_of_open_mode_file_rejected(store: PairingStore):
    key = store.pair("pump-1")
    store.key_path(key.device_id).chmod(0o644)

    with pytest.raises(PairingError) as raised:
        store.pair("pump-1")

    assert key.device_id.hex() in str(raised.value)


def test_get_by_name_rejects_open_mode_file(store: PairingStore):
    key = store.pair("pump-1")
    path = store.key_path(key.device_id)
    path.chmod(0o644)

    with pytest.raises(PairingError) as raised:
        store.get("pump-1")

    assert f"chmod 600 {path}" in str(raised.value)


def test_forget_by_name_beside_damaged(store: PairingStore):
    damaged = damage(store, "broken")
    key = store.pair("pump-1")

    store.forget("pump-1")

    assert not store.key_path(key.device_id).exists()
    assert damaged.exists()


def test_forget_open_mode_file_by_name(store: PairingStore):
    key = store.pair("pump-1")
    store.key_path(key.device_id).chmod(0o644)

    store.forget("pump-1")

    assert not store.key_path(key.device_id).exists()


def test_remove_key_file_damaged(store: PairingStore):
    damaged = damage(store, "broken")

    removed = store.remove_key_file(damaged.stem)

    assert removed is None
    assert not damaged.exists()


def test_remove_key_file_readable(store: PairingStore):
    key = store.pair("pump-1")

    removed = store.remove_key_file(key.device_id)

    assert removed == key
    assert store.lookup(key.device_id) is None


def test_remove_key_file_unknown_id(store: PairingStore):
    store.pair("pump-1")

    with pytest.raises(PairingError) as raised:
        store.remove_key_file("00000000000000ff")

    assert "'00000000000000ff'" in str(raised.value)


def test_not_found_counts_unusable_files(store: PairingStore):
    damage(store, "broken")

    with pytest.raises(PairingError) as raised:
        store.get("pump-9")

    assert "1 unusable key file" in str(raised.value)


def test_export_keeps_existing_file(store: PairingStore, tmp_path: Path):
    store.pair("pump-1")
    target = tmp_path / "out.json"
    target.write_text("kept")

    with pytest.raises(PairingError) as raised:
        store.export("pump-1", target, overwrite=False)

    assert str(target) in str(raised.value)
    assert target.read_text() == "kept"
    assert [path.name for path in tmp_path.iterdir() if ".tmp" in path.name] == []


def test_export_keeps_dangling_symlink(store: PairingStore, tmp_path: Path):
    store.pair("pump-1")
    target = tmp_path / "out.json"
    target.symlink_to(tmp_path / "missing.json")

    with pytest.raises(PairingError):
        store.export("pump-1", target, overwrite=False)

    assert not (tmp_path / "missing.json").exists()


def test_export_new_file_without_overwrite(store: PairingStore, tmp_path: Path):
    key = store.pair("pump-1")
    target = tmp_path / "out.json"

    store.export("pump-1", target, overwrite=False)

    assert load_export(target) == key
    assert mode_of(target) == 0o600


def cli_damage(data_dir: Path) -> Path:
    return damage(PairingStore(data_dir / "devices"), "broken")


def test_cli_devices_beside_damaged(tmp_path: Path):
    damaged = cli_damage(tmp_path)
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    result = invoke("devices", "--data-dir", str(tmp_path))

    assert result.exit_code == 0
    assert "pump-1" in result.stdout
    assert "broken" not in result.stdout
    assert result.stderr.startswith("warning: ")
    assert str(damaged) in result.stderr
    assert f"appliance unpair {damaged.stem}" in result.stderr


def test_cli_devices_json_beside_damaged(tmp_path: Path):
    cli_damage(tmp_path)
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    result = invoke("devices", "--json", "--data-dir", str(tmp_path))

    assert [row["name"] for row in json.loads(result.stdout)] == ["pump-1"]
    assert "warning: " in result.stderr


def test_cli_devices_strict_damaged(tmp_path: Path):
    cli_damage(tmp_path)
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    result = invoke("devices", "--strict", "--data-dir", str(tmp_path))

    assert result.exit_code == 1
    assert "pump-1" in result.stdout


def test_cli_unpair_damaged_by_id(tmp_path: Path):
    damaged = cli_damage(tmp_path)

    result = invoke("unpair", damaged.stem, "--data-dir", str(tmp_path))

    assert result.exit_code == 0, result.stderr
    assert str(damaged) in result.stdout
    assert not damaged.exists()


def test_cli_unpair_by_name_beside_damaged(tmp_path: Path):
    cli_damage(tmp_path)
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    result = invoke("unpair", "pump-1", "--data-dir", str(tmp_path))

    assert result.exit_code == 0, result.stderr
    assert "'pump-1'" in result.stdout


def test_cli_pair_beside_damaged(tmp_path: Path):
    cli_damage(tmp_path)

    result = invoke("pair", "pump-1", "--data-dir", str(tmp_path))

    assert result.exit_code == 0, result.stderr
    keys, _ = PairingStore(tmp_path / "devices").scan()
    assert [key.name for key in keys] == ["pump-1"]


def test_cli_export_key_beside_damaged(tmp_path: Path):
    cli_damage(tmp_path)
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    export = tmp_path / "out.json"

    result = invoke("export-key", "pump-1", str(export), "--data-dir", str(tmp_path))

    assert result.exit_code == 0, result.stderr
    assert load_export(export).name == "pump-1"


def test_cli_export_key_existing_file_rejected(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    export = tmp_path / "out.json"
    export.write_text("kept")

    result = invoke("export-key", "pump-1", str(export), "--data-dir", str(tmp_path))

    assert result.exit_code == 1
    assert str(export) in result.stderr
    assert "--force" in result.stderr
    assert export.read_text() == "kept"


def test_cli_export_key_force_overwrites(tmp_path: Path):
    invoke("pair", "pump-1", "--data-dir", str(tmp_path))
    export = tmp_path / "out.json"
    export.write_text("old")

    result = invoke(
        "export-key", "pump-1", str(export), "--force", "--data-dir", str(tmp_path)
    )

    assert result.exit_code == 0, result.stderr
    assert load_export(export).name == "pump-1"


def test_cli_pair_existing_export_rejected(tmp_path: Path):
    export = tmp_path / "out.json"
    export.write_text("kept")

    result = invoke(
        "pair", "pump-1", "--data-dir", str(tmp_path), "--export", str(export)
    )

    assert result.exit_code == 1
    assert str(export) in result.stderr
    assert export.read_text() == "kept"
    assert PairingStore(tmp_path / "devices").list() == []


def test_cli_pair_force_overwrites_export(tmp_path: Path):
    export = tmp_path / "out.json"
    export.write_text("old")

    result = invoke(
        "pair",
        "pump-1",
        "--force",
        "--data-dir",
        str(tmp_path),
        "--export",
        str(export),
    )

    assert result.exit_code == 0, result.stderr
    assert load_export(export).name == "pump-1"
