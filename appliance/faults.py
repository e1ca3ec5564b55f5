"""A fault-injection hook for crash tests: exit the process at a named point.

``FIELD_RELAY_CRASH_AT=NAME:N`` makes the N-th pass through point NAME end the
process at once with ``os._exit(CRASH_EXIT)``, as a power cut would: no
cleanup, no flush, no rollback beyond what SQLite does on the next open. The
points are ``commit.before`` and ``commit.after``, passed by every write
transaction of ``Store`` just before and just after its COMMIT: each workflow
step, intake commit and upload commit is one transaction, so counting passes
reaches every step boundary in turn. Without the variable the hook costs one
comparison.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

ENV = "FIELD_RELAY_CRASH_AT"
CRASH_EXIT = 86
"""Exit status of an injected crash, distinct from signals and errors."""

_target: tuple[str, int] | None = None
_passes = 0


def _load() -> tuple[str, int] | None:
    spec = os.environ.get(ENV, "")
    name, _, count = spec.rpartition(":")
    if not name or not count.isdigit() or int(count) < 1:
        if spec:
            logger.warning("ignoring %s=%r: expected NAME:N with N >= 1", ENV, spec)
        return None
    return name, int(count)


_target = _load()


def point(name: str) -> None:
    """Exit the process here if this is the configured point and pass."""
    global _passes
    if _target is None or _target[0] != name:
        return
    _passes += 1
    if _passes == _target[1]:
        sys.stderr.write(f"injected crash at {name} pass {_passes}\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT)
