"""Property tests of the frame decoder and the endpoints over faulty links.

Hypothesis drives the byte streams and fault schedules. Every property runs
with ``deadline=None`` because crypto calls vary in time on a loaded machine,
and with a modest ``max_examples`` so the suite stays within seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import struct
from collections.abc import Callable, Iterator

import google_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import cobs, crypto, frames
from firmware_bridge.errors import FrameError
from firmware_bridge.frames import FrameDecoder, MessageType
from firmware_bridge.protocol import (
    ApplianceEndpoint,
    DeviceEndpoint,
    DeviceState,
    Message,
    ResetReason,
)

PSK = bytes(range(0x00, 0x20))
DEVICE_ID = bytes.fromhex("0011223344556677")
STREAM_ID = bytes.fromhex("8899aabbccddeeff")
BLE_NOTIFICATION = 20
"""Payload bytes of one BLE notification at the default ATT_MTU of 23."""

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=15, deadline=None)


def zeros(size: int) -> bytes:
    return bytes(size)


def new_appliance(store: dict[tuple[str, str], int] | None = None, random_source=zeros):
    numbers = {} if store is None else store
    return ApplianceEndpoint(
        lambda device_id: PSK if device_id == DEVICE_ID else None,
        lambda device_id, stream_id: numbers.get((device_id, stream_id), 0),
        random=random_source,
    )


def split_frames(wire: bytes) -> list[bytes]:
    """Split endpoint output into frames, each between two 0x00 delimiters."""
    return [b"\x00" + piece + b"\x00" for piece in wire.split(b"\x00") if piece]


def record_exchange(count: int) -> tuple[bytes, list[bytes], list[bytes]]:
    """Return a HELLO, ``count`` DATA frames and their bodies, all with fixed keys.

    Every appliance made by ``new_appliance()`` that receives the HELLO derives
    the same session keys, so it accepts the DATA frames.
    """
    device = DeviceEndpoint(DEVICE_ID, PSK, random=zeros, stream_id=STREAM_ID)
    appliance = new_appliance()
    hello = device.poll(0.0)
    appliance.receive(hello, 0.0)
    device.receive(appliance.take_output(), 0.0)
    bodies = [
        b"reading %d " % number + bytes(number * 7 % 40) for number in range(count)
    ]
    for body in bodies:
        device.submit(body)
    return hello, split_frames(device.poll(0.0)), bodies


HELLO, DATA, BODIES = record_exchange(8)


def feed_in_chunks(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list:
    """Feed ``stream`` split at the given offsets and return every decoded frame."""
    decoded = []
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        decoded += decoder.feed(stream[start:cut])
        start = cut
    return decoded


def counted(stats: frames.FrameStats) -> int:
    return (
        stats.frames + stats.crc_errors + stats.malformed_frames + stats.oversize_frames
    )


# COBS


@FAST
@given(st.binary(max_size=2000))
def test_cobs_round_trip(packet: bytes) -> None:
    encoded = cobs.encode(packet)

    assert 0 not in encoded
    assert len(encoded) <= len(packet) + len(packet) // cobs.MAX_RUN + 1
    assert cobs.decode(encoded) == packet


@FAST
@given(st.binary(min_size=1, max_size=600).map(lambda b: b.replace(b"\x00", b"\x01")))
def test_cobs_decode_is_canonical_or_rejects(body: bytes) -> None:
    """Any zero-free body either fails or re-encodes to itself.

    The one exception is a trailing 0x01 after a final 0xFF block, which the
    decoder accepts and the encoder never writes.
    """
    try:
        packet = cobs.decode(body)
    except FrameError:
        return
    encoded = cobs.encode(packet)

    assert encoded == body or encoded + b"\x01" == body


# FrameDecoder


@FAST
@given(st.binary(max_size=4000), st.lists(st.integers(0, 4000), max_size=20))
def test_decoder_never_raises_and_counts_every_run(
    data: bytes, cuts: list[int]
) -> None:
    stream = data + b"\x00"
    decoder = FrameDecoder()
    decoded = feed_in_chunks(decoder, stream, cuts)
    runs = [run for run in stream.split(b"\x00") if run]

    assert counted(decoder.stats) == len(runs)
    assert len(decoded) == decoder.stats.frames


segment = st.one_of(
    st.integers(0, len(DATA) - 1),
    st.binary(max_size=1500).map(lambda garbage: garbage + b"\x00"),
)


@FAST
@given(st.lists(segment, max_size=12), st.lists(st.integers(0, 8000), max_size=10))
def test_decoder_finds_frames_between_garbage(segments, cuts: list[int]) -> None:
    """Frames separated from garbage by a delimiter are all decoded, in order."""
    stream = b"".join(DATA[s] if isinstance(s, int) else s for s in segments)
    decoded = feed_in_chunks(FrameDecoder(), stream, cuts)
    expected = [
        frames.parse_packet(cobs.decode(DATA[s][1:-1]))
        for s in segments
        if isinstance(s, int)
    ]

    assert decoded == expected


@FAST
@given(st.binary(max_size=1500), st.lists(st.integers(0, 2000), max_size=5))
def test_decoder_resynchronises_at_next_delimiter(
    garbage: bytes, cuts: list[int]
) -> None:
    decoded = feed_in_chunks(FrameDecoder(), garbage + b"\x00" + DATA[0], cuts)

    assert [frame.seq for frame in decoded] == [0]


@FAST
@given(st.data())
def test_zero_inside_cobs_body_spares_neighbours(data: st.DataObject) -> None:
    damaged = bytearray(DATA[1])
    # Byte 0 is the leading delimiter; any later byte but the last is inside.
    damaged[data.draw(st.integers(1, len(damaged) - 2))] = 0x00
    decoder = FrameDecoder()
    decoded = decoder.feed(DATA[0] + bytes(damaged) + DATA[2])

    assert [frame.seq for frame in decoded] == [0, 2]
    assert decoder.stats.crc_errors + decoder.stats.malformed_frames >= 1


@FAST
@given(st.integers(2, len(DATA[1]) - 2))
def test_false_start_then_delimiter(length: int) -> None:
    """A frame abandoned part-way, then a 0x00, then a whole frame."""
    decoder = FrameDecoder()
    decoded = decoder.feed(DATA[0] + DATA[1][:length] + b"\x00" + DATA[2])

    assert [frame.seq for frame in decoded] == [0, 2]
    assert decoder.stats.crc_errors + decoder.stats.malformed_frames == 1


def test_ble_cut_after_leading_delimiter() -> None:
    """A frame cut to one notification, when the sender starts frames with 0x00."""
    decoder = FrameDecoder()
    cut = DATA[1][:BLE_NOTIFICATION]
    decoded = decoder.feed(DATA[0] + b"\x00" + cut + b"\x00" + DATA[2])

    assert [frame.seq for frame in decoded] == [0, 2]
    assert decoder.stats.malformed_frames + decoder.stats.crc_errors == 1


def test_ble_cut_frame_spares_next_frame() -> None:
    decoder = FrameDecoder()
    decoded = decoder.feed(DATA[0] + DATA[1][:BLE_NOTIFICATION] + DATA[2])

    assert [frame.seq for frame in decoded] == [0, 2]


def test_false_start_without_delimiter_spares_next_frame() -> None:
    decoder = FrameDecoder()
    decoded = decoder.feed(DATA[1][: len(DATA[1]) // 2] + DATA[2])

    assert [frame.seq for frame in decoded] == [2]


# ApplianceEndpoint on arbitrary streams


def forge(frame: bytes) -> bytes:
    """Change the last tag byte of a sealed frame and fix its CRC, as a forger could."""
    packet = bytearray(cobs.decode(frame[1:-1]))
    packet[-5] ^= 0x01
    packet[-4:] = struct.pack(">I", google_crc32c.value(bytes(packet[:-4])))
    return b"\x00" + cobs.encode(bytes(packet)) + b"\x00"


stream_item = st.one_of(
    st.tuples(st.just("data"), st.integers(0, len(DATA) - 1)),
    st.tuples(st.just("forged"), st.integers(0, len(DATA) - 1)),
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("hello"), st.just(0)),
)


@FAST
@given(st.lists(stream_item, max_size=25), st.lists(st.integers(0, 6000), max_size=8))
def test_appliance_delivers_only_authentic_messages(items, cuts: list[int]) -> None:
    """Any mix of genuine, forged, replayed and random frames never raises.

    Every delivered message is a genuine one, in order with no number skipped,
    and no more frames fail authentication than were forged.
    """
    appliance = new_appliance()
    appliance.receive(HELLO, 0.0)
    parts = []
    for kind, value in items:
        if kind == "data":
            parts.append(DATA[value])
        elif kind == "forged":
            parts.append(forge(DATA[value]))
        elif kind == "hello":
            parts.append(HELLO)
        else:
            parts.append(value)
    stream = b"".join(parts)
    delivered: list[Message] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        delivered += appliance.receive(stream[start:cut], 1.0)
        appliance.committed_up_to(appliance.expected)
        delivered += appliance.receive(b"", 1.0)
        start = cut

    forged = sum(1 for kind, _ in items if kind == "forged")

    assert [m.number for m in delivered] == list(range(len(delivered)))
    assert all(BODIES[m.number] == m.body for m in delivered)
    assert appliance.stats.auth_failures <= forged


# Lossy links between the two endpoints


@dataclasses.dataclass
class Faults:
    """Chances, per frame, of each fault a channel applies."""

    drop: float = 0.0
    corrupt: float = 0.0
    """Flip one bit without fixing the CRC, so the frame arrives damaged."""
    duplicate: float = 0.0
    reorder: float = 0.0
    """Hold the frame back until after the next batch of frames."""


class Channel:
    """Carries frames in one direction and applies ``Faults``."""

    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self.rng = rng
        self.faults = faults
        self.delayed: list[bytes] = []

    def carry(self, wire: bytes) -> bytes:
        late, self.delayed = self.delayed, []
        out: list[bytes] = []
        for frame in split_frames(wire):
            roll = self.rng.random
            if roll() < self.faults.drop:
                continue
            if roll() < self.faults.corrupt:
                damaged = bytearray(frame)
                damaged[self.rng.randrange(len(frame) - 1)] ^= 1 << self.rng.randrange(
                    8
                )
                frame = bytes(damaged)
            if roll() < self.faults.reorder:
                self.delayed.append(frame)
                continue
            out.append(frame)
            if roll() < self.faults.duplicate:
                out.append(frame)
        return b"".join(out + late)


class Attacker:
    """Sits before the appliance, injecting forged copies and replays of frames."""

    def __init__(self, rng: random.Random, forge_rate: float, replay_rate: float):
        self.rng = rng
        self.forge_rate = forge_rate
        self.replay_rate = replay_rate
        self.seen: list[bytes] = []
        self.forged = 0
        self.replayed = 0

    def tamper(self, wire: bytes) -> bytes:
        out: list[bytes] = []
        for frame in split_frames(wire):
            sealed = is_sealed_data(frame)
            if sealed and self.rng.random() < self.forge_rate:
                out.append(forge(frame))
                self.forged += 1
            if self.seen and self.rng.random() < self.replay_rate:
                out.append(self.rng.choice(self.seen))
                self.replayed += 1
            if sealed:
                self.seen.append(frame)
            out.append(frame)
        return b"".join(out)


def is_sealed_data(frame: bytes) -> bool:
    try:
        parsed = frames.parse_packet(cobs.decode(frame[1:-1]))
    except FrameError:
        return False
    return parsed.type == MessageType.DATA and parsed.sealed


@dataclasses.dataclass
class LinkRun:
    """Outcome of ``run_link``."""

    committed: list[tuple[str, int, bytes]]
    device: DeviceEndpoint
    appliances: list[ApplianceEndpoint]
    """Every appliance endpoint of the run; a restart adds one."""
    attacker: Attacker

    def total(self, counter: str) -> int:
        """Return a ProtocolStats counter summed over every appliance endpoint."""
        return sum(getattr(appliance.stats, counter) for appliance in self.appliances)


def run_link(
    seed: int,
    count: int,
    uplink: Faults,
    downlink: Faults,
    forge_rate: float = 0.0,
    replay_rate: float = 0.0,
    device_restart: float = 0.0,
    appliance_restart: float = 0.0,
    rekey_frames: int = 1 << 20,
    max_seconds: float = 600.0,
) -> LinkRun:
    """Send ``count`` messages from a device to an appliance over faulty channels.

    The appliance commits each batch of delivered messages to ``store`` before
    its output goes out, as the daemon does. A restarted appliance is a new
    endpoint that reads the next numbers from the same store.
    """
    rng = random.Random(seed)
    store: dict[tuple[str, str], int] = {}
    committed: list[tuple[str, int, bytes]] = []
    device = DeviceEndpoint(
        DEVICE_ID,
        PSK,
        retransmit_after=0.05,
        handshake_timeout=0.05,
        rekey_frames=rekey_frames,
        random=rng.randbytes,
    )
    appliance = new_appliance(store, rng.randbytes)
    appliances = [appliance]
    up, down = Channel(rng, uplink), Channel(rng, downlink)
    attacker = Attacker(rng, forge_rate, replay_rate)
    for number in range(count):
        device.submit(b"reading %d" % number)
    now = 0.0
    while device.acked < count and now < max_seconds:
        now += 0.01
        wire = attacker.tamper(up.carry(device.poll(now)))
        messages = appliance.receive(wire, now)
        while True:
            for message in messages:
                key = (message.device_id, message.stream_id)
                assert message.number == store.get(key, 0)
                store[key] = message.number + 1
                committed.append((message.stream_id, message.number, message.body))
            appliance.committed_up_to(appliance.expected)
            if not appliance.pending:
                break
            messages = appliance.receive(b"", now)
        device.receive(down.carry(appliance.take_output()), now)
        if rng.random() < device_restart:
            device.restart()
        if rng.random() < appliance_restart:
            appliance = new_appliance(store, rng.randbytes)
            appliances.append(appliance)
    return LinkRun(committed, device, appliances, attacker)


def assert_exactly_once(run: LinkRun, count: int) -> None:
    streams = {stream for stream, _, _ in run.committed}

    assert run.device.acked == count
    assert len(streams) == 1
    assert [number for _, number, _ in run.committed] == list(range(count))
    assert all(body == b"reading %d" % n for _, n, body in run.committed)


faults = st.builds(
    Faults,
    drop=st.floats(0, 0.2),
    corrupt=st.floats(0, 0.1),
    duplicate=st.floats(0, 0.1),
    reorder=st.floats(0, 0.1),
)


@SLOW
@given(st.integers(0, 2**32 - 1), faults, faults)
def test_lossy_link_delivers_exactly_once_in_order(seed, uplink, downlink) -> None:
    run = run_link(seed, 300, uplink, downlink, forge_rate=0.05, replay_rate=0.05)

    assert_exactly_once(run, 300)
    assert run.total("auth_failures") <= run.attacker.forged


def test_long_lossy_link_with_restarts_and_rekeys() -> None:
    """Every fault at once over 1500 messages, with re-keys every 100 frames."""
    heavy = Faults(drop=0.1, corrupt=0.05, duplicate=0.05, reorder=0.05)
    run = run_link(
        7,
        1500,
        heavy,
        heavy,
        forge_rate=0.02,
        replay_rate=0.02,
        device_restart=0.002,
        appliance_restart=0.001,
        rekey_frames=100,
    )

    assert_exactly_once(run, 1500)
    assert run.attacker.forged > 0
    assert run.total("auth_failures") > 0
    assert run.total("replayed_frames") > 0
    assert run.total("duplicate_messages") > 0
    assert run.total("handshakes") >= 15
    assert run.device.stats.handshakes >= 15
    assert len(run.appliances) > 1


def test_rekey_by_frame_count_over_lossy_link() -> None:
    run = run_link(3, 400, Faults(drop=0.05), Faults(drop=0.05), rekey_frames=50)

    # A poll checks the limit before it sends, so one session carries at most
    # 50 frames plus one send window of 32.
    assert_exactly_once(run, 400)
    assert run.device.stats.handshakes >= run.device.stats.frames_sent // (50 + 32)
    assert run.total("handshakes") == run.device.stats.handshakes


@SLOW
@given(st.integers(0, 2**32 - 1), faults)
def test_unpaired_device_is_refused(seed: int, link: Faults) -> None:
    rng = random.Random(seed)
    device = DeviceEndpoint(bytes(8), PSK, handshake_timeout=0.05, random=rng.randbytes)
    device.submit(b"reading 0")
    appliance = new_appliance(random_source=rng.randbytes)
    up, down = Channel(rng, link), Channel(rng, link)
    replies: list[bytes] = []
    now = 0.0
    for _ in range(300):
        now += 0.05
        delivered = appliance.receive(up.carry(device.poll(now)), now)
        assert delivered == []
        reply = appliance.take_output()
        replies += split_frames(reply)
        device.receive(down.carry(reply), now)

    assert not appliance.established
    assert appliance.stats.unpaired_hellos >= 1
    reset_unpaired = frames.encode_frame(
        frames.header_bytes(MessageType.RESET, 0, 0, 0, 1),
        bytes([ResetReason.UNPAIRED]),
    )
    assert set(replies) == {reset_unpaired}
    assert device.stats.handshakes == 0
    assert device.state == DeviceState.REFUSED


# Nonces across device restarts


@contextlib.contextmanager
def recorded_nonces() -> Iterator[list[tuple[bytes, bytes]]]:
    """Record the (key, nonce) pair of every AEAD seal while the block runs.

    Both endpoints create their sealers through ``crypto.Sealer``, so a
    recording subclass put in its place records every frame either side seals.
    """
    used: list[tuple[bytes, bytes]] = []
    original = crypto.Sealer

    class RecordingSealer(original):  # type: ignore[valid-type, misc]
        def __init__(self, key: bytes, direction: int, first_seq: int = 0) -> None:
            super().__init__(key, direction, first_seq)
            self.key = key

        def seal(self, seq: int, header: bytes, plaintext: bytes) -> bytes:
            used.append((self.key, crypto.nonce(self.direction, seq)))
            return super().seal(seq, header, plaintext)

    crypto.Sealer = RecordingSealer  # type: ignore[misc]
    try:
        yield used
    finally:
        crypto.Sealer = original  # type: ignore[misc]


class BootRandom:
    """A device's random source, started again from ``factory()`` at every boot."""

    def __init__(self, factory: Callable[[], Callable[[int], bytes]]) -> None:
        self.factory = factory
        self.boot()

    def boot(self) -> None:
        self.source = self.factory()

    def __call__(self, size: int) -> bytes:
        return self.source(size)


