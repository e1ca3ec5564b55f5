"""The appliance's TOML configuration, validated with pydantic.

One file configures a headless appliance: its links, model, sink, limits and
telemetry. Every model forbids unknown keys, so a misspelt key is an error that
names it instead of a setting silently ignored. Environment variables override
single keys: ``FIELD_RELAY__SYNC__URL=...`` sets ``[sync] url``; list entries
are addressed by index, ``FIELD_RELAY__LINKS__0__BAUD=9600``. Values from the
environment are parsed as TOML values when they parse (numbers, booleans,
quoted strings) and taken as plain strings otherwise.

docs/configuration.md lists every key with its default; it is generated from
these models (``appliance config docs``), so the two cannot drift.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "FIELD_RELAY__"
NUS_SERVICE = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"
NUS_TX = "6e400003-b5a3-f393-e0a9-e50e24dcca9e"
NUS_RX = "6e400002-b5a3-f393-e0a9-e50e24dcca9e"
SECRET_KEYS = frozenset({"headers"})
"""Keys whose values ``config show`` masks (the token itself lives in a file)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Transport(enum.StrEnum):
    SERIAL = "serial"
    BLE = "ble"


class Protocol(enum.StrEnum):
    FRAMED = "framed"
    """COBS frames, sealed and acknowledged (docs/protocol.md)."""
    LINES = "lines"
    """Plain text lines from legacy devices, unauthenticated."""


class UsbMatch(_Section):
    """A USB serial adapter found by identity, whatever its device name."""

    vid: Annotated[int, Field(ge=0, le=0xFFFF, description="USB vendor id.")]
    pid: Annotated[int, Field(ge=0, le=0xFFFF, description="USB product id.")]
    serial_number: str | None = Field(
        None, description="The adapter's serial number, to tell identical ones apart."
    )


class BleMatch(_Section):
    """A BLE device found by address, name or advertised service."""

    address: str | None = Field(
        None, description="Bluetooth address AA:BB:CC:DD:EE:FF."
    )
    name: str | None = Field(None, description="Advertised local name.")
    service_uuid: str = Field(NUS_SERVICE, description="Service to scan for and use.")
    tx_uuid: str = Field(NUS_TX, description="Characteristic the device notifies on.")
    rx_uuid: str = Field(NUS_RX, description="Characteristic the appliance writes to.")
    adapter: str | None = Field(None, description="Adapter name, e.g. hci0.")
    scan_timeout: float = Field(10.0, gt=0, le=300, description="Seconds per scan.")


