"""The `appliance pair`, `unpair`, `devices`, `export-key` and `simulate` commands.

Each command calls the pairing store or the device simulator and turns their
errors into one ``error:`` line on stderr with exit code 1.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from appliance.errors import ApplianceError
from appliance.paths import default_data_dir, prepare_data_dir
from firmware_bridge.device_simulator import (
    FaultOptions,
    FramedDeviceSimulator,
    sample_messages,
)
from firmware_bridge.errors import BridgeError
from firmware_bridge.frames import MAX_BODY
from firmware_bridge.pairing import (
    STORE_DIR_NAME,
    DeviceKey,
    PairingStore,
    load_export,
    parse_device_id,
)

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals after which `simulate` stops cleanly and exits with 128 + the signal
number (130, 143, 129), as shells report a process that the signal ended."""


def _data_dir_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=default_data_dir,
        show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
        help="Data directory; paired device keys are kept in its devices/ folder.",
    )(func)


def _fail(message: object) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def pairing_store(data_dir: Path) -> PairingStore:
    """Return the pairing store of the appliance that uses ``data_dir``."""
    return PairingStore(data_dir / STORE_DIR_NAME)


@click.command("pair")
@_data_dir_option
@click.argument("name")
@click.option(
    "--export",
    "export_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the new key to this file (mode 0600) for the device.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Give an already paired NAME a new id and key; its old key stops working.",
)
@click.option("--force", is_flag=True, help="Overwrite the --export file if it exists.")
def pair_command(
    data_dir: Path, name: str, export_path: Path | None, replace: bool, force: bool
) -> None:
    """Pair a new device called NAME: create its random id and key and store them."""
    if export_path is not None and not force and os.path.lexists(export_path):
        _fail(
            f"export file {str(export_path)!r} already exists, so nothing was "
            "paired; pass --force to overwrite it, or choose another file"
        )
    store = pairing_store(data_dir)
    try:
        prepare_data_dir(data_dir)
        key = store.pair(name, replace=replace)
    except (ApplianceError, BridgeError) as exc:
        _fail(exc)
    click.echo(
        f"paired {key.name!r} as device {key.device_id_hex}; key file "
        f"{store.key_path(key.device_id)}"
    )
    if export_path is not None:
        try:
            store.export(key.device_id, export_path, overwrite=force)
        except BridgeError as exc:
            _fail(
                f"{exc}; the device is paired, so export its key with "
                f"`appliance export-key {key.device_id_hex} FILE`"
            )
        click.echo(
            f"exported the key to {export_path}; load it on the device, or run "
            f"`appliance simulate --key {export_path} --port PATH`"
        )


@click.command("unpair")
@_data_dir_option
@click.argument("device")
def unpair_command(data_dir: Path, device: str) -> None:
    """Forget the device with id or name DEVICE, so its key is rejected from now on.

    Given an id, it also removes a key file that is damaged.
    """
    store = pairing_store(data_dir)
    device_id = parse_device_id(device)
    key: DeviceKey | None
    try:
        if device_id is None:
            key = store.forget(device)
        else:
            key = store.remove_key_file(device_id)
    except BridgeError as exc:
        _fail(exc)
    if key is not None:
        click.echo(f"unpaired {key.name!r} (device {key.device_id_hex})")
    elif device_id is not None:
        click.echo(
            f"removed the unusable key file {store.key_path(device_id)}; device "
            f"{device_id.hex()} is no longer paired"
        )


@click.command("export-key")
@_data_dir_option
@click.argument("device")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def export_key_command(data_dir: Path, device: str, file: Path, force: bool) -> None:
    """Write the key of the device with id or name DEVICE to FILE (mode 0600).

    An existing FILE is kept unless --force is given.
    """
    try:
        key = pairing_store(data_dir).export(device, file, overwrite=force)
    except BridgeError as exc:
        _fail(exc)
    click.echo(f"exported the key of {key.name!r} ({key.device_id_hex}) to {file}")


@click.command("devices")
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@click.option(
    "--strict",
    is_flag=True,
    help="Exit with code 1 if any key file is unusable; by default they are "
    "reported on stderr and the exit code is 0.",
)
def devices_command(data_dir: Path, as_json: bool, strict: bool) -> None:
    """List paired devices, oldest first, without their keys.

    Each unusable key file gets one warning line on stderr with the fix.
    """
    store = pairing_store(data_dir)
    try:
        keys, unusable = store.scan()
    except BridgeError as exc:
        _fail(exc)
    for problem in unusable:
        click.echo(f"warning: {problem.error}", err=True)

    if as_json:
        rows = [_device_json(store, key) for key in keys]
        click.echo(json.dumps(rows, ensure_ascii=False))
    else:
        _print_device_table(store, keys, unusable_count=len(unusable))

    if strict and unusable:
        sys.exit(1)


