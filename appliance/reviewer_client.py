"""HTTP client for the reviewer: one OpenAI-compatible chat completion per review.

The request carries the local model's chat messages and requests a
``log_event`` object. With structured output ``json_schema`` the schema goes in
``response_format``; with ``prompt`` it goes in the system message and the
output is only validated afterwards. Under ``auto`` the client starts with
``json_schema`` and switches to ``prompt`` for the rest of its life when the
server rejects ``response_format`` (a 400, 422 or 500 whose body names it).

HTTP failures are mapped to errors grouped by what the review worker does next::

    ReviewerError
    ├── ReviewerUnreachableError       no connection: wait, count no attempt
    ├── ReviewerThrottledError         429 or 503: requeue after Retry-After
    ├── StructuredOutputRejectedError  switched to prompt: send again at once
    ├── ReviewerSetupError             401, 403, 404 or a rejected schema: pause
    └── ReviewerCallError              5xx, timeout, bad body: the retry policy

The API key is sent only in the ``Authorization`` header and is replaced by
``***`` in every error message, because some servers quote the key they
rejected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import httpx

from appliance.errors import ApplianceError
from appliance.log_event import SCHEMA_ID, LogEvent
from appliance.sync import parse_retry_after, read_token

logger = logging.getLogger(__name__)

StructuredOutput = Literal["auto", "json_schema", "prompt"]

THROTTLE_STATUS = frozenset({429, 503})
"""Statuses that mean "too many requests now": the work is requeued, not failed."""
SETUP_STATUS = frozenset({401, 403, 404})
"""Statuses that no retry can fix: wrong key, no access, or wrong URL or model."""
FORMAT_REJECT_STATUS = frozenset({400, 422, 500})
"""Statuses with which servers reject an unsupported ``response_format``: 400 in
the OpenAI style, 422 from FastAPI validation, and 500 from llama-cpp-python's
server 0.3.36 (with FastAPI 0.165), whose validation error names the field."""

INITIAL_CHARS_PER_TOKEN = 3.0
"""Starting estimate of prompt characters per token, an estimate. English prose
runs near 4 characters per token with common BPE vocabularies. Log lines full
of numbers and identifiers run lower, so 3 overestimates most prompts."""
MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat template adds per message (role and delimiters), estimated."""
REPLY_OVERHEAD_TOKENS = 3
"""Tokens that open the assistant's reply, estimated."""

PROMPT_MODE_INSTRUCTION = (
    "Reply with one JSON object only, without code fences or other text. It "
    "must be valid against this JSON schema: "
)


