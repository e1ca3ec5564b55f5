"""The TUI: pilot tests against a real daemon, and SVG snapshots of fixed data.

The pilot tests share one daemon, started by a fixture on a temporary data
directory with the demo's simulated device, the real model and a collector
on loopback. Two dead records come from `appliance replay` of lines that are
not JSON objects. Every wait polls the app's state with a deadline.

The snapshot tests use a database written here with fixed ids and times, a
fixed clock, and a control server with canned replies, so the pictures do
not change between runs. `pytest --snapshot-update tests/test_tui.py`
rewrites them, and the HTML report shows each test's docstring.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from textual.message import Message
from textual.notifications import Notify
from textual.pilot import Pilot
from textual.widgets import DataTable

from appliance.control import ControlServer, daemon_running
from appliance.review import ensure_schema, set_review_state
from appliance.states import RecordKind, RecordState
from appliance.store import DB_NAME, Store
from tests.conftest import APPLIANCE
from tui.app import DARK_THEME, LIGHT_THEME, RelayApp
from tui.screens.base import RelayScreen
from tui.screens.dashboard import DashboardScreen, review_text
from tui.screens.dead import DeadLettersScreen
from tui.screens.devices import DevicesScreen
from tui.screens.dialogs import ConfirmScreen, NameScreen
from tui.screens.feed import FEED_BUFFER, FEED_SHOWN, FeedScreen
from tui.screens.record import RecordScreen
from tui.screens.sync import SyncScreen
from tui.source import RelaySource
from tui.views import ReviewView
from tui.widgets import SCREENS

WAIT_S = 60.0
"""Deadline for one awaited state; generous because the daemon shares the
cores with the model and with other test runs."""
START_S = 180.0
"""Deadline for the daemon to load the model and open its control socket."""
BAD_LINES = ["this is not json", "[1, 2]"]
GOOD_JSON_LINE = '{"severity": "error", "summary": "pump pressure low"}'


# Helpers ----------------------------------------------------------------------


async def wait_for(
    pilot: Pilot[Any], condition: Callable[[], bool], what: str, timeout: float = WAIT_S
) -> None:
    """Let the app run until ``condition`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(0.05)


def drive(
    app: RelayApp,
    scenario: Callable[[Pilot[Any]], Awaitable[None]],
    size: tuple[int, int] = (80, 24),
    notices: list[str] | None = None,
) -> None:
    """Run ``scenario`` against ``app`` in a headless terminal of ``size``.

    The text of every notification the app shows is appended to ``notices``.
    """

    def hook(message: Message) -> None:
        if notices is not None and isinstance(message, Notify):
            notices.append(message.notification.message)

    async def main() -> None:
        async with app.run_test(size=size, message_hook=hook) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def loaded(pilot: Pilot[Any], screen_type: type[RelayScreen]) -> RelayScreen:
    """Wait until the current screen is a ``screen_type`` that drew its data."""
    app = pilot.app
    await wait_for(
        pilot,
        lambda: isinstance(app.screen, screen_type) and app.screen.loads > 0,
        f"{screen_type.__name__} to load",
    )
    return app.screen  # type: ignore[return-value]


async def reloaded(pilot: Pilot[Any], screen: RelayScreen) -> None:
    """Wait for a read that started after now, so its data includes earlier changes."""
    target = screen.loads + 2
    await wait_for(pilot, lambda: screen.loads >= target, "two more reloads")


async def command_result(pilot: Pilot[Any], start: int) -> Any:
    """Wait for the command sent after ``action_log`` had ``start`` entries."""
    app: RelayApp = pilot.app  # type: ignore[assignment]
    await wait_for(pilot, lambda: len(app.action_log) > start, "a command result")
    return app.action_log[start]


def screen_text(app: RelayApp) -> str:
    """Return the characters on screen, from a screenshot's text elements."""
    svg = app.export_screenshot()
    pieces = re.findall(r"<text[^>]*>(.*?)</text>", svg, flags=re.S)
    return html.unescape("".join(pieces)).replace("\xa0", " ")


def _in_mode(app: RelayApp, mode: str) -> bool:
    return app.current_mode == mode


def table_keys(table: DataTable[Any]) -> list[str]:
    return [str(row.key.value) for row in table.ordered_rows]


def record_events(data_dir: Path, record_id: str) -> list[str]:
    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        return [event["step"] for event in store.events_for(record_id)]
    finally:
        store.close()


def dead_ids(data_dir: Path) -> list[str]:
    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        return [row["id"] for row in store.list_records(str(RecordState.DEAD))]
    finally:
        store.close()


# A real daemon ----------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FIELD_RELAY_DATA_DIR", None)
    return env


def _start_collector(tmp: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [APPLIANCE, "collector", "--port", "0", "--db", str(tmp / "collector.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_child_env(),
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], WAIT_S)
    line = process.stdout.readline() if ready else ""
    match = re.search(r"http://127\.0\.0\.1:\d+/ingest", line)
    if match is None:
        process.kill()
        process.wait()
        pytest.fail(f"collector printed no upload URL: {line!r}")
    return process, match.group(0)


def _start_daemon(data_dir: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                APPLIANCE,
                "run",
                "--demo",
                "--demo-rate",
                "0.5",
                "--upload-url",
                url,
                "--data-dir",
                str(data_dir),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
    deadline = time.monotonic() + START_S
    while not daemon_running(data_dir):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"daemon did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return process


def _stop(process: subprocess.Popen[Any]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data directory served by a running daemon, with two dead records."""
    tmp = tmp_path_factory.mktemp("tui-live")
    data_dir = tmp / "data"
    lines = tmp / "bad.jsonl"
    lines.write_text("\n".join([*BAD_LINES, GOOD_JSON_LINE]) + "\n")
    replay = subprocess.run(
        [
            APPLIANCE,
            "replay",
            str(lines),
            "--kind",
            "json",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr[-2000:]
    collector, url = _start_collector(tmp)
    try:
        daemon = _start_daemon(data_dir, url, tmp / "daemon.log")
        try:
            yield data_dir
        finally:
            _stop(daemon)
    finally:
        _stop(collector)


@pytest.fixture
def live_app(live_dir: Path) -> RelayApp:
    return RelayApp(live_dir)


# Pilot tests against the real daemon -------------------------------------------

pilot_mark = pytest.mark.model


@pilot_mark
def test_dashboard_attaches_to_daemon(live_app: RelayApp, live_dir: Path) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        screen = await loaded(pilot, DashboardScreen)
        assert live_app.connection is not None
        assert live_app.connection.live
        await wait_for(
            pilot,
            lambda: "demo" in table_keys(screen.query_one("#links", DataTable)),
            "the demo link",
        )
        assert screen.data.states["dead"] >= len(BAD_LINES)
        assert screen.data.upload_url is not None
        text = screen_text(live_app)
        for word in ("LIVE", "Records", "Links", "Outbox", "Sync", "dead"):
            assert word in text

    drive(live_app, scenario)


@pilot_mark
def test_number_keys_switch_screens(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        for key, mode, _title in [*SCREENS[1:], SCREENS[0]]:
            await pilot.press(key)
            await wait_for(pilot, partial(_in_mode, live_app, mode), f"mode {mode}")
            await wait_for(
                pilot,
                lambda: getattr(live_app.screen, "loads", 0) > 0,
                f"{mode} to load",
            )

    drive(live_app, scenario)


@pilot_mark
def test_dashboard_sync_now_key(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await loaded(pilot, DashboardScreen)
        await pilot.press("n")
        result = await command_result(pilot, 0)
        assert result.command == "sync_now"
        assert result.ok, result.message

    drive(live_app, scenario)


@pilot_mark
def test_feed_shows_records_as_they_arrive(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        feed = await loaded(pilot, FeedScreen)
        assert isinstance(feed, FeedScreen)
        first = feed.cursor
        await wait_for(pilot, lambda: feed.cursor > first, "a new demo record")
        newest = list(feed.buffer.values())[-1]
        assert newest.link == "demo"
        table = feed.query_one("#feed", DataTable)
        assert table_keys(table)[0] == newest.record_id

    drive(live_app, scenario)


@pilot_mark
def test_feed_filter_keys(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        feed = await loaded(pilot, FeedScreen)
        assert isinstance(feed, FeedScreen)
        table = feed.query_one("#feed", DataTable)

        await pilot.press("l")
        assert feed.link_filter != "all"
        assert all(row.link == feed.link_filter for row in feed.visible_rows())

        await pilot.press("s", "s", "s", "s", "s", "s")
        assert feed.state_filter == "dead"
        assert table.row_count == len(feed.visible_rows())

        await pilot.press("c", "s", "s", "s", "s", "s", "s")
        assert feed.link_filter == "all"
        assert feed.state_filter == "dead"
        assert table.row_count >= len(BAD_LINES)
        assert all(row.state == "dead" for row in feed.visible_rows())

        await pilot.press("v")
        assert feed.severity_filter == "critical"
        await pilot.press("v", "v", "v", "v", "v")
        assert feed.severity_filter == "none"
        assert table.row_count >= len(BAD_LINES)

        await pilot.press("c")
        assert (feed.link_filter, feed.state_filter, feed.severity_filter) == (
            "all",
            "all",
            "all",
        )

    drive(live_app, scenario)


@pilot_mark
def test_feed_space_pauses_reloads(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        feed = await loaded(pilot, FeedScreen)
        assert isinstance(feed, FeedScreen)
        await pilot.press("space")
        assert feed.paused
        assert "PAUSED" in screen_text(live_app)
        assert not feed.ready_to_load()
        await pilot.press("space")
        assert not feed.paused
        await reloaded(pilot, feed)

    drive(live_app, scenario)


@pilot_mark
def test_feed_enter_opens_record(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        feed = await loaded(pilot, FeedScreen)
        table = feed.query_one("#feed", DataTable)
        await wait_for(pilot, lambda: table.row_count > 0, "feed rows")
        selected = table_keys(table)[table.cursor_row]
        await pilot.press("enter")
        record = await loaded(pilot, RecordScreen)
        assert isinstance(record, RecordScreen)
        assert record.record_id == selected
        assert record.data[1].record_id == selected
        await pilot.press("escape")
        await wait_for(pilot, lambda: live_app.screen is feed, "the feed again")

    drive(live_app, scenario)


@pilot_mark
def test_dead_letter_detail_shows_failure(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("5")
        dead = await loaded(pilot, DeadLettersScreen)
        table = dead.query_one("#dead", DataTable)
        await wait_for(pilot, lambda: table.row_count >= len(BAD_LINES), "dead rows")
        await pilot.press("enter")
        record = await loaded(pilot, RecordScreen)
        detail = record.data[1]
        assert detail.state == "dead"
        assert "not a JSON object" in detail.error
        steps = [entry.step for entry in detail.history]
        assert steps[0] == "receive"
        assert "decode" in steps
        text = screen_text(live_app)
        assert "Why it failed" in text
        assert "not a JSON object" in text
        assert detail.record_id in text

    drive(live_app, scenario)


@pilot_mark
def test_dead_letter_retry_key(live_app: RelayApp, live_dir: Path) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("5")
        dead = await loaded(pilot, DeadLettersScreen)
        table = dead.query_one("#dead", DataTable)
        await wait_for(pilot, lambda: table.row_count > 0, "dead rows")
        record_id = table_keys(table)[table.cursor_row]
        retries_before = record_events(live_dir, record_id).count("retry")
        await pilot.press("r")
        result = await command_result(pilot, 0)
        assert result.command == "retry"
        assert result.ok, result.message
        assert record_id in result.message
        assert record_events(live_dir, record_id).count("retry") == retries_before + 1

    drive(live_app, scenario)


@pilot_mark
def test_retry_all_asks_first(live_app: RelayApp, live_dir: Path) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("5")
        dead = await loaded(pilot, DeadLettersScreen)
        await wait_for(pilot, lambda: dead.data.total > 0, "dead records")
        await pilot.press("a")
        await wait_for(
            pilot, lambda: isinstance(live_app.screen, ConfirmScreen), "confirm"
        )
        await pilot.press("n")
        await wait_for(pilot, lambda: live_app.screen is dead, "dialog closed")
        assert live_app.action_log == []

        ids = dead_ids(live_dir)
        await pilot.press("a")
        await wait_for(
            pilot, lambda: isinstance(live_app.screen, ConfirmScreen), "confirm"
        )
        await pilot.press("y")
        result = await command_result(pilot, 0)
        assert result.command == "retry"
        assert result.ok, result.message
        assert "dead records put back" in result.message
        for record_id in ids:
            assert "retry" in record_events(live_dir, record_id)

    drive(live_app, scenario)


@pilot_mark
def test_record_retry_and_sync_keys(live_app: RelayApp, live_dir: Path) -> None:
    """The task a new user must manage: find a dead record, read why, retry, sync."""

    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("5")
        dead = await loaded(pilot, DeadLettersScreen)
        table = dead.query_one("#dead", DataTable)
        await wait_for(pilot, lambda: table.row_count > 0, "dead rows")
        await pilot.press("enter")
        record = await loaded(pilot, RecordScreen)
        await wait_for(pilot, lambda: record.data[1].state == "dead", "a dead record")
        await pilot.press("r")
        retry = await command_result(pilot, 0)
        assert retry.command == "retry"
        assert retry.ok, retry.message
        await pilot.press("n")
        sync = await command_result(pilot, 1)
        assert sync.command == "sync_now"
        assert sync.ok, sync.message

    drive(live_app, scenario)


@pilot_mark
def test_record_retry_rejects_live_record(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        feed = await loaded(pilot, FeedScreen)
        assert isinstance(feed, FeedScreen)
        await pilot.press("s", "s", "s", "s", "s")
        assert feed.state_filter == "uploaded"
        table = feed.query_one("#feed", DataTable)
        await wait_for(pilot, lambda: table.row_count > 0, "an uploaded record")
        await pilot.press("enter")
        await loaded(pilot, RecordScreen)
        await pilot.press("r")
        await wait_for(
            pilot,
            lambda: any("only dead records can be retried" in n for n in notices),
            "the refusal",
        )
        assert live_app.action_log == []

    notices: list[str] = []
    drive(live_app, scenario, notices=notices)


@pilot_mark
def test_sync_pause_and_resume(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("3")
        sync = await loaded(pilot, SyncScreen)
        assert sync.data.paused is False
        await pilot.press("p")
        paused = await command_result(pilot, 0)
        assert paused.command == "sync_pause"
        assert paused.ok, paused.message
        await wait_for(pilot, lambda: sync.data.paused is True, "sync paused")
        await pilot.press("p")
        resumed = await command_result(pilot, 1)
        assert resumed.command == "sync_resume"
        assert resumed.ok, resumed.message
        await wait_for(pilot, lambda: sync.data.paused is False, "sync resumed")

    drive(live_app, scenario)


@pilot_mark
def test_sync_now_key_uploads(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("3")
        sync = await loaded(pilot, SyncScreen)
        before = sync.data.batches_sent
        await pilot.press("n")
        result = await command_result(pilot, 0)
        assert result.command == "sync_now"
        assert result.ok, result.message
        await wait_for(
            pilot, lambda: sync.data.batches_sent > before, "another uploaded batch"
        )

    drive(live_app, scenario)


@pilot_mark
def test_devices_disconnect_and_connect(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("4")
        devices = await loaded(pilot, DevicesScreen)
        links = devices.query_one("#links", DataTable)
        await wait_for(pilot, lambda: "demo" in table_keys(links), "the demo link")
        links.move_cursor(row=table_keys(links).index("demo"))

        def demo_paused() -> bool:
            return next(
                link.paused for link in devices.data.links if link.name == "demo"
            )

        await pilot.press("d")
        result = await command_result(pilot, 0)
        assert result.command == "link_disconnect"
        assert result.ok, result.message
        await wait_for(pilot, demo_paused, "the demo link paused")
        await pilot.press("c")
        result = await command_result(pilot, 1)
        assert result.command == "link_connect"
        assert result.ok, result.message
        await wait_for(pilot, lambda: not demo_paused(), "the demo link reading again")

    drive(live_app, scenario)


@pilot_mark
def test_devices_pair_and_forget(live_app: RelayApp, live_dir: Path) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("4")
        devices = await loaded(pilot, DevicesScreen)
        await pilot.press("a")
        await wait_for(
            pilot, lambda: isinstance(live_app.screen, NameScreen), "name dialog"
        )
        await pilot.press(*"tui-pump")
        await pilot.press("enter")
        paired = await command_result(pilot, 0)
        assert paired.command == "pair"
        assert paired.ok, paired.message

        def device_id() -> str | None:
            for device in devices.data.paired:
                if device["name"] == "tui-pump":
                    return device["device_id"]
            return None

        await wait_for(pilot, lambda: device_id() is not None, "the new device")
        table = devices.query_one("#paired", DataTable)
        await wait_for(pilot, lambda: device_id() in table_keys(table), "its row")
        await pilot.press("tab")
        await wait_for(pilot, lambda: live_app.focused is table, "paired table focus")
        while table_keys(table)[table.cursor_row] != device_id():
            await pilot.press("down")
        await pilot.press("f")
        await wait_for(
            pilot, lambda: isinstance(live_app.screen, ConfirmScreen), "confirm"
        )
        await pilot.press("y")
        forgot = await command_result(pilot, 1)
        assert forgot.command == "unpair"
        assert forgot.ok, forgot.message
        await wait_for(pilot, lambda: device_id() is None, "the device gone")

    drive(live_app, scenario)


@pilot_mark
def test_pair_dialog_escape_cancels(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("4")
        devices = await loaded(pilot, DevicesScreen)
        await pilot.press("a")
        await wait_for(
            pilot, lambda: isinstance(live_app.screen, NameScreen), "name dialog"
        )
        await pilot.press("escape")
        await wait_for(pilot, lambda: live_app.screen is devices, "dialog closed")
        assert live_app.action_log == []

    drive(live_app, scenario)


@pilot_mark
def test_devices_ble_scan_key(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("4")
        devices = await loaded(pilot, DevicesScreen)
        assert isinstance(devices, DevicesScreen)
        assert devices.ble_devices is None
        await pilot.press("b")
        await wait_for(pilot, lambda: devices.ble_devices is not None, "a scan result")
        assert not devices.scanning
        subtitle = str(devices.query_one("#ble", DataTable).border_subtitle)
        # A machine without a BLE adapter gets the scan's error instead.
        if devices.ble_error:
            assert subtitle == devices.ble_error
        else:
            assert subtitle == f"{len(devices.ble_devices or [])} found"

    drive(live_app, scenario)


@pilot_mark
def test_theme_and_keys_bindings(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await loaded(pilot, DashboardScreen)
        assert live_app.theme == DARK_THEME
        await pilot.press("ctrl+t")
        assert live_app.theme == LIGHT_THEME
        await pilot.press("ctrl+t")
        assert live_app.theme == DARK_THEME
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: bool(live_app.screen.query("HelpPanel")), "help")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: not live_app.screen.query("HelpPanel"), "no help")

    drive(live_app, scenario)


@pilot_mark
def test_q_quits_with_code_zero(live_app: RelayApp) -> None:
    async def scenario(pilot: Pilot[Any]) -> None:
        await loaded(pilot, DashboardScreen)
        await pilot.press("q")
        await wait_for(pilot, lambda: live_app.return_code is not None, "exit")

    drive(live_app, scenario)
    assert live_app.return_code == 0


@pilot_mark
def test_burst_keeps_app_responsive(live_app: RelayApp, live_dir: Path) -> None:
    """1,000 records a second for 3 s while keys are pressed on the feed."""
    burst_seconds = 3.0
    per_second = 1000
    inserted: list[int] = []
    stop = threading.Event()

    def write_burst() -> None:
        store = Store(live_dir / DB_NAME)
        try:
            started = time.monotonic()
            seq = 0
            while not stop.is_set() and time.monotonic() - started < burst_seconds:
                # One transaction per tenth of a second, as a fast link commits.
                with store.transaction() as conn:
                    for _ in range(per_second // 10):
                        seq += 1
                        line = json.dumps(
                            {"severity": "info", "summary": f"burst {seq}"}
                        )
                        store.insert_record(
                            conn, "burst", seq, line, line.encode(), RecordKind.JSON
                        )
                due = started + seq / per_second
                time.sleep(max(0.0, due - time.monotonic()))
            inserted.append(seq)
        finally:
            store.close()

    async def scenario(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        feed = await loaded(pilot, FeedScreen)
        assert isinstance(feed, FeedScreen)
        writer = threading.Thread(target=write_burst)
        writer.start()
        try:
            await wait_for(
                pilot,
                lambda: any(r.link == "burst" for r in feed.buffer.values()),
                "burst rows",
            )
            handled_keys = 0
            while writer.is_alive():
                await pilot.press("v")
                await wait_for(pilot, lambda: feed.severity_filter != "all", "v", 5.0)
                await pilot.press("c")
                await wait_for(pilot, lambda: feed.severity_filter == "all", "c", 5.0)
                handled_keys += 2
        finally:
            stop.set()
            writer.join()
        assert handled_keys >= 2
        assert inserted[0] >= burst_seconds * per_second * 0.5
        await reloaded(pilot, feed)
        assert len(feed.buffer) <= FEED_BUFFER
        assert feed.query_one("#feed", DataTable).row_count <= FEED_SHOWN
        assert list(feed.buffer.values())[-1].link == "burst"
        await pilot.press("1")
        await wait_for(pilot, lambda: live_app.current_mode == "dashboard", "dashboard")

    drive(live_app, scenario)


# Read-only, without a daemon ------------------------------------------------------


@pytest.fixture
def offline_dir(tmp_path: Path) -> Path:
    """A data directory with two dead records and no daemon."""
    data_dir = tmp_path / "data"
    lines = tmp_path / "bad.jsonl"
    lines.write_text("\n".join(BAD_LINES) + "\n")
    subprocess.run(
        [
            APPLIANCE,
            "replay",
            str(lines),
            "--kind",
            "json",
            "--data-dir",
            str(data_dir),
        ],
        check=True,
        capture_output=True,
        env=_child_env(),
        timeout=120,
    )
    return data_dir


def test_read_only_without_daemon(offline_dir: Path) -> None:
    app = RelayApp(offline_dir)

    async def scenario(pilot: Pilot[Any]) -> None:
        dashboard = await loaded(pilot, DashboardScreen)
        assert app.connection is not None
        assert not app.connection.live
        assert dashboard.data.states["dead"] == len(BAD_LINES)
        text = screen_text(app)
        assert "READ-ONLY" in text
        assert "no daemon running" in text
        assert "review off" in text

        await pilot.press("n")
        refused = await command_result(pilot, 0)
        assert not refused.ok
        assert "appliance sync --once" in refused.message

        await pilot.press("5")
        await loaded(pilot, DeadLettersScreen)
        await pilot.press("r")
        retry = await command_result(pilot, 1)
        assert not retry.ok
        assert "appliance retry" in retry.message
        assert dead_ids(offline_dir)  # nothing was changed

    drive(app, scenario)


def test_missing_database_says_so(tmp_path: Path) -> None:
    app = RelayApp(tmp_path / "empty")

    async def scenario(pilot: Pilot[Any]) -> None:
        dashboard = await loaded(pilot, DashboardScreen)
        assert dashboard.data.states["received"] == 0
        assert "no database yet" in screen_text(app)

    drive(app, scenario)


def test_unreadable_database_is_reported(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / DB_NAME).write_bytes(b"this is not an SQLite database\n" * 200)
    app = RelayApp(data_dir)

    async def scenario(pilot: Pilot[Any]) -> None:
        await wait_for(pilot, lambda: app.load_error is not None, "a read error")
        assert DB_NAME in str(app.load_error)
        assert "ERROR" in screen_text(app)
        await pilot.press("q")

    drive(app, scenario, size=(160, 24))
    assert app.return_code == 0


def test_every_binding_has_an_action() -> None:
    for owner in (
        RelayApp,
        DashboardScreen,
        FeedScreen,
        RecordScreen,
        SyncScreen,
        DevicesScreen,
        DeadLettersScreen,
        ConfirmScreen,
        NameScreen,
    ):
        for binding in owner.BINDINGS:
            action = binding.action.split("(")[0]  # type: ignore[union-attr]
            assert hasattr(owner, f"action_{action}"), (owner.__name__, action)


# Snapshots of fixed data ---------------------------------------------------------

NOW = 1_790_000_000.0
"""The snapshots' clock: 2026-09-21 14:13:20 UTC."""
DAEMON_PID = 4242
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
UPLOAD_URL = "http://collector.example/ingest"
PENDING_BATCH = "8c5f6e99-0d1e-4f2a-9b3c-4d5e6f708192"
DEAD_RECORD = "5f2c3b66-7d8e-4f90-a1b2-c3d4e5f60718"
"""A log line whose model output never validated: the record detail snapshot."""
DECODE_FAILURE = "6a3d4c77-7777-4071-9283-a4b5c6d7e8f9"
SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
THEMES = pytest.mark.parametrize(
    "theme", [DARK_THEME, LIGHT_THEME], ids=["dark", "light"]
)

TRIAGED = [
    # id, link, seq, state, age in seconds, severity, summary
    ("0f3a9c01-1111-4a2b-8c3d-4e5f60718293", "pump-a", 1, "uploaded", 600, "info",
     "Instruction cache parity error corrected."),
    ("1b7e4d22-2222-4b3c-9d4e-5f6071829304", "pump-a", 2, "queued", 300, "warning",
     "Fan speed below threshold on node 12."),
    ("2c9f0e33-3333-4c4d-8e5f-607182930415", "pump-b", 1, "queued", 240, "critical",
     "Power supply failure reported on rack 4."),
    ("3d0a1f44-4444-4d5e-9f60-718293041526", "pump-b", 2, "queued", 180, "error",
     "Link training failed on torus port 3."),
    ("7b4e5d88-8888-4182-a3b4-c5d6e7f80910", "pump-b", 4, "queued", 30, "debug",
     "Heartbeat from the controller."),
]  # fmt: skip
"""Records the model triaged; warning and critical sit in the pending batch."""


def _event(
    store: Store, conn: Any, record_id: str, at: float, step: str, *args: Any, **kw: Any
) -> None:
    """Add a history event dated ``at``."""
    store.clock = lambda: at
    store.add_event(conn, record_id, step, *args, **kw)


def _add_record(
    store: Store,
    conn: Any,
    record_id: str,
    link: str,
    seq: int,
    state: str,
    raw: str,
    age: float,
    **fields: Any,
) -> None:
    """Insert a record with a fixed id, received ``age`` seconds before NOW."""
    received = NOW - age
    data = fields.get("data")
    conn.execute(
        "INSERT INTO records (id, link, seq, kind, state, raw, raw_bytes, flags,"
        " received_at, updated_at, attempts, next_attempt_at, data, output, error,"
        " batch_id) VALUES (?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?, 0, ?, ?, ?, ?)",
        (
            record_id,
            link,
            seq,
            fields.get("kind", "log_event"),
            state,
            raw,
            raw.encode(),
            received,
            received + fields.get("took", 2.0),
            fields.get("attempts", 1),
            json.dumps(data) if data else None,
            fields.get("output"),
            fields.get("error"),
            fields.get("batch_id"),
        ),
    )
    _event(store, conn, record_id, received, "receive", None, "received", 0, 0.0)


def _triage(severity: str, summary: str) -> dict[str, Any]:
    return {
        "severity": severity,
        "component": "KERNEL",
        "event_type": "hardware",
        "summary": summary,
        "action_required": severity in ("error", "critical"),
    }


def _write_triaged(store: Store, conn: Any, row: tuple[Any, ...]) -> None:
    record_id, link, seq, state, age, severity, summary = row
    data = _triage(severity, summary)
    batch = PENDING_BATCH if severity in ("warning", "critical") else None
    raw = f"RAS KERNEL {summary}"
    _add_record(store, conn, record_id, link, seq, state, raw, age, data=data,
                batch_id=batch)  # fmt: skip
    detail = {
        "model": MODEL,
        "completion_tokens": 48,
        "prompt_tokens": 310,
        "finish_reason": "stop",
        "cached": False,
        "output": json.dumps(data),
    }
    _event(store, conn, record_id, NOW - age + 1.6, "infer", "received", "inferred",
           1, 1.6, detail=detail)  # fmt: skip


def _write_received(store: Store, conn: Any) -> None:
    """A record still waiting for the model."""
    _add_record(store, conn, "4e1b2a55-5555-4e6f-8071-829304152637", "pump-a", 3,
                "received", "RAS KERNEL INFO generating core.2275", 5)  # fmt: skip


def _write_decode_failure(store: Store, conn: Any) -> None:
    """A JSON-kind line that is not JSON, dead after its first decode."""
    error = (
        "line is not a JSON object: Expecting property name enclosed in double"
        " quotes: line 1 column 2 (char 1)"
    )
    _add_record(store, conn, DECODE_FAILURE, "pump-b", 3, "dead", "{pressure: 4.2",
                90, kind="json", error=f"decode: {error}", took=0.1)  # fmt: skip
    _event(store, conn, DECODE_FAILURE, NOW - 89.9, "decode", "received", "dead", 1,
           0.001, error=error)  # fmt: skip


def _write_dead_record(store: Store, conn: Any) -> None:
    """A log line whose model output never validated, after three attempts."""
    cut = '{"severity":"info","component":"KERNEL","event_type":"memory","summ'
    error = (
        "model output is not valid JSON: Unterminated string starting at:"
        " line 1 column 62 (char 61)"
    )
    raw = (
        "1117838570 2005.06.03 R02-M1-N0-C:J12-U11 RAS KERNEL INFO instruction "
        "cache parity error corrected"
    )
    _add_record(store, conn, DEAD_RECORD, "pump-a", 4, "dead", raw, 60, attempts=3,
                output=cut, error=f"validate: {error}", took=9.0)  # fmt: skip
    at = NOW - 60
    for attempt in (1, 2, 3):
        at += 2.5
        detail = {
            "model": MODEL,
            "temperature": round(0.2 * attempt, 1),
            "completion_tokens": 24,
            "finish_reason": "length",
            "cached": False,
            "output": cut,
        }
        _event(store, conn, DEAD_RECORD, at, "infer", "received", "inferred",
               attempt, 2.1, detail=detail)  # fmt: skip
        final = "dead" if attempt == 3 else "received"
        _event(store, conn, DEAD_RECORD, at + 0.1, "validate", "inferred", final,
               attempt, 0.002, error=error, detail={"output": cut})  # fmt: skip


def _write_records(store: Store, conn: Any) -> None:
    """Insert every record oldest first, as links would have delivered them."""
    writers: list[tuple[float, Callable[[], None]]] = [
        (row[4], partial(_write_triaged, store, conn, row)) for row in TRIAGED
    ]
    writers += [
        (90, partial(_write_decode_failure, store, conn)),
        (60, partial(_write_dead_record, store, conn)),
        (5, partial(_write_received, store, conn)),
    ]
    for _age, write in sorted(writers, key=lambda pair: -pair[0]):
        write()


def _write_links_and_sync(store: Store, conn: Any) -> None:
    counters = {name: _counters(link) for name, link in LIVE_LINKS.items()}
    for name, saved in counters.items():
        store.save_link_counters(conn, name, saved)
    Store.set_sync_state(
        conn,
        last_success_at=NOW - 95,
        last_error=f"POST {UPLOAD_URL} failed: HTTP 503",
        last_error_at=NOW - 40,
    )
    Store.add_sync_counts(
        conn, retries=4, rate_limit_wait_s=12.5, duplicates=1, batches=7
    )
    conn.execute(
        "INSERT INTO batches (id, created_at, attempts, last_status, last_error,"
        " delivered_at) VALUES (?, ?, 2, 503, 'HTTP 503 Service Unavailable', NULL)",
        (PENDING_BATCH, NOW - 50),
    )
    for batch_id, age, attempts in (
        ("9d6a7faa-1e2f-4a3b-8c4d-5e6f7a8b9c0d", 95, 1),
        ("ae7b8abb-2f3a-4b4c-9d5e-6f7a8b9c0d1e", 400, 3),
    ):
        conn.execute(
            "INSERT INTO batches (id, created_at, attempts, last_status, delivered_at)"
            " VALUES (?, ?, ?, 200, ?)",
            (batch_id, NOW - age - 5, attempts, NOW - age),
        )


REVIEWS = [
    # record id, state, agreement
    (TRIAGED[0][0], "done", 1.0),
    (TRIAGED[1][0], "done", 0.8),
    (TRIAGED[2][0], "done", 0.6),
    (TRIAGED[3][0], "done", 1.0),
    (TRIAGED[4][0], "pending", None),
    (DEAD_RECORD, "pending", None),
]
"""Reviewer work: four finished reviews with a mean agreement of 0.85, and two
waiting to be sent."""


def _write_reviews(store: Store) -> None:
    """Add the review tables, the reviewer's settings and ``REVIEWS``."""
    ensure_schema(store)
    settings = {
        "enabled": True,
        "base_url": "http://reviewer.example/v1",
        "model": "reviewer-large",
        "daily_budget": 2.0,
        "agreement_alert_below": 0.7,
        "agreement_window": 50,
    }
    with store.transaction() as conn:
        set_review_state(conn, settings=json.dumps(settings))
        for index, (record_id, state, agreement) in enumerate(REVIEWS):
            done = state == "done"
            conn.execute(
                "INSERT INTO reviews (record_id, reason, priority, state,"
                " requested_at, updated_at, verdicts, agreement, reviewed_at, cost)"
                " VALUES (?, 'drift_sample', 1, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record_id,
                    state,
                    NOW - 500 + index,
                    NOW - 400 + index,
                    json.dumps({"severity": "agree"}) if done else None,
                    agreement,
                    NOW - 400 + index if done else None,
                    0.01 if done else 0.0,
                ),
            )


def _counters(link: dict[str, Any]) -> dict[str, int]:
    return {key: value for key, value in link.items() if isinstance(value, int)}


LIVE_LINKS: dict[str, dict[str, Any]] = {
    "pump-a": {
        "bytes": 48213,
        "messages": 412,
        "crc_errors": 2,
        "reconnects": 1,
        "state": "connected",
        "transport": "serial",
        "protocol": "framed",
        "last_error": None,
        "paused": False,
    },
    "pump-b": {
        "bytes": 10240,
        "messages": 96,
        "auth_failures": 1,
        "reconnects": 0,
        "state": "reconnecting",
        "transport": "ble",
        "protocol": "framed",
        "last_error": "BLE device C4:7F:51:0A:12:34 disconnected",
        "paused": False,
    },
}
"""What the canned daemon's ``status`` reports per link; the counters are also
saved in the database for the read-only snapshot."""


def _canned_daemon(data_dir: Path) -> ControlServer:
    """A control server with fixed replies, standing in for the daemon."""

    def status(args: dict[str, Any]) -> dict[str, Any]:
        return {
            "links": LIVE_LINKS,
            "daemon": {
                "pid": DAEMON_PID,
                "model": MODEL,
                "upload_url": UPLOAD_URL,
                "sync_paused": False,
                "outbox_full": False,
            },
        }

    def scan(args: dict[str, Any]) -> dict[str, Any]:
        ble = []
        if float(args.get("ble_seconds", 0)) > 0:
            ble = [
                {"address": "C4:7F:51:0A:12:34", "name": "pump-b", "rssi": -58},
                {"address": "E8:31:CD:44:02:9A", "name": None, "rssi": -81},
            ]
        serial = [
            {
                "device": "/dev/ttyUSB0",
                "description": "CP2102 USB to UART",
                "vid": "10c4",
                "pid": "ea60",
                "serial_number": "0001",
            }
        ]
        return {"serial": serial, "ble": ble, "ble_error": None}

    devices = [
        {
            "device_id": "5ee5e1df9b59daa6",
            "name": "pump-a",
            "created_at": "2026-09-01T08:00:00+00:00",
        },
        {
            "device_id": "b5c14e0e92e9b42f",
            "name": "pump-b",
            "created_at": "2026-09-02T09:30:00+00:00",
        },
    ]
    return ControlServer(
        data_dir,
        {
            "ping": lambda args: {"pid": DAEMON_PID, "started_at": NOW - 3600},
            "status": status,
            "devices": lambda args: devices,
            "scan": scan,
        },
    )


@pytest.fixture
def fixed_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data directory with fixed records, shown as ``data`` in UTC.

    The path is relative to a temporary working directory, so the connection
    line shows the same path on every machine.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    data_dir = Path("data")
    data_dir.mkdir()
    store = Store(data_dir / DB_NAME)
    try:
        with store.transaction() as conn:
            _write_records(store, conn)
            _write_links_and_sync(store, conn)
        _write_reviews(store)
    finally:
        store.close()
    yield data_dir
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def fixed_daemon(fixed_dir: Path) -> Iterator[Path]:
    server = _canned_daemon(fixed_dir)
    server.start()
    yield fixed_dir
    server.stop()


def _snapshot(
    snap_compare: Any,
    data_dir: Path,
    size: tuple[int, int],
    keys: tuple[str, ...],
    screen_type: type[RelayScreen],
    theme: str = DARK_THEME,
    ready: Callable[[Any], bool] | None = None,
) -> bool:
    """Press ``keys``, wait for ``screen_type`` to draw its data, compare."""
    app = RelayApp(data_dir, clock=lambda: NOW)

    async def prepare(pilot: Pilot[Any]) -> None:
        app.theme = theme
        for key in keys:
            await pilot.press(key)
        screen = await loaded(pilot, screen_type)
        if ready is not None:
            await wait_for(pilot, lambda: ready(screen), "the screen's data")

    return snap_compare(app, terminal_size=size, run_before=prepare)


@SIZES
@THEMES
def test_snapshot_dashboard(
    snap_compare: Any, fixed_daemon: Path, size: tuple[int, int], theme: str
) -> None:
    """Dashboard, attached. A green LIVE line with pid 4242 sits under the
    screen bar, where Dashboard is highlighted. Records lists the six states,
    uploaded in the success colour and dead (2) in the error colour. Outbox
    and sync shows 4 queued with the oldest 5 min old, the last sync at
    14:11:45, sync on to the collector URL and the HTTP 503 sync error. Below
    them are the last error (validate, record 5f2c3b66), 21.8 tokens/s for
    the SmolLM2 file, and the review line "2 pending, agreement 0.85, budget
    ok". Links shows pump-a connected over serial with 2 errors
    and 1 reconnect, and pump-b reconnecting over ble with its BLE error. Long
    values end in an ellipsis at 80 columns. The footer shows n Sync now,
    12345 Screens and q Quit."""
    assert _snapshot(snap_compare, fixed_daemon, size, (), DashboardScreen, theme)


def test_snapshot_dashboard_read_only(snap_compare: Any, fixed_dir: Path) -> None:
    """Dashboard at 80x24 with no daemon. A yellow READ-ONLY line tells that
    no daemon is running and that the database is shown. "Links (last
    saved)" lists both links' counters with state and transport "-". The Sync
    row reads "no daemon running, nothing syncs", the model name comes
    from the history, and the review line is the same as when attached."""
    assert _snapshot(snap_compare, fixed_dir, (80, 24), (), DashboardScreen)


@SIZES
@THEMES
def test_snapshot_feed(
    snap_compare: Any, fixed_daemon: Path, size: tuple[int, int], theme: str
) -> None:
    """Feed. The filter line reads "l link all  s state all  v severity all
    8 of 8 shown". Eight records follow, newest first, with the cursor on the
    newest: 4e1b2a55, received, no severity, its raw line as summary. The
    critical row's severity and summary sit on an error-coloured background.
    Error is bold in the error colour, warning in the warning colour, debug
    dimmed and info plain. Both dead rows show dead in the error colour and
    their error as summary. The footer shows Inspect, lsvc Filters and space
    Pause."""
    assert _snapshot(snap_compare, fixed_daemon, size, ("2",), FeedScreen, theme)


@SIZES
@THEMES
def test_snapshot_record_detail(
    snap_compare: Any, fixed_daemon: Path, size: tuple[int, int], theme: str
) -> None:
    """Record detail of 5f2c3b66, opened with Enter on the first dead letter.
    The Record box shows the full id, the trace id as "not recorded", dead in
    the error colour with attempts 3 and kind log_event, and pump-a #4. "Why
    it failed" follows in an error-coloured border with the
    unterminated-string error, then the raw BGL line. At 120x40 the screen
    also shows "Validated JSON: none" and the history. The history has
    receive, then three infer and three validate attempts with their times,
    durations, temperatures and the validate error. The footer shows esc
    Back, r Retry and n Sync now."""
    assert _snapshot(
        snap_compare,
        fixed_daemon,
        size,
        ("5", "enter"),
        RecordScreen,
        theme,
        ready=lambda screen: screen.data[1] is not None,
    )


@SIZES
@THEMES
def test_snapshot_sync(
    snap_compare: Any, fixed_daemon: Path, size: tuple[int, int], theme: str
) -> None:
    """Sync. The Sync box shows state running with 4 queued, the last success
    at 14:11:45 with 7 batches sent, 12 s rate-limited in total with 4
    retries, 1 duplicate and 0 rejected, the HTTP 503 error and the upload
    URL. Pending batches lists 8c5f6e99 with 2 records, 2 tries, status 503
    and its error. Recent deliveries lists 9d6a7faa and ae7b8abb with status
    200. The footer shows n Sync now and p Pause/resume."""
    assert _snapshot(snap_compare, fixed_daemon, size, ("3",), SyncScreen, theme)


@SIZES
@THEMES
def test_snapshot_devices(
    snap_compare: Any, fixed_daemon: Path, size: tuple[int, int], theme: str
) -> None:
    """Devices after pressing b, in a 2x2 grid. Links has focus (a heavy
    border) and lists pump-a connected and pump-b reconnecting. Paired lists
    pump-a and pump-b with their 16-digit ids and pairing dates, which are cut
    at 80x24. Serial ports lists /dev/ttyUSB0 with 10c4:ea60. BLE lists
    C4:7F:51:0A:12:34 (pump-b, -58) above E8:31:CD:44:02:9A (-81), with
    "2 found" at its bottom edge. The footer shows c Connect, d Disconnect,
    a Pair, f Forget, b BLE scan, 12345 Screens and q Quit."""

    def scanned(screen: Any) -> bool:
        return screen.ble_devices is not None

    assert _snapshot(
        snap_compare, fixed_daemon, size, ("4", "b"), DevicesScreen, theme, scanned
    )


@SIZES
@THEMES
def test_snapshot_dead_letters(
    snap_compare: Any, fixed_daemon: Path, size: tuple[int, int], theme: str
) -> None:
    """Dead letters. "2 dead records. Enter shows why one failed." is
    above two rows, newest death first. The cursor is on 5f2c3b66 (pump-a#4,
    3 tries, validate error), and 6a3d4c77 (pump-b#3, 1 try, decode error)
    follows. Errors end in an ellipsis at the table's edge. The footer shows
    Inspect, Retry, Retry all and Sync now."""
    assert _snapshot(snap_compare, fixed_daemon, size, ("5",), DeadLettersScreen, theme)


# Review line ----------------------------------------------------------------------


def test_dashboard_reads_review_figures(fixed_dir: Path) -> None:
    review = RelaySource(fixed_dir, clock=lambda: NOW).dashboard().review
    assert review.enabled
    assert review.pending == 2
    assert review.agreement == 0.85
    assert not review.alert
    assert review.budget_state == "ok"
    assert review.pause_reason is None


def test_dashboard_review_off_without_tables(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Store(data_dir / DB_NAME).close()
    review = RelaySource(data_dir).dashboard().review
    assert not review.enabled
    assert review_text(review) == "review off"


def _review(**changes: Any) -> ReviewView:
    base = ReviewView(
        enabled=True,
        pending=3,
        agreement=0.9,
        alert=False,
        budget_state="unlimited",
        pause_reason=None,
    )
    return ReviewView(**(base.__dict__ | changes))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "3 pending, agreement 0.90, no budget cap"),
        ({"budget_state": "ok"}, "3 pending, agreement 0.90, budget ok"),
        (
            {"budget_state": "exhausted"},
            "3 pending, agreement 0.90, budget exhausted",
        ),
        (
            {"budget_state": "exhausted", "pause_reason": "daily budget spent"},
            "3 pending, agreement 0.90, paused: daily budget spent",
        ),
        ({"agreement": None}, "3 pending, agreement n/a, no budget cap"),
        (
            {"agreement": 0.4, "alert": True},
            "3 pending, agreement 0.40 LOW, no budget cap",
        ),
        ({"enabled": False}, "review off"),
    ],
)
def test_review_text_cases(changes: dict[str, Any], expected: str) -> None:
    assert review_text(_review(**changes)) == expected