def run_reboots(
    schedule: list[str], factory: Callable[[], Callable[[int], bytes]], seed: int
) -> list[tuple[bytes, bytes]]:
    """Run a schedule of steps, submits, pings, lost replies and device reboots.

    A reboot keeps the stream and its queue and starts the device's random
    source again from ``factory()``. A factory that returns a generator with
    the same seed every time models a device whose random numbers repeat after
    every reboot. Returns every (key, nonce) pair that either side sealed with.
    """
    rng = random.Random(seed)
    appliance = new_appliance({}, rng.randbytes)
    device_random = BootRandom(factory)
    device = DeviceEndpoint(
        DEVICE_ID,
        PSK,
        retransmit_after=0.05,
        handshake_timeout=0.05,
        random=device_random,
        stream_id=STREAM_ID,
    )
    with recorded_nonces() as used:
        now = 0.0
        for action in schedule:
            now += 0.05
            if action == "submit":
                for _ in range(3):
                    device.submit(b"reading")
            elif action == "reboot":
                device_random.boot()
                device.restart()
            elif action == "ping":
                device.ping(b"ping")
            appliance.receive(device.poll(now), now)
            appliance.committed_up_to(appliance.expected)
            reply = appliance.take_output()
            if action != "lose_reply":
                device.receive(reply, now)
    return used


