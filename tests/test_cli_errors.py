"""Setup errors end with one clear line naming the path and the fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import APPLIANCE


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [APPLIANCE, *args], capture_output=True, text=True, timeout=120
    )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_missing_port_names_path(tmp_path: Path) -> None:
    result = _run("run", "--port", "/dev/ttyNOPE9", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "/dev/ttyNOPE9" in _error_lines(result)[0]


def test_missing_port_says_how_to_fix(tmp_path: Path) -> None:
    result = _run("run", "--port", "/dev/ttyNOPE9", "--data-dir", str(tmp_path))
    assert "--port" in _error_lines(result)[0]


def test_missing_model_names_path(tmp_path: Path) -> None:
    result = _run(
        "run",
        "--demo",
        "--model",
        str(tmp_path / "none.gguf"),
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert result.returncode == 1
    assert str(tmp_path / "none.gguf") in _error_lines(result)[0]


def test_truncated_model_file_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    result = _run(
        "run", "--demo", "--model", str(bad), "--data-dir", str(tmp_path / "d")
    )
    assert result.returncode == 1
    assert len(_error_lines(result)) == 1


def test_unusable_data_dir_names_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run("run", "--demo", "--data-dir", str(blocker / "data"))
    assert result.returncode == 1
    assert str(blocker / "data") in _error_lines(result)[0]


def test_demo_and_port_together_is_usage_error(tmp_path: Path) -> None:
    result = _run("run", "--demo", "--port", "/dev/null", "--data-dir", str(tmp_path))
    assert result.returncode == 2


def test_invalid_upload_url_fails_at_once(tmp_path: Path) -> None:
    import json

    feed = tmp_path / "one.jsonl"
    feed.write_text(json.dumps({"sensor": "pump-1"}) + "\n")
    assert (
        _run(
            "replay", str(feed), "--kind", "json", "--data-dir", str(tmp_path / "d")
        ).returncode
        == 0
    )
    result = _run(
        "sync",
        "--upload-url",
        "notaurl",
        "--once",
        "--timeout",
        "60",
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert result.returncode == 1
    assert "--upload-url" in _error_lines(result)[0]


def test_baud_below_range_is_usage_error(tmp_path: Path) -> None:
    result = _run(
        "run", "--port", "/dev/null", "--baud", "0", "--data-dir", str(tmp_path)
    )
    assert result.returncode == 2
