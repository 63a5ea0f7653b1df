"""Grammar-constrained decoding ("structured output"): a token mask per step from a JSON schema or a regex.

The grammar work is done by xgrammar (Dong et al. 2024, arXiv 2411.15100; an optional extra:
`pip install "lmforge[structured]"`), chosen over outlines-core by measurement (benchmarks/RESULTS.md,
"Structured output: mask overhead per token"): the per-token mask costs the same (5-35 us at 2k-32k
tokens), but xgrammar runs a context-free grammar, so `json_object` and recursive schemas are exact and
compile in milliseconds, where outlines-core's regexes cap the nesting depth and take seconds for
`json_object`.

Use: `grammar = compile_grammar(tokenizer, vocab_size, json_schema=...)` once per schema (cached, so a
server does not recompile per request), then `grammar.constraint()` per request (a fresh matcher, a few
microseconds). `build_constraint(...)` does both. Each step the engine masks the logits with
`allowed()`, chooses a token, calls `advance(token)`, and stops when `is_finished()`.

Conventions:
- Tokens are the exact bytes lmforge's decoder gives for each id, so a multi-byte character may be split
  over tokens, as in `Tokenizer.decode`. Special tokens (BOS, chat headers, ...) never match grammar text.
- The stop ids (`Tokenizer.stop_token_ids`) are allowed exactly where the grammar may end; ids from the
  tokenizer's vocab size up to the model's `vocab_size` (padded embedding rows) are never allowed.
- JSON is generated on one line with ", " and ": " separators: with free whitespace, small models are
  known to emit newlines without end (vLLM added --disable-any-whitespace for this). Objects hold only
  the properties the schema names, in its order (xgrammar's strict mode); the text still validates
  against the schema, which is what a caller checks.
- For JSON, tokens holding a control byte (U+0000-U+001F) are never allowed: one-line JSON has none, and
  xgrammar 0.2.9 lets them into strings with minLength/maxLength, which JSON forbids (xgrammar issue
  #800). Such strings also cannot hold escapes there, which is a restriction, not an invalid output.

Shape letters: V model vocab size, W = ceil(V / 32) bitmask words.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    import xgrammar

    from lmforge.tokenizer import Tokenizer

# Compiled grammars kept per (tokenizer, vocab size); a compiled JSON schema for a 32k vocab is ~10-100 kB.
CACHE_SIZE = 256


class TokenConstraint(Protocol):
    """What the decoding engine applies each step (see the module docstring for the loop)."""

    def allowed(self) -> torch.Tensor | None:
        """bool [V] of the tokens allowed next; None means any."""
        ...

    def advance(self, token_id: int) -> None:
        """The engine chose `token_id`."""
        ...

    def is_finished(self) -> bool:
        """The grammar is complete: the engine stops with finish_reason "stop"."""
        ...


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise LmforgeError(
            "structured output (json_schema, regex, json_object) needs xgrammar: `pip install xgrammar` "
            '(or the extra: `pip install "lmforge[structured]"`).'
        ) from e
    return xgrammar


class GrammarConstraint:
    """One request's position in a compiled grammar; implements TokenConstraint.

    `allowed()` may be called any number of times per step (the mask is computed once per step) and need
    not be called at all before `advance`, which checks the token itself. `advance` of a token the grammar
    forbids raises LmforgeError and leaves the state unchanged. Not thread-safe: one request, one thread.
    The returned mask is a CPU tensor shared until the next `advance`; do not modify it.
    """

    def __init__(self, grammar: Grammar) -> None:
        xgr = _xgrammar()
        self._grammar = grammar
        self._matcher = xgr.GrammarMatcher(grammar.compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)  # int32 [1, W]
        self._mask: torch.Tensor | None = None  # this step's allowed(), computed on demand

    def allowed(self) -> torch.Tensor:
        if self._mask is None:
            vocab = self._grammar.vocab_size
            if self._matcher.is_terminated():
                self._mask = torch.zeros(vocab, dtype=torch.bool)
            else:
                self._matcher.fill_next_token_bitmask(self._bitmask)
                # Bit j of word w is token 32w + j; little-endian bytes and bit order unpack in token order.
                bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")[:vocab]  # [V]
                if self._grammar.usable is not None:
                    bits &= self._grammar.usable
                if not bits.any():  # only when a grammar needs a control byte in JSON (see the module doc)
                    raise LmforgeError(
                        f'the {self._grammar.kind} allows no next token here: a JSON string "pattern" that needs a '
                        "raw control character (a tab, a newline) cannot give valid JSON; match it another way"
                    )
                self._mask = torch.from_numpy(bits.view(np.bool_))  # [V]
        return self._mask

    def advance(self, token_id: int) -> None:
        token_id = int(token_id)
        usable = self._grammar.usable
        unusable = usable is not None and 0 <= token_id < len(usable) and not usable[token_id]
        if unusable or not self._matcher.accept_token(token_id):
            state = "after the grammar ended" if self._matcher.is_terminated() else "at this point"
            raise LmforgeError(
                f"token {token_id} is not allowed by the grammar {state}; choose the next token among "
                "allowed() (mask the logits with it) and stop once is_finished()"
            )
        self._mask = None

    def is_finished(self) -> bool:
        """True once a stop token was accepted, or when the text is complete and only a stop token may
        follow (the engine can stop a step early, without emitting it)."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        mask = self.allowed()
        return int(mask.sum()) == int(mask[list(self._grammar.stop_token_ids)].sum())


