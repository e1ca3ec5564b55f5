"""The TOML configuration: validation messages, environment overrides, docs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.cli_config import DOCS_PATH
from appliance.config import (
    Config,
    Protocol,
    Transport,
    load_config,
    masked,
    reference_markdown,
    to_toml,
)
from appliance.errors import ConfigError
from tests.conftest import APPLIANCE

GOOD = """
data_dir = "/var/lib/field-relay"

[[links]]
name = "pump-a"
port = "/dev/ttyUSB0"
baud = 57600

[[links]]
name = "pump-b"
usb = { vid = 0x0403, pid = 0x6001, serial_number = "A12" }
protocol = "lines"

[[links]]
name = "probe"
transport = "ble"
ble = { name = "FR-Probe" }

[sync]
url = "https://collector.example/ingest"
token_file = "/etc/field-relay/token"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_file_loads_every_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), environ={})
    assert [link.name for link in config.links] == ["pump-a", "pump-b", "probe"]
    assert config.links[1].usb is not None
    assert config.links[1].usb.vid == 0x0403
    assert config.links[1].protocol == Protocol.LINES
    assert config.links[2].transport == Transport.BLE
    assert config.links[0].protocol == Protocol.FRAMED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("batch_sise = 500\n", "batch_sise: unknown key"),
        ("[sync]\nurll = 'x'\n", "sync.urll: unknown key"),
        ("[[links]]\nname = 'a'\nport = 'p'\nbaud = 20\n", "links[0].baud = 20"),
        ("[limits]\nmax_pending = 0\n", "limits.max_pending = 0"),
        ("[[links]]\nname = 'a'\n", "needs exactly one of port and usb"),
        ("[[links]]\nname = 'a b'\nport = 'p'\n", "links[0].name = 'a b'"),
        (
            "[[links]]\nname = 'a'\nport = 'p'\n[[links]]\nname = 'a'\nport = 'q'\n",
            "repeated: ['a']",
        ),
        ("[telemetry]\ncapture = 'all'\n", "telemetry.capture = 'all'"),
    ],
)
def test_invalid_setting_is_named(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert expected in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", environ={})


def test_bad_toml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[sync\n"), environ={})


def test_environment_overrides_single_keys(tmp_path: Path) -> None:
    environ = {
        "FIELD_RELAY__SYNC__URL": "http://127.0.0.1:9/ingest",
        "FIELD_RELAY__LINKS__0__BAUD": "9600",
        "FIELD_RELAY__LIMITS__MAX_PENDING": "25",
        "UNRELATED": "1",
    }
    config = load_config(write(tmp_path, GOOD), environ=environ)
    assert config.sync.url == "http://127.0.0.1:9/ingest"
    assert config.links[0].baud == 9600
    assert config.limits.max_pending == 25


def test_environment_override_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="limits.max_pending = -3"):
        load_config(None, environ={"FIELD_RELAY__LIMITS__MAX_PENDING": "-3"})


def test_environment_index_past_the_list_is_an_error() -> None:
    with pytest.raises(ConfigError, match="FIELD_RELAY__LINKS__4__BAUD"):
        load_config(None, environ={"FIELD_RELAY__LINKS__4__BAUD": "9600"})


def test_show_masks_secrets() -> None:
    config = Config.model_validate(
        {"telemetry": {"headers": {"Authorization": "Bearer s3cret"}}}
    )
    shown = to_toml(masked(config))
    assert "s3cret" not in shown
    assert "Authorization" in shown


def test_toml_output_loads_back(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), environ={})
    again = load_config(write(tmp_path, to_toml(masked(config))), environ={})
    assert again == config


def test_configuration_docs_match_the_models() -> None:
    assert DOCS_PATH.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is stale: run `appliance config docs --write`"
    )


def test_cli_check_names_misspelt_key(tmp_path: Path) -> None:
    path = write(tmp_path, "batch_sise = 500\n")
    result = subprocess.run(
        [APPLIANCE, "config", "check", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "batch_sise" in result.stderr


def test_cli_check_accepts_valid_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [APPLIANCE, "config", "check", str(write(tmp_path, GOOD))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "3 link(s)" in result.stdout
