"""`appliance doctor` checks of the sink: its credentials file and its reachability."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx

from appliance.config import Config
from appliance.doctor_result import (
    CheckResult,
    Status,
    owner_and_mode,
    run_with_deadline,
)
from appliance.errors import SetupError
from appliance.mqtt_connection import read_password
from appliance.sync import read_token


def check_sink(config: Config, timeout: float) -> list[CheckResult]:
    """Check the sink's credentials file and whether the sink responds."""
    sync = config.sync
    if sync.sink == "mqtt":
        return _check_mqtt(config, timeout)
    if not sync.url:
        detail = "no [sync] url is configured; records stay queued in the outbox"
        return [CheckResult("sink", Status.INFO, detail)]
    results = []
    token = None
    if sync.token_file is not None:
        try:
            token = read_token(sync.token_file)
        except SetupError as exc:
            results.append(
                CheckResult("token file", Status.FAIL, str(exc), _secret_fix("token"))
            )
        else:
            owner = owner_and_mode(sync.token_file)
            detail = f"{sync.token_file} is readable ({owner})"
            results.append(CheckResult("token file", Status.PASS, detail))
    results.append(_probe_http(sync.url, token, sync.ca_bundle, timeout))
    return results


def _probe_http(
    url: str, token: str | None, ca_bundle: Path | None, timeout: float
) -> CheckResult:
    """Send HEAD to the sink, as the daemon's probe does, and judge the status."""
    verify: bool | ssl.SSLContext = True
    if ca_bundle is not None:
        try:
            verify = ssl.create_default_context(cafile=str(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            detail = f"CA bundle {ca_bundle} cannot be used: {exc}"
            fix = (
                "set [sync] ca_bundle to a PEM file, or remove it to use the "
                "system's certificates"
            )
            return CheckResult("sink", Status.FAIL, detail, fix)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def head() -> int:
        with httpx.Client(timeout=timeout, verify=verify) as client:
            return client.head(url, headers=headers).status_code

    try:
        status = run_with_deadline(head, timeout + 1.0)
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        return CheckResult(
            "sink",
            Status.WARN,
            f"{url} unreachable: {exc or type(exc).__name__}; records stay queued "
            "until it answers",
            "check the network, DNS and [sync] url",
        )
    if status in (401, 403):
        return CheckResult(
            "sink",
            Status.FAIL,
            f"{url} refused the credentials: HTTP {status} to HEAD",
            "put the token the sink expects into [sync] token_file",
        )
    detail = (
        f"{url} answered HEAD with HTTP {status}; a HEAD request does not prove "
        "that the sink accepts the token, the first upload does"
    )
    return CheckResult("sink", Status.PASS, detail)


def _check_mqtt(config: Config, timeout: float) -> list[CheckResult]:
    mqtt = config.mqtt
    if not mqtt.host:
        fix = 'set [mqtt] host, or set [sync] sink = "http" with a url'
        detail = '[sync] sink is "mqtt" but [mqtt] host is empty'
        return [CheckResult("sink", Status.FAIL, detail, fix)]
    results = []
    if mqtt.password_file is not None:
        try:
            read_password(mqtt.password_file)
        except SetupError as exc:
            fix = _secret_fix("password")
            results.append(CheckResult("password file", Status.FAIL, str(exc), fix))
        else:
            owner = owner_and_mode(mqtt.password_file)
            detail = f"{mqtt.password_file} is readable ({owner})"
            results.append(CheckResult("password file", Status.PASS, detail))
    address = f"{mqtt.host}:{mqtt.port}"
    try:
        run_with_deadline(
            lambda: socket.create_connection((mqtt.host, mqtt.port), timeout).close(),
            timeout + 1.0,
        )
    except OSError as exc:
        detail = (
            f"broker {address} unreachable: {exc}; records stay queued until it answers"
        )
        fix = "check the network, DNS and [mqtt] host and port"
        results.append(CheckResult("sink", Status.WARN, detail, fix))
    else:
        detail = (
            f"broker {address} accepts TCP connections; the user name and "
            "password are checked only when the daemon connects"
        )
        results.append(CheckResult("sink", Status.PASS, detail))
    return results


def _secret_fix(secret: str) -> str:
    return (
        f"write the {secret} on one line into the file named above, owned by the "
        "service user with mode 0600: `sudo chown field-relay FILE && sudo chmod "
        "600 FILE`"
    )
