"""`appliance doctor` checks of this machine: data directory, disk, clock, daemon."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.control import ControlClient, socket_path
from appliance.doctor_result import CheckResult, Status, group_name, owner_and_mode
from appliance.errors import ControlError

EARLIEST_PLAUSIBLE_TIME = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC).timestamp()
"""A system time before 2025-01-01 UTC is certainly wrong for this software."""


def check_data_dir(data_dir: Path) -> CheckResult:
    """Check that the daemon can create or write the data directory."""
    name = "data dir"
    if not data_dir.exists():
        parent = existing_ancestor(data_dir)
        if os.access(parent, os.W_OK | os.X_OK):
            detail = f"{data_dir} does not exist yet; `appliance run` creates it"
            return CheckResult(name, Status.PASS, detail)
        return CheckResult(
            name,
            Status.FAIL,
            f"{data_dir} does not exist and {parent} is not writable by this user",
            f"create it for the service user: `sudo install -d -o field-relay -g "
            f"field-relay -m 0750 {data_dir}`, or choose another --data-dir",
        )
    if not data_dir.is_dir():
        fix = "choose another --data-dir"
        return CheckResult(name, Status.FAIL, f"{data_dir} is not a directory", fix)
    try:
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as exc:
        return CheckResult(
            name,
            Status.FAIL,
            f"{data_dir} is not writable: {exc.strerror} ({owner_and_mode(data_dir)})",
            f"give the service user write access: `sudo chown -R field-relay:"
            f"field-relay {data_dir}`, or choose another --data-dir",
        )
    detail = f"{data_dir} is writable ({owner_and_mode(data_dir)})"
    return CheckResult(name, Status.PASS, detail)


def check_free_space(
    data_dir: Path, min_free_bytes: int, min_free_inodes_percent: float
) -> list[CheckResult]:
    """Check free bytes and free inodes on the file system of ``data_dir``."""
    where = existing_ancestor(data_dir)
    usage = os.statvfs(where)
    free_bytes = usage.f_bavail * usage.f_frsize
    freeing = (
        "delete files on that file system, lower [outbox] retain_uploaded_s or set "
        "[outbox] quota_bytes, or move --data-dir to a larger file system"
    )
    if free_bytes < min_free_bytes:
        space = CheckResult(
            "disk space",
            Status.FAIL,
            f"{_format_bytes(free_bytes)} free on the file system of {where}, below "
            f"the minimum of {_format_bytes(min_free_bytes)}",
            freeing,
        )
    else:
        detail = f"{_format_bytes(free_bytes)} free on the file system of {where}"
        space = CheckResult("disk space", Status.PASS, detail)
    if usage.f_files == 0:
        # Some file systems (btrfs, for one) allocate inodes dynamically and
        # report a total of 0.
        detail = f"the file system of {where} reports no inode limit"
        return [space, CheckResult("inodes", Status.PASS, detail)]
    percent = 100.0 * usage.f_favail / usage.f_files
    counts = f"{usage.f_favail} of {usage.f_files} inodes free ({percent:.1f} %)"
    if percent < min_free_inodes_percent:
        inodes = CheckResult(
            "inodes",
            Status.FAIL,
            f"{counts} on the file system of {where}, below the minimum of "
            f"{min_free_inodes_percent:g} %",
            "delete unneeded small files on that file system, or move --data-dir "
            "to another file system",
        )
    else:
        detail = f"{counts} on the file system of {where}"
        inodes = CheckResult("inodes", Status.PASS, detail)
    return [space, inodes]


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _format_bytes(count: int) -> str:
    if count >= 2**30:
        return f"{count / 2**30:.1f} GiB"
    return f"{count / 2**20:.1f} MiB"


def check_clock(now: float | None = None, timeout: float = 3.0) -> CheckResult:
    """Check that the system time is plausible and, where known, synchronized.

    Record timestamps, outbox expiry and TLS certificate checks all read this
    clock. ``now`` replaces the system time, for tests.
    """
    current = time.time() if now is None else now
    floor = max(EARLIEST_PLAUSIBLE_TIME, _installed_at())
    shown_time = datetime.datetime.fromtimestamp(current, datetime.UTC).isoformat(
        timespec="seconds"
    )
    if current < floor:
        floor_date = datetime.datetime.fromtimestamp(floor, datetime.UTC).date()
        return CheckResult(
            "clock",
            Status.WARN,
            f"system time {shown_time} is before {floor_date}, when this software was "
            "installed or released, so the clock is wrong",
            "set the clock (`sudo timedatectl set-time`) and enable time "
            "synchronization (`sudo timedatectl set-ntp true`)",
        )
    synchronized, sync_state = _time_synchronized(timeout)
    if synchronized is False:
        return CheckResult(
            "clock",
            Status.WARN,
            f"system time {shown_time} is not synchronized ({sync_state})",
            "enable time synchronization with `sudo timedatectl set-ntp true` and "
            "check that the NTP server is reachable",
        )
    return CheckResult("clock", Status.PASS, f"system time {shown_time}; {sync_state}")


def _installed_at() -> float:
    """Return the mtime of this module's file: the install time, or a later edit."""
    try:
        return Path(__file__).stat().st_mtime
    except OSError:
        return 0.0


def _time_synchronized(timeout: float) -> tuple[bool | None, str]:
    """Ask timedatectl whether the clock is synchronized; None when it cannot tell."""
    command = shutil.which("timedatectl")
    if command is None:
        return None, "synchronization unknown: timedatectl not found"
    try:
        completed = subprocess.run(
            [command, "show", "--property=NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"synchronization unknown: timedatectl failed: {exc}"
    if completed.returncode != 0:
        reason = (completed.stderr.strip().splitlines() or ["no output"])[0]
        return None, f"synchronization unknown: timedatectl failed: {reason}"
    value = completed.stdout.strip()
    return value == "yes", f"timedatectl reports NTPSynchronized={value}"


def check_daemon(
    data_dir: Path, timeout: float
) -> tuple[CheckResult, dict[str, Any] | None]:
    """Report whether a daemon serves the control socket, and its live link states.

    Returns the result and, while a daemon responds, its links by name.
    """
    path = socket_path(data_dir)
    if not path.exists():
        detail = f"no daemon is running for {data_dir} ({path.name} not found)"
        return CheckResult("daemon", Status.INFO, detail), None
    if not os.access(path, os.R_OK | os.W_OK):
        group = group_name(path.stat().st_gid)
        return CheckResult(
            "daemon",
            Status.WARN,
            f"permission denied on {path} ({owner_and_mode(path)})",
            f"join group {group!r}: `sudo usermod -aG {group} USER`, then log in again",
        ), None
    try:
        with ControlClient(data_dir, timeout=timeout) as client:
            status = client.call("status")
    except (ControlError, OSError, ValueError) as exc:
        detail = f"no daemon responds on {path}: {exc}"
        return CheckResult("daemon", Status.INFO, detail), None
    daemon = status.get("daemon", {})
    detail = f"running, pid {daemon.get('pid')}, model {daemon.get('model')}"
    return CheckResult("daemon", Status.INFO, detail), status.get("links", {})
