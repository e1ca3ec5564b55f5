"""The files in grammars/: one JSON schema and one GBNF grammar per record kind."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.grammar import schema_to_gbnf
from appliance.log_event import SCHEMA_ID, log_event_schema
from appliance.models import PROJECT_ROOT

GRAMMAR_DIR = PROJECT_ROOT / "grammars"


def expected_files() -> dict[Path, str]:
    """Return each grammars/ file and the content the pydantic models imply."""
    schema = log_event_schema()
    return {
        GRAMMAR_DIR / f"{SCHEMA_ID}.schema.json": json.dumps(schema, indent=2) + "\n",
        GRAMMAR_DIR / f"{SCHEMA_ID}.gbnf": schema_to_gbnf(schema),
    }


def write_grammar_files() -> list[Path]:
    """Regenerate the files in grammars/ and return their paths."""
    GRAMMAR_DIR.mkdir(exist_ok=True)
    written = []
    for path, content in expected_files().items():
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
