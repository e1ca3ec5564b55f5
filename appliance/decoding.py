"""Schema-driven constrained decoding for flat JSON objects.

Instead of asking a GBNF grammar to mask the whole vocabulary on every token,
the decoder walks the schema itself. Keys, punctuation and the rest of an enum
value once only one value still fits are known in advance: they are appended
as forced tokens in one batch, with no sampling step (jump-forward decoding).
Only free choices are sampled, and each is masked by a precomputed vocabulary
table: a string token may not contain ``"``, ``\\``, control characters or a
partial UTF-8 sequence, and must fit the string's ``maxLength`` in characters.
The output is compact JSON in declared field order that parses by
construction, and its length is bounded by the schema, so it can never be cut
off by a token limit.

Supported schemas: an object whose properties are all required and each a
string enum, a boolean, or a string with ``maxLength``. Anything else raises
``GrammarError`` and the caller falls back to the GBNF grammar path.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np

from appliance.errors import GrammarError

LOOP_PERIOD_MAX = 8
"""Maximum token period the loop detector checks in a string field."""
LOOP_REPEATS = 3
"""Consecutive repeats of a token period that end a string field early."""


@dataclasses.dataclass(frozen=True)
class EnumSlot:
    """A field whose value is one of fixed JSON texts (enum values, true/false)."""

    options: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StringSlot:
    """A string field with bounds in characters."""

    min_length: int
    max_length: int


Slot = EnumSlot | StringSlot


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The output as alternating literals and slots: literal, slot, literal, ..."""

    literals: tuple[str, ...]
    """Fixed text around the slots; one more literal than slots."""
    slots: tuple[Slot, ...]


def plan_from_schema(schema: dict[str, Any]) -> DecodePlan:
    """Build a decoding plan from a JSON schema.

    Raises:
        GrammarError: the schema is outside the supported subset.
    """
    if schema.get("type") != "object" or not schema.get("properties"):
        raise GrammarError("schema decoding needs an object with properties", "#")
    required = set(schema.get("required", []))
    literals: list[str] = []
    slots: list[Slot] = []
    prefix = "{"
    for name, node in schema["properties"].items():
        path = f"#/properties/{name}"
        if name not in required:
            raise GrammarError(f"property {path!r} is optional", path)
        literals.append(prefix + json.dumps(name) + ":")
        slots.append(_slot(_resolve(schema, node, path), path))
        prefix = ","
    literals.append("}")
    return DecodePlan(tuple(literals), tuple(slots))


def _resolve(schema: dict[str, Any], node: dict[str, Any], path: str) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    name = ref.rsplit("/", 1)[-1]
    target = schema.get("$defs", {}).get(name)
    if not ref.startswith("#/$defs/") or target is None:
        raise GrammarError(f"unresolvable $ref {ref!r} at {path!r}", path)
    return target


def _slot(node: dict[str, Any], path: str) -> Slot:
    if "enum" in node and all(isinstance(v, str) for v in node["enum"]):
        return EnumSlot(tuple(json.dumps(v, ensure_ascii=False) for v in node["enum"]))
    if node.get("type") == "boolean":
        return EnumSlot(("true", "false"))
    if (
        node.get("type") == "string"
        and "maxLength" in node
        and set(node)
        <= {
            "type",
            "minLength",
            "maxLength",
            "title",
            "description",
        }
    ):
        return StringSlot(int(node.get("minLength", 0)), int(node["maxLength"]))
    raise GrammarError(f"schema decoding does not support the field at {path!r}", path)


