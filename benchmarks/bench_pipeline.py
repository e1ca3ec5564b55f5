"""Benchmark inference and the pipeline on a fixed slice of the BGL sample.

Measures, on the machine it runs on and in one run, over the same lines and
for each model given with --model:
- naive: a fresh prompt per record (no prefix reuse) constrained by
  llama-cpp-python's stock JSON-schema grammar;
- unconstrained generation (no grammar) with llama-cpp-python's prefix reuse;
- gbnf: the appliance's own GBNF grammar in llama.cpp's grammar sampler, with
  prefix reuse (not run by default);
- schema: the appliance's path, the schema decoder with forced tokens and a
  kept prefix, at every thread count given with --threads;
- end-to-end records/s of `appliance replay` (model load included) and that
  process's peak RSS.

Each row gives records/s, milliseconds per output token, the share of time
spent outside llama.cpp's forward passes (from llama.cpp's own counters), the
share spent on output constraints, and how many outputs parsed and validated.
Per model and constrained mode, the report compares constraint work with the
forward pass per sampling step, and it flags the model when constraint work
takes more than half of each step. Results are appended to the output file (docs/benchmarks.md)
with the command, machine and date. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp
from machine import command_line, machine_description

from appliance.decoding import plan_from_schema
from appliance.errors import InvalidOutputError
from appliance.grammar import schema_to_gbnf
from appliance.grammar_check import check_grammar
from appliance.inference import LlamaEngine, OutputSpec, SamplingParams, load_engine
from appliance.log_event import SCHEMA_ID, log_event_schema
from appliance.models import DEFAULT_MODEL, ModelSelection, select_model
from appliance.prompts import build_messages
from appliance.workflow import parse_log_event
from firmware_bridge.simulator import load_sample_lines

MODE_NAMES = ("naive", "unconstrained", "gbnf", "schema")
DEFAULT_MODES = ("naive", "unconstrained", "schema")
DOMINANT_SHARE = 0.5
"""Share of a sampling step above which constraint work is flagged as dominant."""


@dataclasses.dataclass
class ModeResult:
    """Totals of one inference mode over the slice."""

    name: str
    kind: str
    """One of ``MODE_NAMES``."""
    records: int = 0
    valid: int = 0
    seconds: float = 0.0
    output_tokens: int = 0
    sampled_tokens: int = 0
    """Output tokens chosen by a sampling step; the rest were forced."""
    constraint_seconds: float = 0.0
    """Schema decoder only: time computing masks and choosing tokens."""
    forward_seconds: float = 0.0
    """Time in llama.cpp forward passes, from llama.cpp's performance counters."""
    decode_seconds: float = 0.0
    """The part of ``forward_seconds`` spent on single-token decode steps."""
    decode_steps: int = 0

    @property
    def outside_share(self) -> float:
        """Share of time outside llama.cpp's forward passes."""
        return max(self.seconds - self.forward_seconds, 0.0) / self.seconds

    def constraint_share(self) -> float | None:
        """Share of time spent on the output constraint, None without one.

        The schema decoder measures its own work. For llama.cpp's grammar
        sampler, the time outside forward passes is an upper bound, because it
        also contains llama-cpp-python's sampling and Python overhead.
        """
        if self.kind == "schema":
            return self.constraint_seconds / self.seconds
        if self.kind == "unconstrained":
            return None
        return self.outside_share

    def outside_ms_per_token(self) -> float:
        """Milliseconds outside forward passes per output token."""
        outside = max(self.seconds - self.forward_seconds, 0.0)
        return 1000 * outside / max(self.output_tokens, 1)

    def step_costs(self, sampling_ms: float) -> tuple[float, float]:
        """Return constraint and decode milliseconds per sampling step.

        ``sampling_ms`` is the time outside forward passes that a step costs
        without any constraint; it is subtracted for llama.cpp's grammar sampler.
        """
        if self.kind == "schema":
            constraint = 1000 * self.constraint_seconds / max(self.sampled_tokens, 1)
        else:
            constraint = max(self.outside_ms_per_token() - sampling_ms, 0.0)
        decode = 1000 * self.decode_seconds / max(self.decode_steps, 1)
        return constraint, decode

    def row(self) -> str:
        per_token = 1000 * self.seconds / max(self.output_tokens, 1)
        share = self.constraint_share()
        if share is None:
            constraint = "none"
        elif self.kind == "schema":
            constraint = f"{100 * share:.1f} %"
        else:
            constraint = f"≤ {100 * share:.1f} %"
        return (
            f"| {self.name} | {self.records / self.seconds:.2f} | {per_token:.1f} | "
            f"{self.output_tokens / self.records:.0f} | "
            f"{100 * self.outside_share:.1f} % | {constraint} | "
            f"{self.valid}/{self.records} |"
        )


