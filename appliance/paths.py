"""The data directory: where the database, the answer cache and logs live."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

from appliance.errors import DataDirError

ENV_DATA_DIR = "FIELD_RELAY_DATA_DIR"


def default_data_dir() -> Path:
    """Return ``$FIELD_RELAY_DATA_DIR``, else ``$XDG_DATA_HOME/field-relay``,
    else ``~/.local/share/field-relay``."""
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "field-relay"


class DataDirLock:
    """An exclusive lock on a data directory, held by the process that writes it.

    Two writers on one directory would each number records on the same link
    from the same starting point, so the second must not start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path / "appliance.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            DataDirError: another process holds it, naming that process.
        """
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataDirError(
                f"data directory {str(self.path.parent)!r} is in use by another "
                f"appliance process (pid {holder}); stop it or choose another "
                "--data-dir",
                self.path.parent,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drop the lock. Safe to call more than once."""
        if self._file is not None:
            self._file.close()
            self._file = None


def prepare_data_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable.

    Raises:
        DataDirError: the directory cannot be created or written, naming it and
            the fix.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(
            f"cannot create data directory {str(path)!r}: {exc.strerror}; choose "
            "another with --data-dir or fix the parent's permissions",
            path,
        ) from exc
    if not path.is_dir():
        raise DataDirError(
            f"data directory {str(path)!r} is not a directory; choose another with "
            "--data-dir",
            path,
        )
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DataDirError(
            f"data directory {str(path)!r} is not writable: {exc.strerror}; fix its "
            "permissions or choose another with --data-dir",
            path,
        ) from exc
    return path