def _print_device_table(
    store: PairingStore, keys: list[DeviceKey], unusable_count: int
) -> None:
    if not keys and unusable_count:
        click.echo(
            f"no usable paired devices in {store.directory}; fix or remove the "
            f"{unusable_count} key file(s) named above"
        )
        return
    if not keys:
        click.echo(
            f"no paired devices in {store.directory}; pair one with "
            "`appliance pair NAME`"
        )
        return
    click.echo(f"{'device id':<16}  {'paired at (UTC)':<19}  name")
    for key in keys:
        paired_at = key.created_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{key.device_id_hex:<16}  {paired_at:<19}  {key.name}")


def _device_json(store: PairingStore, key: DeviceKey) -> dict[str, str]:
    return {
        "device_id": key.device_id_hex,
        "name": key.name,
        "created_at": key.created_at.isoformat(),
        "key_file": str(store.key_path(key.device_id)),
    }


def _probability(name: str, event: str) -> Callable[..., Any]:
    return click.option(
        f"--{name}",
        type=click.FloatRange(0.0, 1.0),
        default=0.0,
        show_default=True,
        help=f"Probability per frame that {event}.",
    )


def _fault_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        _probability("drop", "the frame is not written"),
        _probability("corrupt", "one bit of the frame is flipped"),
        _probability("duplicate", "the frame is written twice"),
        _probability("reorder", "the frame is written after the next one"),
        click.option(
            "--delay",
            type=click.FloatRange(min=0.0),
            default=0.0,
            show_default=True,
            help="Maximum seconds each frame is delayed; frames keep their order.",
        ),
        click.option(
            "--split-writes",
            is_flag=True,
            help="Write each frame in up to four pieces cut at random bytes.",
        ),
        _probability("garbage", "random bytes and a 0x00 are written before it"),
        click.option(
            "--reset-every",
            type=click.IntRange(min=1),
            help="Restart the device after every N acknowledged messages, "
            "keeping its unacknowledged messages.",
        ),
        click.option(
            "--disconnect-every",
            type=click.IntRange(min=1),
            help="Close the port after every N acknowledged messages.",
        ),
        click.option(
            "--disconnect-seconds",
            type=click.FloatRange(min=0.0),
            default=1.0,
            show_default=True,
            help="Seconds the port stays closed after each disconnect.",
        ),
        click.option(
            "--seed",
            type=int,
            help="Seed of the fault generator; the same seed draws the same faults.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("simulate")
@click.option(
    "--port",
    required=True,
    help="Where the device is: a path at which to publish a pty symlink, a "
    "serial device, or a pyserial URL (socket://HOST:PORT).",
)
@click.option(
    "--key",
    "key_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Key file written by `appliance pair NAME --export FILE`.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Messages to send, repeating the lines as needed; default: each line once.",
)
@click.option(
    "--lines",
    "lines_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="UTF-8 text file with one message per line; default: the bundled BGL sample.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Messages per second; 0 sends as fast as the appliance acknowledges.",
)
@click.option(
    "--baud",
    type=click.IntRange(min=50),
    default=115200,
    show_default=True,
    help="Line speed in bit/s of a serial device; ptys ignore it.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.0, min_open=True),
    help="Seconds to wait for every message to be acknowledged before failing; "
    "default: wait until stopped.",
)
@_fault_options
@click.option("-v", "--verbose", is_flag=True, help="Log every state change.")
def simulate_command(
    port: str,
    key_file: Path,
    count: int | None,
    lines_file: Path | None,
    rate: float,
    baud: int,
    timeout: float | None,
    verbose: bool,
    **faults: Any,
) -> None:
    """Run a simulated device that sends messages over the framed protocol.

    It exits 0 once the appliance has acknowledged every message, and 130, 143
    or 129 after SIGINT, SIGTERM or SIGHUP, once the pty symlink is removed.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # The handlers are in place before the port opens, so a signal at any
    # point after the symlink exists still reaches simulator.stop().
    with _record_stop_signals() as stop_request:
        try:
            key = load_export(key_file)
            messages = _messages(lines_file, count)
            simulator = FramedDeviceSimulator(
                key, port, messages, FaultOptions(**faults), rate=rate, baudrate=baud
            )
            simulator.start()
        except BridgeError as exc:
            _fail(exc)
        click.echo(
            f"device {key.name!r} ({key.device_id_hex}) is on {simulator.port_path}",
            err=True,
        )
        started = time.monotonic()
        try:
            outcome = _wait(simulator, timeout, stop_request)
        finally:
            simulator.stop()
    click.echo(_summary(simulator, time.monotonic() - started))
    if outcome == "signal" and stop_request.signum is not None:
        sys.exit(128 + stop_request.signum)
    if outcome != "finished":
        _fail(outcome)


class _StopRequest:
    """The first stop signal that arrived, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextlib.contextmanager
def _record_stop_signals() -> Iterator[_StopRequest]:
    """Record the first of ``STOP_SIGNALS`` instead of ending the process.

    The handler restores the previous disposition of its signal, so a second
    SIGINT raises KeyboardInterrupt and a second SIGTERM or SIGHUP ends the
    process at once, without cleanup. A signal that was ignored (as nohup
    ignores SIGHUP) stays ignored. The handlers are restored on exit.
    """
    request = _StopRequest()
    previous: dict[int, Any] = {}

    def record(signum: int, frame: FrameType | None) -> None:
        if request.signum is None:
            request.signum = signum
        signal.signal(signum, previous[signum])

    for stop_signal in STOP_SIGNALS:
        handler = signal.getsignal(stop_signal)
        if handler is signal.SIG_IGN:
            continue
        previous[stop_signal] = signal.SIG_DFL if handler is None else handler
        signal.signal(stop_signal, record)
    try:
        yield request
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)


