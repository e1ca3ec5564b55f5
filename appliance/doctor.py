"""`appliance doctor`: check that this machine can run the appliance.

Each check returns one ``CheckResult`` with a status, a detail that names the
value it looked at and, when something is wrong, the fix. ``run_checks`` turns
an OSError that escapes a check into a FAIL result of that check, so one broken
check does not stop the others. Checks that wait on something outside the process
(a serial URL, D-Bus, the sink, ``timedatectl``) have a deadline, so the whole
run ends within seconds on a machine without a network. The checks live in
doctor_host, doctor_model, doctor_links and doctor_sink.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from appliance.config import Config, Transport, load_config
from appliance.doctor_host import (
    check_clock,
    check_daemon,
    check_data_dir,
    check_free_space,
)
from appliance.doctor_links import check_ble, check_serial_link
from appliance.doctor_model import check_model, hash_cache_path
from appliance.doctor_result import CheckResult, Status
from appliance.doctor_sink import check_sink
from appliance.errors import ConfigError
from appliance.paths import default_data_dir

logger = logging.getLogger(__name__)

__all__ = [
    "CheckResult",
    "DoctorOptions",
    "Status",
    "format_text",
    "run_checks",
    "to_json",
]


@dataclasses.dataclass(frozen=True)
class DoctorOptions:
    """Settings of one doctor run: the data directory, configuration and limits."""

    data_dir: Path
    config_path: Path | None = None
    min_free_bytes: int = 100 * 2**20
    """Free bytes on the data directory's file system below which disk space fails."""
    min_free_inodes_percent: float = 1.0
    """Free inodes, in percent of all inodes, below which the inode check fails."""
    timeout: float = 3.0
    """Seconds each network, D-Bus or subprocess check may take."""
    manifest_dir: Path | None = None
    """Directory of model manifests; None uses models/."""
    assembled_dir: Path | None = None
    """Directory of model files assembled from chunks; None uses the default."""
    use_hash_cache: bool = True
    """Reuse an earlier model hash result while the file's size and mtime match."""


def run_checks(options: DoctorOptions) -> list[CheckResult]:
    """Run every check and return the results in the order they are printed."""
    config, config_result = _load_config(options.config_path)
    data_dir = options.data_dir
    if config.data_dir is not None and data_dir == default_data_dir():
        data_dir = config.data_dir
    cache = hash_cache_path(data_dir) if options.use_hash_cache else None
    limits = (options.min_free_bytes, options.min_free_inodes_percent)
    checks: list[tuple[str, Callable[[], CheckResult | list[CheckResult]]]] = [
        ("data dir", partial(check_data_dir, data_dir)),
        ("disk space", partial(check_free_space, data_dir, *limits)),
        (
            "model",
            partial(
                check_model, config, options.manifest_dir, options.assembled_dir, cache
            ),
        ),
    ]

    daemon_result, live_links = check_daemon(data_dir, options.timeout)
    for link in config.links:
        if link.transport == Transport.SERIAL:
            port_check = partial(check_serial_link, link, live_links, options.timeout)
            checks.append((f"port {link.name}", port_check))
    checks += [
        ("ble adapter", partial(check_ble, config.links, options.timeout)),
        ("clock", partial(check_clock, timeout=options.timeout)),
        ("sink", partial(check_sink, config, options.timeout)),
    ]

    results = [config_result]
    for name, check in checks:
        results += _run_guarded(name, check)
    results.append(daemon_result)
    return results


def _run_guarded(
    name: str, check: Callable[[], CheckResult | list[CheckResult]]
) -> list[CheckResult]:
    """Run ``check``, turning an OSError it did not expect into a FAIL result."""
    try:
        outcome = check()
    except OSError as exc:
        logger.debug("check %s failed", name, exc_info=True)
        fix = "fix the cause named above and run the doctor again"
        return [CheckResult(name, Status.FAIL, f"check failed: {exc}", fix)]
    return outcome if isinstance(outcome, list) else [outcome]


def format_text(results: list[CheckResult]) -> str:
    """Render one ``STATUS name: detail`` line per check, each fix on the next line."""
    lines = []
    for result in results:
        lines.append(f"{result.status.value} {result.name}: {result.detail}")
        if result.fix:
            lines.append(f"     fix: {result.fix}")
    failed = sum(result.status == Status.FAIL for result in results)
    lines.append(f"{failed} of {len(results)} checks failed")
    return "\n".join(lines)


def to_json(results: list[CheckResult]) -> str:
    """Render the results as one JSON object with a ``checks`` array."""
    checks = [dataclasses.asdict(result) for result in results]
    failed = any(result.status == Status.FAIL for result in results)
    return json.dumps({"ok": not failed, "checks": checks}, indent=2)


def _load_config(path: Path | None) -> tuple[Config, CheckResult]:
    """Load the configuration as `appliance run` does, with environment overrides."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        where = f" {path}" if path is not None else ""
        fix = f"correct the keys named above, then run `appliance config check{where}`"
        return Config.model_validate({}), CheckResult(
            "config", Status.FAIL, str(exc), fix
        )
    if path is None:
        note = "no --config given; checking the default settings"
        return config, CheckResult("config", Status.INFO, note)
    detail = f"{path} is valid, {len(config.links)} link(s)"
    return config, CheckResult("config", Status.PASS, detail)
