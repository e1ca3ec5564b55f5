"""The ``log_event`` record: what the model makes of one equipment log line.

The JSON schema in grammars/log_event.schema.json is generated from
``LogEvent``; a test fails when the file and the model drift apart.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Severity(enum.StrEnum):
    """Urgency of the event for a technician, independent of the logged level."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class EventType(enum.StrEnum):
    """Broad class of the event, for routing and counting."""

    HARDWARE = "hardware"
    MEMORY = "memory"
    STORAGE = "storage"
    NETWORK = "network"
    KERNEL = "kernel"
    APPLICATION = "application"
    JOB = "job"
    SECURITY = "security"
    CONFIGURATION = "configuration"
    STATUS = "status"
    OTHER = "other"


class LogEvent(BaseModel):
    """Triage of one equipment log line."""

    model_config = ConfigDict(extra="forbid", title="log_event")

    severity: Severity = Field(description="Urgency for a technician.")
    component: str = Field(
        min_length=1,
        max_length=32,
        description="Subsystem that logged the line, for example KERNEL or APP.",
    )
    event_type: EventType = Field(description="Broad class of the event.")
    summary: str = Field(
        min_length=1, max_length=120, description="One plain sentence on what happened."
    )
    action_required: bool = Field(description="Whether a technician must act.")
    suggested_action: str = Field(
        max_length=120, description="What to do next; empty when nothing is needed."
    )

    @field_validator("component", "summary", "suggested_action")
    @classmethod
    def _reject_control_characters(cls, value: str) -> str:
        bad = [ch for ch in value if ord(ch) < 0x20 or ord(ch) == 0x7F]
        if bad:
            raise ValueError(f"control character {bad[0]!r} is not allowed")
        return value


SCHEMA_ID = "log_event"
"""Identifier of this record kind in grammars/ and in traces."""


def log_event_schema() -> dict:
    """Return the JSON schema that grammars/log_event.schema.json must hold."""
    schema = LogEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://field-relay.invalid/schemas/log_event.schema.json"
    return schema