@dataclasses.dataclass
class ModelRun:
    """Every measurement of one model."""

    selection: ModelSelection
    load_seconds: float
    vocabulary_size: int
    vocabulary_seconds: float
    modes: list[ModeResult]
    pipeline: tuple[float, float, float] | None
    """(records/s, wall seconds, peak RSS MiB) of `appliance replay`, if run."""


def _is_valid(text: str) -> bool:
    try:
        parse_log_event(text)
    except InvalidOutputError:
        return False
    return True


def _run_mode(
    name: str,
    kind: str,
    engine: LlamaEngine,
    lines: list[str],
    constraint: OutputSpec | str | None,
) -> ModeResult:
    result = ModeResult(name, kind)
    params = SamplingParams(max_tokens=320)
    context = engine._llama._ctx.ctx
    llama_cpp.llama_perf_context_reset(context)
    for line in lines:
        if kind == "naive":
            engine._llama.reset()
        completion = engine.complete(build_messages(line), constraint, params)
        result.records += 1
        result.valid += _is_valid(completion.text)
        result.seconds += completion.duration
        result.output_tokens += completion.completion_tokens
        result.sampled_tokens += completion.completion_tokens - completion.forced_tokens
        result.constraint_seconds += completion.constraint_seconds
    counters = llama_cpp.llama_perf_context(context)
    result.forward_seconds = (counters.t_p_eval_ms + counters.t_eval_ms) / 1000
    result.decode_seconds = counters.t_eval_ms / 1000
    result.decode_steps = counters.n_eval
    return result