@dataclass(frozen=True, eq=False)
class Grammar:
    """A grammar compiled for one tokenizer and model vocab size. Immutable and shareable across threads;
    `constraint()` makes a fresh per-request state."""

    compiled: xgrammar.CompiledGrammar
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    kind: str  # "json_schema", "regex" or "json_object"
    usable: np.ndarray | None = None  # uint8 [V], 0 for tokens never allowed on top of the grammar

    def constraint(self) -> GrammarConstraint:
        return GrammarConstraint(self)


@dataclass
class _Compiler:
    compiler: Any  # xgrammar.GrammarCompiler (its own, unbounded cache is off: ours is bounded)
    no_control: np.ndarray  # uint8 [V]: 1 for tokens without a byte < 0x20 (see the module docstring)
    cache: OrderedDict[tuple[str, str], Grammar]


# Tokenizer -> vocab size -> compiler; weak, so a dropped tokenizer takes its grammars with it.
_COMPILERS: weakref.WeakKeyDictionary[Tokenizer, dict[int, _Compiler]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def compile_grammar(
    tokenizer: Tokenizer,
    vocab_size: int,
    *,
    json_schema: dict | str | None = None,
    regex: str | None = None,
    json_object: bool = False,
) -> Grammar:
    """Compile exactly one of `json_schema` (a JSON Schema as a dict or JSON text), `regex` (the whole
    output must match it; JSON Schema "pattern" syntax) or `json_object` (any JSON object) for
    `tokenizer` and a model with `vocab_size` logits (>= the tokenizer's, padding allowed).

    Results are cached per (tokenizer object, vocab_size, grammar); compiling is thread-safe. Raises
    LmforgeError for an invalid or unsatisfiable schema or regex, or a tokenizer without stop tokens.
    """
    kind, key = _grammar_key(json_schema, regex, json_object)
    with _LOCK:  # compiles take milliseconds; one lock keeps the caches and xgrammar's compiler simple
        entry = _compiler(tokenizer, vocab_size)
        grammar = entry.cache.get((kind, key))
        if grammar is None:
            usable = None if kind == "regex" else entry.no_control
            grammar = _compile(entry.compiler, kind, key, vocab_size, tuple(tokenizer.stop_token_ids), usable)
            entry.cache[(kind, key)] = grammar
            if len(entry.cache) > CACHE_SIZE:
                entry.cache.popitem(last=False)
        entry.cache.move_to_end((kind, key))
    return grammar


def build_constraint(
    tokenizer: Tokenizer,
    vocab_size: int,
    *,
    json_schema: dict | str | None = None,
    regex: str | None = None,
    json_object: bool = False,
) -> GrammarConstraint:
    """A fresh constraint for one request: `compile_grammar(...).constraint()` (the compile is cached)."""
    return compile_grammar(
        tokenizer, vocab_size, json_schema=json_schema, regex=regex, json_object=json_object
    ).constraint()


def _grammar_key(json_schema: dict | str | None, regex: str | None, json_object: bool) -> tuple[str, str]:
    # Cheap: the cache is looked up with this key on every request; checking the schema waits for a miss.
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex)) if v is not None]
    if json_object:
        given.append("json_object")
    if len(given) != 1:
        raise LmforgeError(
            f"give exactly one of json_schema, regex or json_object=True for structured output, got "
            f"{', '.join(given) if given else 'none'}"
        )
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise LmforgeError(f"regex must be a non-empty str, got {regex!r}")
        return "regex", regex
    if json_object:
        return "json_object", ""
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"json_schema is not valid JSON: {e}") from e
    if not isinstance(json_schema, dict):
        raise LmforgeError(f"json_schema must be a JSON object (a dict), got {type(json_schema).__name__}")
    # Not sort_keys: xgrammar emits properties in the schema's order, so the order is part of the grammar.
    return "json_schema", json.dumps(json_schema, ensure_ascii=False)


