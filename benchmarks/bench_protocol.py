"""Benchmark the appliance's receive path of the framed device protocol.

For message bodies of 64, 256 and 1024 bytes, the script seals DATA frames in
one ``DeviceEndpoint`` session and times ``ApplianceEndpoint.receive`` over
them: COBS decoding, CRC-32C, header checks, the replay window, the
ChaCha20-Poly1305 tag check and decryption. The bytes arrive in reads of
``--read-size`` bytes, as from a serial port. Committing and sending ACKs are
not timed.

The process is pinned to one CPU where the OS allows it. Rates use the
process's CPU time (``time.process_time``), best of ``--repeats`` runs, so
other load on the machine inflates them less than wall time would.

The CPU share at the line rate assumes a UART at 3,000,000 baud with 8N1
framing, which carries 10 bits per byte and so 300,000 bytes/s, and the
measured wire size of the frames (COBS overhead and delimiter included). Run
it with ``make bench``. ``--output`` appends the results to a Markdown file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cryptography
import google_crc32c

from firmware_bridge.protocol import ApplianceEndpoint, DeviceEndpoint

BODY_SIZES = (64, 256, 1024)
LINE_BAUD = 3_000_000
BITS_PER_BYTE = 10
"""Start bit, 8 data bits and stop bit (8N1)."""
TARGET_BODY = 256
TARGET_FRAMES_PER_SECOND = 20_000
PSK = bytes(range(0x00, 0x20))
DEVICE_ID = bytes.fromhex("0011223344556677")


@dataclasses.dataclass
class Result:
    """Timing of one body size."""

    body_size: int
    frames: int
    wire_bytes: int
    cpu_seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.cpu_seconds

    @property
    def wire_bytes_per_frame(self) -> float:
        return self.wire_bytes / self.frames

    @property
    def line_frames_per_second(self) -> float:
        """Frames per second that fill the line at 3 Mbaud."""
        return LINE_BAUD / BITS_PER_BYTE / self.wire_bytes_per_frame

    @property
    def cpu_share(self) -> float:
        return self.line_frames_per_second / self.frames_per_second

    def row(self) -> str:
        body_mb = self.frames_per_second * self.body_size / 1e6
        return (
            f"| {self.body_size} | {self.wire_bytes_per_frame:.0f} | "
            f"{self.frames_per_second:,.0f} | {body_mb:.1f} | "
            f"{self.line_frames_per_second:,.0f} | {100 * self.cpu_share:.1f} % |"
        )


def fixed_random(size: int) -> bytes:
    """Random source of both endpoints: fixed, so every fresh appliance that
    receives the recorded HELLO derives the keys the frames were sealed with."""
    return b"\x5a" * size


def new_appliance() -> ApplianceEndpoint:
    return ApplianceEndpoint(
        lambda device_id: PSK, lambda device_id, stream_id: 0, random=fixed_random
    )


def record_frames(body_size: int, count: int) -> tuple[bytes, bytes]:
    """Return a HELLO and ``count`` sealed DATA frames with bodies of ``body_size``."""
    device = DeviceEndpoint(DEVICE_ID, PSK, window=count, random=fixed_random)
    appliance = new_appliance()
    hello = device.poll(0.0)
    appliance.receive(hello, 0.0)
    device.receive(appliance.take_output(), 0.0)
    body = bytes(index % 251 for index in range(body_size))
    for _ in range(count):
        device.submit(body)
    return hello, device.poll(0.0)


def time_receive(hello: bytes, stream: bytes, count: int, read_size: int) -> float:
    """Return the CPU seconds one fresh appliance takes to receive ``stream``."""
    appliance = new_appliance()
    appliance.receive(hello, 0.0)
    reads = [
        stream[start : start + read_size] for start in range(0, len(stream), read_size)
    ]
    delivered = 0
    start = time.process_time()
    for chunk in reads:
        delivered += len(appliance.receive(chunk, 1.0))
    seconds = time.process_time() - start
    if delivered != count:
        raise RuntimeError(
            f"the appliance delivered {delivered} of {count} messages, so the "
            "benchmark's frames or keys are wrong"
        )
    return seconds


def measure(body_size: int, count: int, repeats: int, read_size: int) -> Result:
    hello, stream = record_frames(body_size, count)
    best = min(time_receive(hello, stream, count, read_size) for _ in range(repeats))
    return Result(body_size, count, len(stream), best)


def pin_to_one_cpu() -> str:
    """Pin this process to the first CPU it may run on and describe the result."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this OS)"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def cpu_model() -> str:
    """Return the ``Model name`` line of lscpu, or the platform's processor."""
    try:
        output = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(
    results: list[Result], args: argparse.Namespace, pinning: str, load: float
) -> str:
    today = datetime.date.today().isoformat()
    command = "benchmarks/bench_protocol.py " + shlex.join(sys.argv[1:])
    target = next(r for r in results if r.body_size == TARGET_BODY)
    verdict = (
        "met" if target.frames_per_second >= TARGET_FRAMES_PER_SECOND else "NOT met"
    )
    lines = [
        f"## {today}: framed protocol receive path",
        "",
        f"- Command: `{command.strip()}`",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"load average {load:.1f} at start",
        f"- Software: Python {platform.python_version()}, cryptography "
        f"{cryptography.__version__}, google-crc32c with its "
        f"{google_crc32c.implementation} implementation",
        f"- Method: `ApplianceEndpoint.receive` over {args.frames:,} sealed DATA "
        f"frames per size in {args.read_size}-byte reads, {pinning}, CPU time, "
        f"best of {args.repeats}. A frame's payload is its body plus 20 bytes "
        "(message number and AEAD tag). Commits and ACKs are not timed.",
        f"- Line rate: {LINE_BAUD:,} baud at {BITS_PER_BYTE} bits per byte "
        f"(8N1) is {LINE_BAUD // BITS_PER_BYTE:,} bytes/s.",
        "",
        "| body bytes | wire bytes per frame | frames/s, one core | MB/s of bodies "
        "| frames/s at 3 Mbaud | CPU share at 3 Mbaud |",
        "| --- | --- | --- | --- | --- | --- |",
        *(result.row() for result in results),
        "",
        f"Target of {TARGET_FRAMES_PER_SECOND:,} frames/s with {TARGET_BODY}-byte "
        f"bodies: {verdict} ({target.frames_per_second:,.0f} frames/s).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--frames",
        type=int,
        default=20_000,
        help="Frames per body size (default 20000).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="Timed runs per body size, of which the fastest counts.",
    )
    parser.add_argument(
        "--read-size",
        type=int,
        default=4096,
        help="Bytes per receive call, as one serial read (default 4096).",
    )
    parser.add_argument(
        "--output", type=Path, help="Markdown file to append the results to."
    )
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    pinning = pin_to_one_cpu()
    results = [
        measure(size, args.frames, args.repeats, args.read_size) for size in BODY_SIZES
    ]
    text = report(results, args, pinning, load)
    print(text)
    if args.output is not None:
        # Sections end with a blank line, so the next one follows directly.
        with args.output.open("a", encoding="utf-8") as output:
            output.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