class LinkConfig(_Section):
    """One device link."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Name stored on records; letters, digits, '_', '.', '-'.",
    )
    transport: Transport = Field(Transport.SERIAL, description="serial or ble.")
    protocol: Protocol = Field(
        Protocol.FRAMED,
        description="framed (sealed, acknowledged) or lines (legacy text); never guessed.",
    )
    kind: Literal["log_event", "json"] = Field(
        "log_event",
        description="What each message holds: log_event (free text the model "
        "triages) or json (an object that is validated, not inferred).",
    )
    port: str | None = Field(None, description="Serial port path or pyserial URL.")
    usb: UsbMatch | None = Field(
        None, description="Find the serial adapter by USB identity instead of path."
    )
    ble: BleMatch | None = Field(None, description="The BLE device (transport ble).")
    baud: int = Field(115200, ge=50, le=12_000_000, description="Line speed in bit/s.")
    rtscts: bool = Field(False, description="RTS/CTS hardware flow control.")
    ring_bytes: int = Field(
        65536, ge=64, le=64 * 2**20, description="Ring buffer size in bytes."
    )
    overflow: Literal["block", "drop_oldest"] = Field(
        "block", description="When the ring is full: block the reader or drop oldest."
    )
    line_ending: Literal["auto", "lf", "cr", "crlf"] = Field(
        "auto", description="Line mode only: bytes that end a line."
    )
    max_line_bytes: int = Field(
        4096, ge=16, le=2**20, description="Line mode only: bytes kept per line."
    )
    line_timeout: float = Field(
        10.0, gt=0, le=3600, description="Line mode only: seconds a partial line waits."
    )

    @model_validator(mode="after")
    def _check_target(self) -> LinkConfig:
        if self.transport == Transport.SERIAL:
            if (self.port is None) == (self.usb is None):
                raise ValueError(
                    f"link {self.name!r} needs exactly one of port and usb"
                )
            if self.ble is not None:
                raise ValueError(f"link {self.name!r} is serial but has a [ble] table")
        elif self.ble is None:
            raise ValueError(
                f"link {self.name!r} uses transport ble but has no ble table"
            )
        return self


class ModelConfig(_Section):
    name: str | None = Field(
        None, description="Model manifest name or GGUF path; empty uses the default."
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="llama.cpp threads; empty uses the manifest's."
    )


class SyncConfig(_Section):
    sink: Literal["http", "mqtt"] = Field(
        "http", description="Where records go: the HTTP sink (url) or MQTT ([mqtt])."
    )
    url: str | None = Field(None, description="HTTP sink URL; empty disables upload.")
    token_file: Path | None = Field(
        None, description="File holding the bearer token (mode 0600)."
    )
    ca_bundle: Path | None = Field(None, description="CA bundle for TLS verification.")
    batch_records: int = Field(1000, ge=1, le=100_000, description="Records per batch.")
    batch_bytes: int = Field(
        1_000_000, ge=1024, le=100 * 2**20, description="Uncompressed bytes per batch."
    )
    gzip: bool = Field(True, description="Compress request bodies.")
    timeout: float = Field(30.0, gt=0, le=600, description="Seconds per request.")
    max_backoff: float = Field(
        300.0, gt=0, le=86_400, description="Cap on the delay between retries, seconds."
    )
    requests_per_minute: int = Field(
        0, ge=0, le=1_000_000, description="Requests allowed per minute; 0: no limit."
    )
    bytes_per_minute: int = Field(
        0,
        ge=0,
        le=10 * 2**30,
        description="Compressed bytes sent per minute; 0: no limit.",
    )


class MqttConfig(_Section):
    host: str | None = Field(None, description="Broker host; empty disables MQTT.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 for TLS).")
    tls: bool = Field(False, description="Connect with TLS, verifying the broker.")
    ca_bundle: Path | None = Field(None, description="CA bundle for the broker's TLS.")
    username: str | None = Field(
        None, description="User name, if the broker needs one."
    )
    password_file: Path | None = Field(
        None, description="File holding the password (mode 0600)."
    )
    client_id: str = Field(
        "field-relay", min_length=1, max_length=64, description="MQTT client id."
    )
    topic: str = Field(
        "field-relay/{device_id}/records",
        description="Topic template; {device_id} is the device or link, {link} the link.",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="MQTT version; auto tries 5, then 3.1.1."
    )
    keepalive: int = Field(30, ge=5, le=3600, description="Keep-alive seconds.")
    max_inflight: int = Field(
        100, ge=1, le=65535, description="Messages published and not yet acknowledged."
    )


class OutboxConfig(_Section):
    quota_bytes: int = Field(
        0,
        ge=0,
        le=2**44,
        description="Database bytes at which uploaded records are pruned early and, "
        "if that is not enough, intake pauses; 0: no quota.",
    )
    retain_uploaded_s: float = Field(
        7 * 86400.0,
        ge=0,
        description="Seconds uploaded records are kept before they are deleted; "
        "0 keeps them for ever (within the quota).",
    )
    ttl_s: float = Field(
        0.0,
        ge=0,
        description="Seconds a queued record may wait before it moves to dead as "
        "expired; 0: no limit.",
    )
    check_interval_s: float = Field(
        30.0, gt=0, le=3600, description="Seconds between outbox checks in the daemon."
    )


class LimitsConfig(_Section):
    max_pending: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Unfinished records above which intake stops reading.",
    )


class TelemetryConfig(_Section):
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (spans go to /v1/traces, metrics "
        "to /v1/metrics); empty uses OTEL_EXPORTER_OTLP_ENDPOINT, and without "
        "either, telemetry stays local.",
    )
    capture: Literal["off", "redacted", "full"] = Field(
        "redacted",
        description="Prompt and response text on model-call spans: off (none), "
        "redacted (secrets and personal data replaced) or full.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="HTTP headers for the collector, e.g. an authorization token; "
        "masked by `config show`.",
    )
    redact_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="Extra redaction rules as name = regular expression; a match "
        "becomes [REDACTED:name].",
    )
    spool_bytes: int = Field(
        16 * 2**20,
        ge=64 * 1024,
        le=2**34,
        description="Bytes of serialized telemetry kept while the collector is "
        "unreachable; past this the oldest is dropped and counted.",
    )
    local_spans: int = Field(
        100_000,
        ge=1000,
        le=10_000_000,
        description="Spans kept in the data directory for `appliance trace`; "
        "the oldest go first.",
    )
    trace_retention_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="Seconds a span stays in the data directory for `appliance "
        "trace`; drift samples are kept as long as the span limit allows.",
    )
    drift_sample: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Fraction of records tagged for offline drift review; their "
        "spans carry prompt and response even when capture is off (redacted then).",
    )
    metric_interval_s: float = Field(
        60.0, ge=1, le=3600, description="Seconds between metric collections."
    )
    export_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Seconds one export request may take."
    )
    input_token_price: float = Field(
        0.0,
        ge=0,
        description="Price per input token of a priced remote model, in "
        "price_currency; 0 records no money cost.",
    )
    output_token_price: float = Field(
        0.0,
        ge=0,
        description="Price per output token of a priced remote model, in "
        "price_currency; 0 records no money cost.",
    )
    price_currency: str = Field(
        "USD", min_length=3, max_length=3, description="ISO 4217 code of the prices."
    )

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"redaction rule {name!r} is not a valid regular expression: {exc}"
                ) from None
        return patterns


class ReviewConfig(_Section):
    """A larger model that checks a sample of the local model's records when online."""

    enabled: bool = Field(
        False,
        description="Send review work to the reviewer endpoint; needs base_url "
        "and model.",
    )
    base_url: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible API, usually ending in /v1; "
        "requests go to {base_url}/chat/completions.",
    )
    model: str | None = Field(None, description="Model name sent with each request.")
    api_key_file: Path | None = Field(
        None,
        description="File holding the API key (mode 0600); empty sends no "
        "Authorization header.",
    )
    sample_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Fraction of validated log_event records reviewed as the "
        "drift sample.",
    )
    review_doubtful: bool = Field(
        True,
        description="Also review records that needed a retry, whose line was cut, "
        "or whose severity is two or more levels from the logged level.",
    )
    requests_per_minute: int = Field(
        0, ge=0, le=1_000_000, description="Requests allowed per minute; 0: no limit."
    )
    tokens_per_minute: int = Field(
        0,
        ge=0,
        le=100_000_000,
        description="Tokens allowed per minute, each request counted as its "
        "estimated prompt tokens plus max_tokens; 0: no limit.",
    )
    max_tokens: int = Field(
        320, ge=16, le=32768, description="Completion tokens allowed per request."
    )
    price_per_1k_prompt_tokens: float = Field(
        0.0, ge=0, description="Price of 1000 prompt tokens, in the budget's currency."
    )
    price_per_1k_completion_tokens: float = Field(
        0.0,
        ge=0,
        description="Price of 1000 completion tokens, in the budget's currency.",
    )
    daily_budget: float = Field(
        0.0,
        ge=0,
        description="Spending allowed per UTC day; review stops before a request "
        "that could pass it and resumes the next day; 0: no budget.",
    )
    timeout: float = Field(60.0, gt=0, le=600, description="Seconds per request.")
    structured_output: Literal["auto", "json_schema", "prompt"] = Field(
        "auto",
        description="json_schema sends response_format with the log_event schema; "
        "prompt puts the schema in the system message instead; auto starts with "
        "json_schema and switches to prompt when the server rejects it.",
    )
    agreement_alert_below: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Agreement rate over the last agreement_window reviews below "
        "which status shows the drift alert; 0: no alert.",
    )
    agreement_window: int = Field(
        50,
        ge=1,
        le=100_000,
        description="Reviews that the recent agreement rate is computed over.",
    )

    @model_validator(mode="after")
    def _check_endpoint(self) -> ReviewConfig:
        if self.enabled and not (self.base_url and self.model):
            raise ValueError("[review] enabled = true needs base_url and model")
        return self


