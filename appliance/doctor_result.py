"""Check results and the helpers that the `appliance doctor` checks share."""

from __future__ import annotations

import dataclasses
import enum
import grp
import pwd
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Status(enum.StrEnum):
    """Outcome of one check."""

    PASS = "PASS"
    WARN = "WARN"
    """Something may stop part of the appliance from working; not a failure."""
    FAIL = "FAIL"
    """The appliance cannot work as configured until this is fixed."""
    INFO = "INFO"
    """A fact with no verdict, such as whether a daemon is running."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    """The action that fixes the problem, or empty when nothing needs doing."""


def owner_and_mode(path: Path) -> str:
    """Return ``owner USER:GROUP, mode 0NNN`` for ``path``, for check details."""
    info = path.stat()
    return (
        f"owner {_user_name(info.st_uid)}:{group_name(info.st_gid)}, "
        f"mode {stat.S_IMODE(info.st_mode):04o}"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def run_with_deadline(function: Callable[[], T], seconds: float) -> T:
    """Call ``function`` on a worker thread and wait at most ``seconds`` for it.

    Raises:
        TimeoutError: no result in time. The thread keeps running in the
            background until the call returns or the process exits, which is
            how a blocking DNS lookup or port open is abandoned.
        Exception: whatever ``function`` raised.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # re-raised on the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=call, name="doctor-check", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"timed out after {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]
