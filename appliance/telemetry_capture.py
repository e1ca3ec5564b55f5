"""Prompt and response capture on model-call spans, and the redaction rules.

Capture is ``off`` (no message text on spans), ``redacted`` (text with every
match of a redaction rule replaced by ``[REDACTED:rule]``) or ``full``.

The built-in rules cover common secrets: bearer tokens, ``key=value``
credentials, AWS access keys, JWTs, PEM private keys and long hex strings.
They also cover personal data: e-mail addresses, IPv4 addresses, full-form
IPv6 addresses, MAC addresses, international phone numbers and payment card
numbers that pass the Luhn check.

Error messages on spans are redacted in every mode except ``full``, because
validation errors quote the model's output.

The attribute layout follows the OpenTelemetry GenAI semantic conventions
(v1.37): ``gen_ai.system_instructions``, ``gen_ai.input.messages`` and
``gen_ai.output.messages`` hold JSON strings of message parts.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any


class CaptureMode(enum.StrEnum):
    OFF = "off"
    REDACTED = "redacted"
    FULL = "full"


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_match(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 13 <= len(digits) <= 19 and _luhn_valid(digits)


CACHED_TEXTS = 64
"""Redacted texts kept per ``Redactor``; the prompt's fixed messages reuse them."""

_CREDENTIAL_KEYS = (
    r"password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
)


@dataclasses.dataclass(frozen=True)
class RedactionRule:
    """One redaction rule: matches of ``pattern`` become ``[REDACTED:name]``."""

    name: str
    pattern: re.Pattern[str]
    group: int = 0
    """The match group that is replaced; 0 replaces the whole match."""
    check: Callable[[re.Match[str]], bool] | None = None
    """Extra test of a match; a match that fails it is kept."""

    def apply(self, text: str) -> str:
        return self.pattern.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        if self.check is not None and not self.check(match):
            return match.group(0)
        marker = f"[REDACTED:{self.name}]"
        if self.group == 0:
            return marker
        whole = match.group(0)
        start = match.start(self.group) - match.start(0)
        end = match.end(self.group) - match.start(0)
        return whole[:start] + marker + whole[end:]


BUILTIN_RULES: tuple[RedactionRule, ...] = (
    RedactionRule(
        "private_key",
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
        ),
    ),
    RedactionRule("bearer", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")),
    RedactionRule(
        "credential",
        re.compile(
            rf"(?i)\b({_CREDENTIAL_KEYS})\b(\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;]+)"
        ),
        group=3,
    ),
    RedactionRule(
        "jwt",
        re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}"),
    ),
    RedactionRule("aws_access_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    RedactionRule("hex_secret", re.compile(r"\b[0-9a-fA-F]{32,}\b")),
    RedactionRule(
        "email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
    ),
    RedactionRule(
        "ipv4",
        re.compile(
            r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}"
            r"(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])"
        ),
    ),
    RedactionRule("ipv6", re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")),
    RedactionRule("mac", re.compile(r"\b(?:[0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}\b")),
    RedactionRule(
        "phone", re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}\b")
    ),
    RedactionRule(
        "card",
        re.compile(r"\b\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,7}\b"),
        check=_card_match,
    ),
)
"""The built-in rules, applied in this order.

A private key is replaced whole before the hex rule can match its body. Plain digit
runs such as timestamps and counters are left alone: the phone rule needs a
leading ``+`` and the card rule a Luhn-valid number in four-digit groups."""


class Redactor:
    """Applies the built-in redaction rules and any extra ones to text.

    Args:
        extra: more rules as name to regular expression; a match is replaced
            whole by ``[REDACTED:name]``.

    Raises:
        re.error: an extra pattern does not compile.
    """

    def __init__(self, extra: Mapping[str, str] | None = None) -> None:
        self.rules = list(BUILTIN_RULES)
        for name, pattern in (extra or {}).items():
            self.rules.append(RedactionRule(name, re.compile(pattern)))
        # The system prompt and the worked examples are the same in every
        # call, and redacting them takes about 1 ms, so recent results are kept.
        self.redact = functools.lru_cache(maxsize=CACHED_TEXTS)(self._redact)
        """Return a text with every rule's matches replaced."""

    def _redact(self, text: str) -> str:
        """Return ``text`` with every rule's matches replaced."""
        for rule in self.rules:
            text = rule.apply(text)
        return text


class ContentCapture:
    """Turns chat messages and model output into span attributes.

    Args:
        mode: the configured capture mode.
        redactor: the rules used in ``redacted`` mode and on error messages.
    """

    def __init__(self, mode: CaptureMode | str, redactor: Redactor) -> None:
        self.mode = CaptureMode(mode)
        self.redactor = redactor

    def effective_mode(self, drift_sample: bool) -> CaptureMode:
        """Return the mode for one record: drift samples get at least redacted."""
        if drift_sample and self.mode is CaptureMode.OFF:
            return CaptureMode.REDACTED
        return self.mode

    def message_attributes(
        self,
        messages: list[dict[str, str]],
        output: str | None,
        finish_reason: str | None,
        mode: CaptureMode,
    ) -> dict[str, Any]:
        """Return the GenAI content attributes for one call, empty when off.

        System messages become ``gen_ai.system_instructions``; the rest of the
        chat becomes ``gen_ai.input.messages``; ``output`` becomes
        ``gen_ai.output.messages`` with its finish reason.
        """
        if mode is CaptureMode.OFF:
            return {}
        clean = self._cleaner(mode)
        instructions = [
            {"type": "text", "content": clean(m["content"])}
            for m in messages
            if m["role"] == "system"
        ]
        chat = [
            {
                "role": m["role"],
                "parts": [{"type": "text", "content": clean(m["content"])}],
            }
            for m in messages
            if m["role"] != "system"
        ]
        attributes: dict[str, Any] = {
            "gen_ai.input.messages": _compact(chat),
            "field_relay.capture": mode.value,
        }
        if instructions:
            attributes["gen_ai.system_instructions"] = _compact(instructions)
        if output is not None:
            answer = {
                "role": "assistant",
                "parts": [{"type": "text", "content": clean(output)}],
                "finish_reason": finish_reason or "stop",
            }
            attributes["gen_ai.output.messages"] = _compact([answer])
        return attributes

    def error_text(self, text: str) -> str:
        """Return an error message fit for a span: redacted unless capture is full."""
        if self.mode is CaptureMode.FULL:
            return text
        return self.redactor.redact(text)

    def _cleaner(self, mode: CaptureMode) -> Callable[[str], str]:
        if mode is CaptureMode.FULL:
            return str
        return self.redactor.redact


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