class Config(_Section):
    """The whole configuration file."""

    data_dir: Path | None = Field(
        None,
        description="Data directory; empty uses --data-dir, FIELD_RELAY_DATA_DIR or "
        "~/.local/share/field-relay.",
    )
    links: list[LinkConfig] = Field(default_factory=list, description="Device links.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)

    @field_validator("links")
    @classmethod
    def _unique_names(cls, links: list[LinkConfig]) -> list[LinkConfig]:
        names = [link.name for link in links]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"link names must be unique; repeated: {twice}")
        return links


def load_config(path: Path | None, environ: dict[str, str] | None = None) -> Config:
    """Read, override from the environment and validate a configuration.

    ``path`` None gives the defaults (plus environment overrides).

    Raises:
        ConfigError: the file is missing or not TOML, or a key is unknown or
            has a value outside its allowed range; the message names each.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"configuration file {str(path)!r} not found; check the path"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {str(path)!r}: {exc}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{str(path)!r} is not valid TOML: {exc}") from exc
    _apply_environment(data, os.environ if environ is None else environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path is not None else "configuration"
        raise ConfigError(format_errors(where, exc)) from None


def format_errors(where: str, exc: ValidationError) -> str:
    """One line per problem: the dotted key, the value and what is allowed."""
    lines = [f"{where}: {exc.error_count()} invalid setting(s)"]
    for error in exc.errors():
        key = ".".join(
            f"[{part}]" if isinstance(part, int) else str(part) for part in error["loc"]
        ).replace(".[", "[")
        if error["type"] == "extra_forbidden":
            lines.append(
                f"  {key}: unknown key; check its spelling against "
                "docs/configuration.md"
            )
            continue
        value = error.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key or '(top level)'}{shown}: {error['msg']}")
    return "\n".join(lines)


def _apply_environment(data: dict[str, Any], environ: Any) -> None:
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if part.isdigit():
                if not isinstance(node, list) or int(part) >= len(node):
                    raise ConfigError(
                        f"{name}: index {part} does not name an existing "
                        f"[[{'.'.join(parts[:depth])}]] entry; add the entry to the "
                        "file first"
                    )
                node = node[int(part)]
            elif isinstance(node, dict):
                nxt = parts[depth + 1]
                node = node.setdefault(part, [] if nxt.isdigit() else {})
            else:
                raise ConfigError(f"{name}: {part!r} is not a table")
        if not isinstance(node, dict):
            raise ConfigError(f"{name}: the last part must name a key, not an index")
        node[parts[-1]] = _env_value(environ[name])
        logger.info("configuration key %s set from %s", ".".join(parts), name)


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def masked(config: Config) -> dict[str, Any]:
    """The configuration as plain data with secret values replaced by '***'."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (_mask(v) if k in SECRET_KEYS else walk(v)) for k, v in value.items()
            }
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(config.model_dump(mode="json"))


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "***" for k in value}
    return "***" if value else value


