"""Benchmark the pipeline and the model on a fixed slice of the BGL sample.

Measures, on the machine it runs on:
- model load time;
- model tokens/s with and without the log_event grammar on the same prompts,
  with 1 and 2 llama.cpp threads;
- end-to-end records/s of `appliance replay` over the first N sample lines in
  a fresh data directory (model load included), and that process's peak RSS.

Results are appended to the output file (docs/benchmarks.md) with the command,
machine and date. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.grammar import schema_to_gbnf
from appliance.inference import LlamaEngine, SamplingParams
from appliance.log_event import log_event_schema
from appliance.models import load_manifest, resolve_model_path
from appliance.prompts import build_messages
from firmware_bridge.simulator import load_sample_lines

SLICE_START = 0
"""First sample line of the fixed slice."""


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.platform()}"


def _tokens_per_second(
    engine: LlamaEngine, lines: list[str], grammar: str | None
) -> tuple[float, float]:
    """Return (generated tokens per second, mean seconds per record) over ``lines``."""
    params = SamplingParams(max_tokens=160)
    # Warm the shared prompt prefix so every measured call evaluates only its line.
    engine.complete(build_messages(lines[0]), grammar, params)
    generated = 0
    seconds = 0.0
    for line in lines:
        completion = engine.complete(build_messages(line), grammar, params)
        generated += completion.completion_tokens
        seconds += completion.duration
    return generated / seconds, seconds / len(lines)


def _pipeline(lines: list[str]) -> tuple[float, float, float]:
    """Return (records/s, wall seconds, peak RSS MiB) of `appliance replay`."""
    appliance = str(Path(sys.executable).with_name("appliance"))
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "slice.log"
        sample.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(
            [appliance, "replay", str(sample), "--data-dir", str(Path(tmp) / "d")],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - started
        peak_kib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    return len(lines) / wall, wall, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lines", type=int, default=20, help="sample lines in the slice"
    )
    parser.add_argument(
        "--output", type=Path, help="markdown file to append results to"
    )
    args = parser.parse_args()

    lines = load_sample_lines()[SLICE_START : SLICE_START + args.lines]
    model_path = resolve_model_path(None, load_manifest())
    grammar = schema_to_gbnf(log_event_schema())
    rows = []
    for threads in (1, 2):
        engine = LlamaEngine(model_path, n_ctx=2048, n_threads=threads)
        unit = "thread" if threads == 1 else "threads"
        rows.append((f"model load ({threads} {unit})", f"{engine.load_seconds:.2f} s"))
        for label, g in (("with grammar", grammar), ("without grammar", None)):
            tok_s, per_call = _tokens_per_second(engine, lines[:10], g)
            rows.append(
                (
                    f"generation, {label}, {threads} {unit}",
                    f"{tok_s:.1f} tok/s ({per_call:.2f} s per record)",
                )
            )
        engine.close()
    rate, wall, rss = _pipeline(lines)
    rows.append(
        (
            f"pipeline, replay of {len(lines)} lines",
            f"{rate:.2f} records/s ({wall:.1f} s wall, model load included)",
        )
    )
    rows.append(("pipeline peak RSS", f"{rss:.0f} MiB"))

    today = datetime.date.today().isoformat()
    report = [
        f"## {today}: `make bench`",
        "",
        f"- Command: `{' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"- Machine: {_machine()}",
        f"- Slice: sample lines {SLICE_START + 1}-{SLICE_START + len(lines)} of BGL_2k.log; "
        "generation rows use the first 10, max_tokens 160, temperature 0",
        "",
        "| measurement | result |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.output:
        if not args.output.exists():
            args.output.write_text(
                "# Benchmarks\n\nEach section is one `make bench` run.\n\n"
            )
        with args.output.open("a", encoding="utf-8") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
