"""Benchmark inference and the pipeline on a fixed slice of the BGL sample.

Measures, on the machine it runs on and in one run, over the same lines:
- a naive baseline: a fresh prompt per record (no prefix reuse) constrained by
  llama-cpp-python's stock JSON-schema grammar;
- unconstrained generation (no grammar) with llama-cpp-python's prefix reuse;
- the appliance's path: schema decoder with forced tokens and a kept prefix,
  with 1 and 2 threads;
- end-to-end records/s of `appliance replay` (model load included) and that
  process's peak RSS.

Each row gives records/s, milliseconds per output token, the share of time
spent on output constraints outside llama.cpp, and how many outputs parsed and
validated. Results are appended to the output file (docs/benchmarks.md) with
the command, machine and date. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.decoding import plan_from_schema
from appliance.errors import InvalidOutputError
from appliance.grammar import schema_to_gbnf
from appliance.grammar_check import check_grammar
from appliance.inference import LlamaEngine, OutputSpec, SamplingParams
from appliance.log_event import SCHEMA_ID, log_event_schema
from appliance.models import load_manifest, resolve_model_path
from appliance.prompts import build_messages
from appliance.workflow import parse_log_event
from firmware_bridge.simulator import load_sample_lines


@dataclasses.dataclass
class ModeResult:
    """Totals of one inference mode over the slice."""

    name: str
    records: int = 0
    valid: int = 0
    seconds: float = 0.0
    output_tokens: int = 0
    constraint_seconds: float = 0.0

    def row(self) -> str:
        per_token = 1000 * self.seconds / max(self.output_tokens, 1)
        share = 100 * self.constraint_seconds / self.seconds if self.seconds else 0.0
        return (
            f"| {self.name} | {self.records / self.seconds:.2f} | {per_token:.1f} | "
            f"{self.output_tokens / self.records:.0f} | {share:.1f} % | "
            f"{self.valid}/{self.records} |"
        )


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
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.platform()}, "
        f"load average {load:.1f} at start"
    )


def _is_valid(text: str) -> bool:
    try:
        parse_log_event(text)
    except InvalidOutputError:
        return False
    return True


def _run_mode(
    name: str, engine: LlamaEngine, lines: list[str], constraint, fresh_prompt: bool
) -> ModeResult:
    result = ModeResult(name)
    params = SamplingParams(max_tokens=320)
    for line in lines:
        if fresh_prompt:
            engine._llama.reset()
        completion = engine.complete(build_messages(line), constraint, params)
        result.records += 1
        result.valid += _is_valid(completion.text)
        result.seconds += completion.duration
        result.output_tokens += completion.completion_tokens
        result.constraint_seconds += completion.constraint_seconds
    return result


def _stock_grammar(schema: dict) -> str:
    """Return the GBNF text that llama-cpp-python's own converter makes from ``schema``."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))


def _pipeline(lines: list[str]) -> tuple[float, float, float]:
    """Return (records/s, wall seconds, peak RSS MiB) of `appliance replay`."""
    appliance = str(Path(sys.executable).with_name("appliance"))
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "slice.log"
        sample.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        started = time.perf_counter()
        subprocess.run(
            [appliance, "replay", str(sample), "--data-dir", str(Path(tmp) / "d")],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return len(lines) / wall, wall, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lines", type=int, default=30, help="sample lines in the slice"
    )
    parser.add_argument(
        "--output", type=Path, help="markdown file to append results to"
    )
    args = parser.parse_args()

    lines = load_sample_lines()[: args.lines]
    manifest = load_manifest()
    model_path = resolve_model_path(None, manifest)
    schema = log_event_schema()
    ours = OutputSpec(SCHEMA_ID, schema_to_gbnf(schema), plan_from_schema(schema))

    stock = _stock_grammar(schema)
    # A grammar llama.cpp cannot parse would crash this process in the sampler.
    check_grammar(stock, model_path)
    engine = LlamaEngine(model_path, n_ctx=manifest.context_size, n_threads=2)
    load_seconds = engine.load_seconds
    modes = [
        _run_mode(
            "naive: fresh prompt, stock grammar, 2 threads",
            engine,
            lines,
            stock,
            fresh_prompt=True,
        ),
        _run_mode(
            "unconstrained, prefix reuse, 2 threads",
            engine,
            lines,
            None,
            fresh_prompt=False,
        ),
        _run_mode(
            "schema decoder, kept prefix, 2 threads",
            engine,
            lines,
            ours,
            fresh_prompt=False,
        ),
    ]
    engine.close()
    engine = LlamaEngine(model_path, n_ctx=manifest.context_size, n_threads=1)
    modes.append(
        _run_mode(
            "schema decoder, kept prefix, 1 thread",
            engine,
            lines,
            ours,
            fresh_prompt=False,
        )
    )
    engine.close()
    rate, wall, rss = _pipeline(lines)

    report = [
        f"## {datetime.date.today().isoformat()}: `make bench`",
        "",
        f"- Command: `{' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"- Machine: {_machine()}",
        f"- Input: the first {len(lines)} lines of BGL_2k.log without their label, "
        f"temperature 0, max_tokens 320, model {model_path.name} "
        f"(load {load_seconds:.2f} s)",
        "- Times include prompt evaluation; the first record of each mode evaluates "
        "the shared prefix.",
        "",
        "| mode | records/s | ms per output token | output tokens per record "
        "| constraint share of time | valid outputs |",
        "| --- | --- | --- | --- | --- | --- |",
        *[mode.row() for mode in modes],
        "",
        f"End to end, `appliance replay` of the same {len(lines)} lines: "
        f"{rate:.2f} records/s ({wall:.1f} s wall, model load included), "
        f"peak RSS {rss:.0f} MiB.",
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.output:
        with args.output.open("a", encoding="utf-8") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