def to_toml(data: dict[str, Any]) -> str:
    """Render plain configuration data as TOML (None values are left out)."""
    out: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(prefix: str, value: dict[str, Any], array: bool = False) -> None:
        plain = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
        nested = {k: v for k, v in value.items() if isinstance(v, (dict, list))}
        has_values = any(item is not None for item in plain.values())
        if prefix and (array or has_values):
            out.append(f"\n[[{prefix}]]" if array else f"\n[{prefix}]")
        for key, item in plain.items():
            if item is not None:
                out.append(f"{key} = {scalar(item)}")
        for key, item in nested.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(item, list):
                for entry in item:
                    table(path, entry, array=True)
            else:
                table(path, item)

    table("", data)
    return "\n".join(out).lstrip("\n") + "\n"


def reference_markdown() -> str:
    """Return docs/configuration.md's key reference, generated from the models."""
    lines = [
        "# Configuration",
        "",
        "The appliance reads one TOML file (`appliance run --config FILE`). Every key "
        "is optional unless marked required; an unknown key is an error. "
        "`appliance config check FILE` validates a file without starting anything, "
        "and `appliance config show` prints the effective settings with secrets "
        "masked.",
        "",
        "Environment variables override single keys: `FIELD_RELAY__SYNC__URL` sets "
        "`[sync] url`, and `FIELD_RELAY__LINKS__0__BAUD` sets `baud` of the first "
        "`[[links]]` entry. A value that parses as a TOML value (number, boolean, "
        "quoted string) takes that type; anything else is a string.",
        "",
        "This page is generated from `appliance/config.py` by "
        "`appliance config docs`; a test fails when they differ.",
    ]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("top level", Config),
        ("[[links]]", LinkConfig),
        ("[links.usb]", UsbMatch),
        ("[links.ble]", BleMatch),
        ("[model]", ModelConfig),
        ("[sync]", SyncConfig),
        ("[mqtt]", MqttConfig),
        ("[outbox]", OutboxConfig),
        ("[limits]", LimitsConfig),
        ("[telemetry]", TelemetryConfig),
        ("[review]", ReviewConfig),
    ]
    for title, model in sections:
        lines += ["", f"## {title}", "", "| key | type | default | allowed | meaning |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(
                field.annotation, BaseModel
            ):
                continue
            if name == "links" and model is Config:
                continue
            default = (
                "required"
                if field.is_required()
                else ("[]" if field.default_factory else _show(field.default))
            )
            lines.append(
                f"| `{name}` | {_type_name(field.annotation)} | {default} | "
                f"{_bounds(field.metadata)} | {field.description or ''} |"
            )
    return "\n".join(lines) + "\n"


def _show(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = re.sub(r"typing\.|pathlib\.|appliance\.config\.", "", text)
    return text.replace("|", "or").replace("NoneType", "empty")


def _bounds(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            parts.append(f"`{pattern}`")
    return ", ".join(parts)
