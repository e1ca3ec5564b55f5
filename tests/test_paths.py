"""The data directory: creation checks and the single-writer lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.errors import DataDirError
from appliance.paths import DataDirLock, prepare_data_dir


def test_second_lock_is_rejected(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    with pytest.raises(DataDirError, match=f"pid {os.getpid()}"):
        DataDirLock(tmp_path).acquire()
    first.release()


def test_lock_is_free_after_release(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    first.release()
    second = DataDirLock(tmp_path)
    second.acquire()
    second.release()


def test_data_dir_under_a_file_is_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataDirError) as caught:
        prepare_data_dir(blocker / "d")
    assert caught.value.path == blocker / "d"