class VocabularyTable:
    """Per-token facts the decoder needs, computed once per model.

    Args:
        pieces: the byte string of every token id, in id order.
    """

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.size = len(pieces)
        self.string_ok = np.zeros(self.size, dtype=bool)
        self.char_len = np.zeros(self.size, dtype=np.int32)
        self.by_piece: dict[bytes, int] = {}
        for token, piece in enumerate(pieces):
            if piece and piece not in self.by_piece:
                self.by_piece[piece] = token
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text and not any(
                ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text
            ):
                self.string_ok[token] = True
                self.char_len[token] = len(text)
        self.quote_tokens: list[tuple[int, str, str]] = []
        """Tokens containing ``"``: (id, string-safe text before the first
        quote, text after it). Closing tokens such as ``","`` are among them."""
        for token, piece in enumerate(pieces):
            text = piece.decode("utf-8", errors="replace")
            if '"' not in text or "\ufffd" in text:
                continue
            head, _, tail = text.partition('"')
            if not any(ch == "\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in head):
                self.quote_tokens.append((token, head, tail))
        self.string_tokens = np.flatnonzero(self.string_ok)
        """Ids of every token allowed inside a string."""
        self.max_char_len = int(self.char_len.max(initial=0))


@dataclasses.dataclass
class DecodeResult:
    """Text and costs of one schema-driven decode."""

    text: str
    sampled_tokens: int
    """Tokens chosen by a sampling step."""
    forced_tokens: int
    """Tokens appended without sampling (keys, punctuation, settled enum values)."""
    constraint_seconds: float
    """Time spent computing masks and choosing tokens, outside llama.cpp."""
    loops_cut: int
    """String fields ended early by the loop detector."""


class SchemaDecoder:
    """Runs a ``DecodePlan`` against a llama.cpp context.

    Args:
        llama: a ``llama_cpp.Llama`` whose context contains the evaluated prompt.
        table: the model's vocabulary table.
        plan: the output layout.
    """

    def __init__(self, llama: Any, table: VocabularyTable, plan: DecodePlan) -> None:
        self.llama = llama
        self.table = table
        self.plan = plan
        self._constraint_seconds = 0.0

    def decode(
        self, logits: np.ndarray, temperature: float, top_p: float, seed: int
    ) -> DecodeResult:
        """Generate the object, starting from the logits after the prompt."""
        self._rng = np.random.default_rng(seed)
        self._temperature = temperature
        self._top_p = top_p
        self._constraint_seconds = 0.0
        self._sampled = self._forced = self._loops = 0
        self._logits = logits
        out: list[str] = []
        pending = self.plan.literals[0]
        for index, slot in enumerate(self.plan.slots):
            following = self.plan.literals[index + 1]
            # The text every value starts with (the opening quote of a string)
            # joins the forced literal, so keys tokenize as they do in JSON text.
            lead = '"' if isinstance(slot, StringSlot) else _common_prefix(slot.options)
            self._force(pending + lead)
            out.append(pending + lead)
            if isinstance(slot, EnumSlot):
                value, pending = self._enum(slot, lead, following)
            else:
                value, pending = self._string(slot, following)
            out.append(value)
        self._force_final(pending)
        out.append(pending)
        return DecodeResult(
            "".join(out),
            self._sampled,
            self._forced,
            self._constraint_seconds,
            self._loops,
        )

    # Token plumbing -------------------------------------------------------------

    def _eval(self, tokens: list[int]) -> None:
        self.llama.eval(tokens)
        raw = self.llama._ctx.get_logits()
        self._logits = np.ctypeslib.as_array(raw, shape=(self.table.size,)).copy()

    def _force(self, text: str) -> None:
        """Append ``text`` as forced tokens and refresh the logits."""
        if not text:
            return
        tokens = self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        self._forced += len(tokens)
        self._eval(tokens)

    def _force_final(self, text: str) -> None:
        # The closing literal needs no logits after it, so it is not evaluated.
        if text:
            tokens = self.llama.tokenize(
                text.encode("utf-8"), add_bos=False, special=False
            )
            self._forced += len(tokens)

    def _choose(self, allowed: np.ndarray) -> int:
        """Pick one of the ``allowed`` token ids from the current logits."""
        scores = self._logits[allowed]
        if self._temperature <= 0:
            return int(allowed[int(np.argmax(scores))])
        scaled = (scores - scores.max()) / self._temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), self._top_p)) + 1]
        kept = probs[keep] / probs[keep].sum()
        return int(allowed[keep[self._rng.choice(len(keep), p=kept)]])

    # Slots ------------------------------------------------------------------------

    def _enum(self, slot: EnumSlot, lead: str, following: str) -> tuple[str, str]:
        """Sample an enum value until one option remains, then force the rest.

        ``lead`` is already in the context. Returns the text sampled after
        ``lead`` and the text still to append: the rest of the settled option
        followed by ``following``.
        """
        emitted = lead
        while True:
            started = time.perf_counter()
            alive = [o for o in slot.options if o.startswith(emitted)]
            if len(alive) == 1:
                self._constraint_seconds += time.perf_counter() - started
                rest = alive[0][len(emitted) :]
                return emitted[len(lead) :], rest + following
            candidates: dict[int, str] = {}
            for option in alive:
                for end in range(len(emitted) + 1, len(option) + 1):
                    piece = option[len(emitted) : end]
                    token = self.table.by_piece.get(piece.encode("utf-8"))
                    if token is not None:
                        candidates[token] = piece
            allowed = np.fromiter(candidates, dtype=np.int64)
            token = self._choose(allowed)
            self._constraint_seconds += time.perf_counter() - started
            emitted += candidates[token]
            self._sampled += 1
            self._eval([token])
            if emitted in slot.options and not any(
                o != emitted and o.startswith(emitted) for o in slot.options
            ):
                return emitted[len(lead) :], following

    def _string(self, slot: StringSlot, following: str) -> tuple[str, str]:
        """Sample string characters after the opening quote, then close the string.

        Returns the string text generated so far (with the closing quote when a
        token closed it) and the text still to append.
        """
        chars: list[str] = []
        length = 0
        history: list[int] = []
        closers = self._closers(following)
        while True:
            started = time.perf_counter()
            room = slot.max_length - length
            if room <= 0 or self._looping(history):
                if room > 0:
                    self._loops += 1
                self._constraint_seconds += time.perf_counter() - started
                return "".join(chars), '"' + following
            if room >= self.table.max_char_len:
                allowed = self.table.string_tokens
            else:
                allowed = np.flatnonzero(
                    self.table.string_ok & (self.table.char_len <= room)
                )
            fitting = [
                t
                for t, (head, _) in closers.items()
                if len(head) <= room and length + len(head) >= slot.min_length
            ]
            allowed = np.concatenate([allowed, np.array(fitting, dtype=np.int64)])
            token = self._choose(allowed)
            self._constraint_seconds += time.perf_counter() - started
            self._sampled += 1
            self._eval([token])
            if token in closers:
                head, tail = closers[token]
                return "".join(chars) + head + '"' + tail, following[len(tail) :]
            text = self.table.pieces[token].decode("utf-8")
            chars.append(text)
            length += len(text)
            history.append(token)

    def _closers(self, following: str) -> dict[int, tuple[str, str]]:
        """Tokens that end a string: safe text, ``"``, then a prefix of ``following``.

        Maps each token id to (text inside the string, text after the quote).
        """
        return {
            token: (head, tail)
            for token, head, tail in self.table.quote_tokens
            if following.startswith(tail)
        }

    @staticmethod
    def _looping(history: list[int]) -> bool:
        """Return True when the last tokens repeat a short period LOOP_REPEATS times."""
        for period in range(1, LOOP_PERIOD_MAX + 1):
            span = period * LOOP_REPEATS
            if len(history) < span:
                return False
            tail = history[-span:]
            if all(tail[i] == tail[i % period] for i in range(span)):
                return True
        return False


def _common_prefix(options: tuple[str, ...]) -> str:
    """Return the longest text every option starts with, short of a whole option."""
    first, last = min(options), max(options)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[: min(size, min(len(o) for o in options) - 1)]


def max_output_tokens(plan: DecodePlan) -> int:
    """Upper bound on the tokens a plan can produce: every token is at least one
    character, so the longest possible text in characters bounds it."""
    total = sum(len(literal) for literal in plan.literals)
    for slot in plan.slots:
        if isinstance(slot, EnumSlot):
            total += max(len(o) for o in slot.options)
        else:
            total += slot.max_length + 2
    return total