def _wait(
    simulator: FramedDeviceSimulator, timeout: float | None, stop_request: _StopRequest
) -> str:
    """Wait until the run ends and return "finished", "signal" or the failure."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not simulator.finished.wait(0.2):
        if stop_request.signum is not None:
            logger.info(
                "device %s: stopping on %s",
                simulator.key.device_id_hex,
                signal.Signals(stop_request.signum).name,
            )
            return "signal"
        if simulator.stopped.is_set():
            return f"the simulator stopped: {simulator.error}"
        if deadline is not None and time.monotonic() >= deadline:
            return (
                f"{simulator.sent - simulator.acked} of {simulator.sent} messages "
                f"not acknowledged after the --timeout of {timeout:g} s; check "
                "that the appliance reads the port and has paired the device"
            )
    return "finished"


def _summary(simulator: FramedDeviceSimulator, seconds: float) -> str:
    stats = simulator.stats
    device = simulator.endpoint.stats
    return (
        f"acknowledged {simulator.acked} of {simulator.sent} messages in "
        f"{seconds:.1f} s; frames {stats.frames}, retransmissions "
        f"{device.retransmissions}, dropped {stats.frames_dropped}, corrupted "
        f"{stats.frames_corrupted}, duplicated {stats.frames_duplicated}, "
        f"reordered {stats.frames_reordered}, garbage {stats.garbage_insertions}, "
        f"resets {stats.resets}, disconnects {stats.disconnects}"
    )


def _messages(lines_file: Path | None, count: int | None) -> Iterable[bytes]:
    """Return the message bodies: the lines of ``lines_file`` or the sample."""
    if lines_file is None:
        bodies = list(sample_messages())
    else:
        bodies = _read_lines(lines_file)
    if count is None:
        return bodies
    return itertools.islice(itertools.cycle(bodies), count)


def _read_lines(path: Path) -> list[bytes]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(
            f"cannot read {str(path)!r} as UTF-8 text: {exc}", param_hint="--lines"
        ) from exc
    bodies = []
    for number, line in enumerate(text.splitlines(), start=1):
        body = line.encode("utf-8")
        if len(body) > MAX_BODY:
            raise click.BadParameter(
                f"line {number} of {str(path)!r} is {len(body)} bytes, but a "
                f"message body is at most {MAX_BODY} bytes; shorten or split it",
                param_hint="--lines",
            )
        if body:
            bodies.append(body)
    if not bodies:
        raise click.BadParameter(
            f"{str(path)!r} contains no message lines", param_hint="--lines"
        )
    return bodies


DEVICE_COMMANDS = [
    pair_command,
    unpair_command,
    export_key_command,
    devices_command,
    simulate_command,
]
"""The commands this module adds to the `appliance` group."""