class ReviewerError(ApplianceError):
    """A request to the reviewer endpoint failed.

    Attributes:
        status: the HTTP status, or None when no response arrived.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ReviewerUnreachableError(ReviewerError):
    """No connection to the endpoint: the appliance is offline or the server is down."""


class ReviewerThrottledError(ReviewerError):
    """The server responded with 429 or 503.

    Attributes:
        retry_after: seconds its ``Retry-After`` header requested, or None.
    """

    def __init__(self, message: str, status: int, retry_after: float | None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class StructuredOutputRejectedError(ReviewerError):
    """The server rejected ``response_format``; the client now uses prompt mode."""


class ReviewerSetupError(ReviewerError):
    """The endpoint rejected the key, the URL or the model; the operator must act."""


class ReviewerCallError(ReviewerError):
    """A server error, a timeout or an unusable response; retried by policy."""


@dataclasses.dataclass(frozen=True)
class ReviewerCompletion:
    """The reviewer's raw reply to one request and what it cost."""

    text: str
    """The assistant message's content, with any code fence removed."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool
    """True when the server sent no ``usage`` and the counts are estimates."""
    model: str
    """Model name in the response."""
    structured_output: str
    """``json_schema`` or ``prompt``: how this request asked for the schema."""
    duration: float
    """Seconds from sending the request to reading the response."""


def review_schema() -> dict[str, Any]:
    """Return the ``log_event`` JSON schema as sent to the reviewer."""
    return LogEvent.model_json_schema()


class ReviewerClient:
    """Sends chat completions to ``{base_url}/chat/completions``.

    Args:
        base_url: the API base, such as ``http://10.0.0.5:8000/v1``.
        model: the model name sent with each request.
        api_key: bearer token, or None to send no ``Authorization`` header.
        max_tokens: completion tokens allowed per request.
        timeout: seconds per request.
        structured_output: ``auto``, ``json_schema`` or ``prompt``.
        transport: an httpx transport, for tests; None uses the network.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_tokens: int = 320,
        timeout: float = 60.0,
        structured_output: StructuredOutput = "auto",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        self.configured_output = structured_output
        self.mode: Literal["json_schema", "prompt"] = (
            "prompt" if structured_output == "prompt" else "json_schema"
        )
        self.chars_per_token = INITIAL_CHARS_PER_TOKEN
        self._api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            timeout=timeout, headers=headers, transport=transport
        )
        self._schema = review_schema()

    def close(self) -> None:
        """Close the connection pool. Safe to call more than once."""
        self._client.close()

    # Requests ------------------------------------------------------------------

    def messages_for(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Return the messages to send: in prompt mode, with the schema appended
        to the system message."""
        if self.mode != "prompt":
            return messages
        instruction = PROMPT_MODE_INSTRUCTION + json.dumps(
            self._schema, separators=(",", ":")
        )
        result = [dict(message) for message in messages]
        if result and result[0]["role"] == "system":
            result[0]["content"] = result[0]["content"] + "\n\n" + instruction
        else:
            result.insert(0, {"role": "system", "content": instruction})
        return result

    def request_body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """Return the JSON body of a chat completion request for ``messages``."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages_for(messages),
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        if self.mode == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": SCHEMA_ID,
                    "schema": self._schema,
                    "strict": True,
                },
            }
        return body

    def estimate_tokens(self, messages: list[dict[str, str]]) -> int:
        """Return the tokens a request for ``messages`` counts against a limit.

        It is the estimated prompt (characters over ``chars_per_token`` plus
        per-message overhead) plus ``max_tokens``, which bounds the completion.
        """
        sent = self.messages_for(messages)
        chars = sum(len(message["content"]) for message in sent)
        prompt = math.ceil(chars / self.chars_per_token)
        prompt += MESSAGE_OVERHEAD_TOKENS * len(sent) + REPLY_OVERHEAD_TOKENS
        return prompt + self.max_tokens

    def complete(self, messages: list[dict[str, str]]) -> ReviewerCompletion:
        """Send one chat completion for ``messages`` and return the reply.

        Raises:
            ReviewerUnreachableError: no connection could be made.
            ReviewerThrottledError: HTTP 429 or 503.
            StructuredOutputRejectedError: the server rejected ``response_format``
                under ``auto``; the next call uses prompt mode.
            ReviewerSetupError: HTTP 401, 403 or 404, or ``response_format``
                rejected when ``structured_output`` is ``json_schema``.
            ReviewerCallError: any other failure.
        """
        body = self.request_body(messages)
        mode = self.mode
        started = time.monotonic()
        try:
            response = self._client.post(self.url, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ReviewerUnreachableError(
                self._redact(f"POST {self.url} failed: {type(exc).__name__}: {exc}")
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ReviewerSetupError(
                f"reviewer URL {self.url!r} is invalid ({exc}); set [review] "
                "base_url to an http:// or https:// URL"
            ) from exc
        except httpx.HTTPError as exc:
            raise ReviewerCallError(
                self._redact(f"POST {self.url} failed: {type(exc).__name__}: {exc}")
            ) from exc
        duration = time.monotonic() - started
        self._check_status(response, mode)
        completion = self._parse(response, body, mode, duration)
        self._calibrate(body["messages"], completion)
        return completion

    # Responses -----------------------------------------------------------------

    def _check_status(self, response: httpx.Response, mode: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        excerpt = self._redact(response.text[:300])
        message = f"POST {self.url} returned HTTP {status}: {excerpt!r}"
        if status in THROTTLE_STATUS:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise ReviewerThrottledError(message, status, retry_after)
        if status in SETUP_STATUS:
            fix = (
                "check [review] api_key_file"
                if status in (401, 403)
                else "check [review] base_url and model"
            )
            raise ReviewerSetupError(f"{message}; {fix}", status)
        if (
            mode == "json_schema"
            and status in FORMAT_REJECT_STATUS
            and _names_response_format(response.text)
        ):
            if self.configured_output == "auto":
                self.mode = "prompt"
                logger.warning(
                    "reviewer %s rejects response_format json_schema (HTTP %d); "
                    "switching to schema instructions in the prompt",
                    self.url,
                    status,
                )
                raise StructuredOutputRejectedError(message, status)
            raise ReviewerSetupError(
                f"{message}; the server does not accept response_format json_schema: "
                'set [review] structured_output = "auto" or "prompt"',
                status,
            )
        raise ReviewerCallError(message, status)

    def _parse(
        self,
        response: httpx.Response,
        body: dict[str, Any],
        mode: str,
        duration: float,
    ) -> ReviewerCompletion:
        try:
            payload = response.json()
            choice = payload["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ReviewerCallError(
                f"POST {self.url} returned HTTP {response.status_code} without a "
                f"chat completion ({type(exc).__name__}: {exc}): "
                f"{self._redact(response.text[:200])!r}",
                response.status_code,
            ) from exc
        if not isinstance(content, str):
            raise ReviewerCallError(
                f"POST {self.url} returned no message content "
                f"(finish_reason {choice.get('finish_reason')!r})",
                response.status_code,
            )
        usage = payload.get("usage") if isinstance(payload, dict) else None
        prompt_tokens = completion_tokens = None
        if isinstance(usage, dict):
            prompt_tokens = _count(usage.get("prompt_tokens"))
            completion_tokens = _count(usage.get("completion_tokens"))
        estimated = prompt_tokens is None or completion_tokens is None
        if prompt_tokens is None:
            prompt_tokens = self.estimate_tokens(body["messages"]) - self.max_tokens
        if completion_tokens is None:
            completion_tokens = math.ceil(len(content) / self.chars_per_token)
        return ReviewerCompletion(
            text=strip_code_fence(content),
            finish_reason=str(choice.get("finish_reason") or "stop"),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            usage_estimated=estimated,
            model=str(payload.get("model") or self.model),
            structured_output=mode,
            duration=duration,
        )

    def _calibrate(
        self, sent: list[dict[str, str]], completion: ReviewerCompletion
    ) -> None:
        """Lower ``chars_per_token`` when the server counted more prompt tokens
        than estimated, so later estimates do not undercount the limit."""
        if completion.usage_estimated or completion.prompt_tokens <= 0:
            return
        overhead = MESSAGE_OVERHEAD_TOKENS * len(sent) + REPLY_OVERHEAD_TOKENS
        text_tokens = max(1, completion.prompt_tokens - overhead)
        observed = sum(len(message["content"]) for message in sent) / text_tokens
        if observed < self.chars_per_token:
            logger.debug(
                "reviewer prompt estimate lowered from %.2f to %.2f characters "
                "per token",
                self.chars_per_token,
                observed,
            )
            self.chars_per_token = max(1.0, observed)

    def _redact(self, text: str) -> str:
        if self._api_key:
            return text.replace(self._api_key, "***")
        return text


def read_api_key(path: Path | None) -> str | None:
    """Return the API key in ``path``, or None when no file is configured.

    Raises:
        SetupError: the file is missing, empty, or readable by group or others.
    """
    if path is None:
        return None
    return read_token(path)


def strip_code_fence(text: str) -> str:
    """Return ``text`` without a surrounding Markdown code fence, if it has one."""
    stripped = text.strip()
    if not stripped.startswith("```"):
        return text
    lines = stripped.splitlines()
    if len(lines) >= 2 and lines[-1].strip() == "```":
        return "\n".join(lines[1:-1])
    return text


def _names_response_format(text: str) -> bool:
    lowered = text.lower()
    return "response_format" in lowered or "json_schema" in lowered


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