action = st.sampled_from(["step", "step", "submit", "reboot", "lose_reply", "ping"])


@FAST
@given(st.lists(action, min_size=3, max_size=40), st.integers(0, 2**32 - 1))
def test_no_nonce_repeats_across_reboots(schedule: list[str], seed: int) -> None:
    honest = random.Random(seed ^ 0x5A5A)
    used = run_reboots(schedule, lambda: honest.randbytes, seed)

    assert len(used) == len(set(used))


@FAST
@given(st.lists(action, min_size=3, max_size=40), st.integers(0, 2**32 - 1))
def test_no_nonce_repeats_when_device_random_repeats(schedule, seed: int) -> None:
    """A device whose generator restarts from one seed sends the same HELLO
    after every reboot. The appliance's fresh random still gives new keys."""
    used = run_reboots(schedule, lambda: random.Random(1).randbytes, seed)

    assert len(used) == len(set(used))


def test_reboots_restart_sequence_numbers_under_new_keys() -> None:
    """The scenario the nonce properties cover does occur: seq 0 under many keys."""
    schedule = ["submit", "step", "reboot", "step", "submit"] * 6
    used = run_reboots(schedule, lambda: random.Random(1).randbytes, 11)
    first_nonce = crypto.nonce(crypto.DEVICE_TO_APPLIANCE, 0)
    keys_at_seq_0 = {key for key, nonce in used if nonce == first_nonce}

    assert len(keys_at_seq_0) >= 6
    assert len(used) == len(set(used))
