"""The data directory: where the database, the answer cache and logs live."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from appliance.errors import DataDirError

ENV_DATA_DIR = "FIELD_RELAY_DATA_DIR"


def default_data_dir() -> Path:
    """Return ``$FIELD_RELAY_DATA_DIR``, else ``$XDG_DATA_HOME/field-relay``,
    else ``~/.local/share/field-relay``."""
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "field-relay"


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