def _check_schema(schema: dict) -> None:
    # xgrammar ignores keywords it does not know and accepts some malformed values; the jsonschema package
    # checks the schema against its metaschema (the draft named by "$schema", else the latest).
    try:
        import jsonschema
    except ImportError as e:
        raise LmforgeError(
            "checking a json_schema needs jsonschema: `pip install jsonschema` (or the extra: "
            '`pip install "lmforge[structured]"`).'
        ) from e
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        at = f" (at {where})" if where else ""
        raise LmforgeError(f"json_schema is not a valid JSON Schema: {e.message}{at}") from e


# Keywords that only constrain one JSON type. xgrammar 0.2.9 infers "object" and "array" from theirs, but
# ignores string and number keywords in a subschema without "type" (it then allows any value, which need
# not match, e.g. {"pattern": "^[0-9]{5}$"} gave " "). We add the implied "type": a narrowing, so the
# output still validates against the schema as written.
_KEYWORD_TYPES = {
    "string": ("pattern", "minLength", "maxLength", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "object": ("properties", "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains"),
}
_SUBSCHEMA = (
    "items",
    "additionalProperties",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_TYPED_ELSEWHERE = ("type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "not")


def _with_implied_types(schema: Any) -> Any:
    """A copy of `schema` where every subschema without a type but with string or number keywords gets the
    type they imply (see _KEYWORD_TYPES)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _with_implied_types(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_with_implied_types(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _with_implied_types(s) for name, s in out[key].items()}
    kinds = [t for t, words in _KEYWORD_TYPES.items() if any(w in out for w in words)]
    if not any(k in out for k in _TYPED_ELSEWHERE) and ("string" in kinds or "number" in kinds):
        out["type"] = kinds[0] if len(kinds) == 1 else kinds
    return out


def _compiler(tokenizer: Tokenizer, vocab_size: int) -> _Compiler:
    by_size = _COMPILERS.setdefault(tokenizer, {})
    if vocab_size not in by_size:
        by_size[vocab_size] = _new_compiler(tokenizer, vocab_size)
    return by_size[vocab_size]


def _new_compiler(tokenizer: Tokenizer, vocab_size: int) -> _Compiler:
    xgr = _xgrammar()
    if not isinstance(vocab_size, int) or vocab_size < tokenizer.vocab_size:
        raise LmforgeError(
            f"vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; pass the model's "
            "vocab size (config.vocab_size), which may be larger than the tokenizer's but not smaller"
        )
    stop = tokenizer.stop_token_ids
    if not stop:
        raise LmforgeError(
            "structured output needs a stop token to end where the grammar ends, but this tokenizer has no "
            "eos_token or chat-format end-of-turn token; set eos_token in its tokenizer_config.json"
        )
    # RAW bytes, as lmforge decodes them; an empty token is special to xgrammar and never allowed, which is
    # what special tokens must be (their text, e.g. "<|eot_id|>", would otherwise match inside a string).
    special = tokenizer.special_token_ids
    pieces = [b"" if i in special else p for i, p in enumerate(tokenizer.piece_bytes())]
    info = xgr.TokenizerInfo(pieces, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop))
    compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
    no_control = np.ones(vocab_size, dtype=np.uint8)
    no_control[[i for i, p in enumerate(pieces) if any(b < 0x20 for b in p)]] = 0
    return _Compiler(compiler, no_control, OrderedDict())


def _compile(
    compiler: Any, kind: str, key: str, vocab_size: int, stop: tuple[int, ...], usable: np.ndarray | None
) -> Grammar:
    try:
        if kind == "regex":
            compiled = compiler.compile_regex(key)
        elif kind == "json_object":
            compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        else:
            schema = json.loads(key)
            _check_schema(schema)
            compiled = compiler.compile_json_schema(json.dumps(_with_implied_types(schema)), any_whitespace=False)
    except RuntimeError as e:  # xgrammar reports every parse or conversion error as RuntimeError
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        what = "regex is not a valid regular expression" if kind == "regex" else "json_schema cannot be compiled"
        raise LmforgeError(f"{what}: {_strip_location(detail)}") from e
    grammar = Grammar(compiled, vocab_size, stop, kind, usable)
    grammar.constraint().allowed()  # refuses a grammar that allows nothing at all
    return grammar


def _strip_location(message: str) -> str:
    # "[01:03:46] /project/cpp/regex_converter.cc:94: Regex parsing error ..." -> "Regex parsing error ..."
    head, sep, rest = message.partition(".cc:")
    if sep and head.startswith("["):
        return rest.split(":", 1)[-1].strip()
    return message
