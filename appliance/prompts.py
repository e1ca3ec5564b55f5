"""Chat prompts for the ``log_event`` record kind.

The system message and the worked examples are identical for every record, so
llama.cpp reuses their evaluated tokens from the previous call and only the
log line itself is evaluated per record.
"""

from __future__ import annotations

import json

from appliance.log_event import EventType, Severity

SYSTEM_PROMPT = (
    "You triage log lines from industrial and computing equipment for a field "
    "technician. Reply with one JSON object with these fields: "
    f"severity (one of {', '.join(s.value for s in Severity)}); "
    "component (the subsystem named in the line, for example KERNEL or APP); "
    f"event_type (one of {', '.join(t.value for t in EventType)}); "
    "summary (one short sentence); action_required (true or false); "
    "suggested_action (a short instruction, or an empty string). "
    "Lines logged as FATAL or SEVERE are usually critical or error; INFO lines "
    "that report a corrected condition need no action."
)

# The model leans towards the answer of the last example, so the last one is
# the most common kind of line (INFO, no action), not the rare FATAL one.
EXAMPLES: list[tuple[str, dict[str, object]]] = [
    (
        "1118536327 2005.06.11 R30-M0-N9-C:J16-U01 2005-06-11-17.18.47.314932 "
        "R30-M0-N9-C:J16-U01 RAS KERNEL FATAL data TLB error interrupt",
        {
            "severity": "critical",
            "component": "KERNEL",
            "event_type": "hardware",
            "summary": "A data TLB error interrupt stopped the node.",
            "action_required": True,
            "suggested_action": "Check the node's memory and replace the node card if it repeats.",
        },
    ),
    (
        "1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 "
        "R02-M1-N0-C:J12-U11 RAS KERNEL INFO instruction cache parity error corrected",
        {
            "severity": "info",
            "component": "KERNEL",
            "event_type": "memory",
            "summary": "An instruction cache parity error was corrected.",
            "action_required": False,
            "suggested_action": "",
        },
    ),
]


MAX_LINE_CHARS = 2000
"""Characters of a log line given to the model; a longer line is cut to this
many and marked, so that prompt and output fit the 4096-token context that
the default model's manifest allocates."""


def build_messages(line: str) -> list[dict[str, str]]:
    """Return the chat messages that ask the model to triage ``line``."""
    if len(line) > MAX_LINE_CHARS:
        line = line[:MAX_LINE_CHARS] + " [cut]"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for example_line, answer in EXAMPLES:
        messages.append({"role": "user", "content": example_line})
        messages.append(
            {"role": "assistant", "content": json.dumps(answer, separators=(",", ":"))}
        )
    messages.append({"role": "user", "content": line})
    return messages