def _stock_grammar(schema: dict[str, Any]) -> str:
    """Return the GBNF text that llama-cpp-python's own converter makes from ``schema``."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))


def _pipeline(lines: list[str], model: str, threads: int) -> tuple[float, float, float]:
    """Return (records/s, wall seconds, peak RSS MiB) of `appliance replay`.

    Raises:
        subprocess.CalledProcessError: the replay failed; its stderr is attached.
    """
    appliance = str(Path(sys.executable).with_name("appliance"))
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "slice.log"
        sample.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        command = [
            appliance,
            "replay",
            str(sample),
            "--data-dir",
            str(Path(tmp) / "d"),
            "--model",
            model,
            "--threads",
            str(threads),
        ]
        with open(Path(tmp) / "stderr.log", "w+b") as stderr:
            started = time.perf_counter()
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr
            )
            # wait4 reports this child's own peak RSS. getrusage(RUSAGE_CHILDREN)
            # would give the largest of every child so far, such as an earlier
            # model's replay.
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                stderr.seek(0)
                raise subprocess.CalledProcessError(
                    process.returncode, command, stderr=stderr.read()
                )
    return len(lines) / wall, wall, usage.ru_maxrss / 1024


def _measure_model(
    name: str, lines: list[str], modes: list[str], threads: list[int], pipeline: bool
) -> ModelRun:
    selection = select_model(name)
    schema = log_event_schema()
    gbnf = schema_to_gbnf(schema)
    constraints: dict[str, OutputSpec | str | None] = {
        "naive": _stock_grammar(schema),
        "unconstrained": None,
        "gbnf": gbnf,
        "schema": OutputSpec(SCHEMA_ID, gbnf, plan_from_schema(schema)),
    }
    # A grammar llama.cpp cannot parse would crash this process in the sampler.
    for kind in ("naive", "gbnf"):
        if kind in modes:
            check_grammar(str(constraints[kind]), selection.path)

    results: list[ModeResult] = []
    run: ModelRun | None = None
    for index, count in enumerate(threads):
        engine = load_engine(selection, count)
        if run is None:
            run = ModelRun(
                selection,
                engine.load_seconds,
                engine.vocabulary_size,
                engine.vocabulary_seconds,
                results,
                None,
            )
        # Every mode runs at the first thread count; the others add schema rows.
        kinds = modes if index == 0 else [m for m in modes if m == "schema"]
        unit = "thread" if count == 1 else "threads"
        for kind in kinds:
            label = _mode_label(kind)
            results.append(
                _run_mode(
                    f"{label}, {count} {unit}", kind, engine, lines, constraints[kind]
                )
            )
        engine.close()
    assert run is not None
    if pipeline:
        run.pipeline = _pipeline(lines, name, threads[-1])
    return run


def _mode_label(kind: str) -> str:
    return {
        "naive": "naive: fresh prompt, stock grammar",
        "unconstrained": "unconstrained, prefix reuse",
        "gbnf": "appliance GBNF grammar, prefix reuse",
        "schema": "schema decoder, kept prefix",
    }[kind]


def _verdict(run: ModelRun) -> list[str]:
    """Return Markdown lines comparing constraint work with the forward pass per step."""
    # Without an unconstrained row, llama.cpp's grammar sampler is charged with
    # all time outside forward passes, an upper bound.
    reference = [mode for mode in run.modes if mode.kind == "unconstrained"]
    sampling_ms = reference[0].outside_ms_per_token() if reference else 0.0
    name = run.selection.manifest.name if not run.selection.by_path else "the model"
    lines = [
        f"Per sampling step of {name} (vocabulary {run.vocabulary_size:,} tokens):",
        "",
    ]
    dominant = []
    for mode in run.modes:
        if mode.constraint_share() is None:
            continue
        constraint_ms, decode_ms = mode.step_costs(sampling_ms)
        share = constraint_ms / (constraint_ms + decode_ms) if decode_ms else 0.0
        bound = "" if mode.kind == "schema" or reference else "≤ "
        lines.append(
            f"- {mode.name}: {bound}{constraint_ms:.1f} ms of constraint work "
            f"against {decode_ms:.1f} ms of forward pass ({bound}{100 * share:.0f} %)"
        )
        if share > DOMINANT_SHARE:
            dominant.append(mode.name)

    lines.append("")
    if reference:
        lines.append(
            f"Grammar-sampler figures are net of the {sampling_ms:.1f} ms per token "
            "that unconstrained sampling spends outside forward passes."
        )
    if dominant:
        lines.append(
            f"Verdict: **constraint work dominates** in {', '.join(dominant)}."
        )
    else:
        lines.append("Verdict: constraint work does not dominate in any mode.")
    return lines


def _report(runs: list[ModelRun], lines: list[str]) -> str:
    names = ", ".join(run.selection.manifest.name for run in runs)
    report = [
        f"## {datetime.date.today().isoformat()}: pipeline benchmark, {names}",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {machine_description()}",
        f"- Input: the first {len(lines)} lines of BGL_2k.log without their label, "
        "temperature 0, max_tokens 320.",
        "- Times include prompt evaluation; the first record of each mode evaluates "
        "the shared prefix. Time outside forward passes comes from llama.cpp's "
        "performance counters; for llama.cpp's grammar sampler it bounds the "
        "constraint share from above.",
    ]
    for run in runs:
        report += [
            "",
            f"### {run.selection.manifest.name}",
            "",
            f"Model file {run.selection.path.name}, loaded in "
            f"{run.load_seconds:.2f} s, of which {run.vocabulary_seconds:.2f} s "
            f"built the schema decoder's table of {run.vocabulary_size:,} tokens.",
            "",
            "| mode | records/s | ms per output token | output tokens per record "
            "| time outside forward passes | constraint share of time "
            "| valid outputs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[mode.row() for mode in run.modes],
            "",
            *_verdict(run),
        ]
        if run.pipeline is not None:
            rate, wall, rss = run.pipeline
            report += [
                "",
                f"End to end, `appliance replay` of the same {len(lines)} lines: "
                f"{rate:.2f} records/s ({wall:.1f} s wall, model load included), "
                f"peak RSS {rss:.0f} MiB.",
            ]
    report.append("")
    return "\n".join(report)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lines", type=int, default=30, help="sample lines in the slice"
    )
    parser.add_argument(
        "--output", type=Path, help="markdown file to append results to"
    )
    parser.add_argument(
        "--model",
        action="append",
        help=f"model manifest name; repeat for several [default: {DEFAULT_MODEL}]",
    )
    parser.add_argument(
        "--threads",
        type=int,
        action="append",
        help="llama.cpp threads; every mode runs at the first value, and the "
        "schema decoder also at each further value [default: 2, then 1]",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated modes out of {', '.join(MODE_NAMES)} "
        "[default: %(default)s]",
    )
    parser.add_argument(
        "--no-pipeline",
        action="store_true",
        help="skip the end-to-end `appliance replay` run",
    )
    args = parser.parse_args()
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(args.modes) - set(MODE_NAMES))
    if unknown or not args.modes:
        parser.error(f"--modes: unknown modes {unknown!r}; choose from {MODE_NAMES}")
    return args


def main() -> None:
    args = _parse_args()
    lines = load_sample_lines()[: args.lines]
    runs = [
        _measure_model(
            name,
            lines,
            [mode for mode in MODE_NAMES if mode in args.modes],
            args.threads or [2, 1],
            pipeline=not args.no_pipeline,
        )
        for name in args.model or [DEFAULT_MODEL]
    ]
    text = _report(runs, lines)
    print(text)
    if args.output:
        with args.output.open("a", encoding="utf-8") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
