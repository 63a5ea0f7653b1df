"""Structured output: a tiny random model decodes under JSON-schema, json_object and regex constraints.

The decoding loop is written out here (logits -> allowed() mask -> pick -> advance) because the engine
is tested on its own. A random model picks almost uniformly among the allowed tokens, which explores the
grammar far more widely than a trained one would: every output must still parse and validate, and at
every step the stop tokens must be allowed exactly when the text so far is a complete answer.
"""

from __future__ import annotations

import json
import re
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("xgrammar", reason="structured output needs xgrammar (extra lmforge[structured])")
jsonschema = pytest.importorskip("jsonschema", reason="structured output needs jsonschema (extra lmforge[structured])")

from lmforge import LmforgeError, ModelConfig, Tokenizer, Transformer  # noqa: E402
from lmforge.generate import structured  # noqa: E402
from lmforge.generate.structured import build_constraint, compile_grammar  # noqa: E402

PAD = 20  # the model has PAD more logits than the tokenizer has tokens, as padded embeddings do
CAP = 400  # tokens per answer at most

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 10},
                "zip": {"pattern": "^[0-9]{5}$"},  # no "type": xgrammar alone would ignore the pattern
            },
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}
SCORES = {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 999}, "minItems": 1, "maxItems": 5}
NULLABLE = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "note": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
    },
    "required": ["id", "note"],
}
UNBOUNDED = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "x": {"type": "number"}, "n": {"type": "integer"}},
    "required": ["text", "x", "n"],
}
TREE = {  # recursive: beyond any regex, which is why xgrammar (a context-free grammar) was chosen
    "type": "object",
    "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2},
    },
    "required": ["v", "kids"],
}
DATE = r"\d{4}-\d{2}-\d{2}"
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The model is tiny: a second OpenMP thread only adds synchronisation (and stalls on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["json/encoder.py", "json/decoder.py", "string.py", "datetime.py", "textwrap.py"]
    return Tokenizer.train([(root / n).read_text(encoding="utf-8") for n in names], 700, "llama3")


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tok.vocab_size + PAD,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        tie_embeddings=True,
        max_position_embeddings=CAP + 16,
        family="llama",
    )
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def closers(tok: Tokenizer) -> torch.Tensor:
    # Tokens that can end a string, number, array or object, and the stop ids: the `bias` of `decode`.
    pieces = tok.decode_stream()._pieces
    ids = [i for i, p in enumerate(pieces) if any(c in p for c in b'",]}')] + tok.stop_token_ids
    out = torch.zeros(tok.vocab_size + PAD, dtype=torch.bool)
    out[ids] = True
    return out


def piece(tok: Tokenizer, i: int) -> bytes:
    return tok.decode_stream()._pieces[i]


def decode(tok, model, constraint, complete, *, seed=None, bias=None) -> tuple[str, bool]:
    """Sample (greedy when seed is None) under `constraint` until it finishes or CAP tokens.

    `complete(text)` says whether `text` is a whole answer; the stop ids must be allowed exactly then.
    `bias` (bool [V]) gets a bonus growing with the length: it keeps answers of unbounded grammars short
    and is the same for every grammar, so validity still comes from the mask alone."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    stop, special = tok.stop_token_ids, sorted(tok.special_token_ids - set(tok.stop_token_ids))
    ids = tok.encode("Answer:", add_special_tokens=True)
    out: list[int] = []
    with torch.no_grad():
        for step in range(CAP):
            allowed = constraint.allowed()
            assert allowed.shape == (tok.vocab_size + PAD,) and allowed.dtype == torch.bool and allowed.any()
            assert not allowed[tok.vocab_size :].any(), "a padded id is allowed"
            assert not allowed[special].any(), "a special token other than a stop id is allowed"
            text = tok.decode(out)
            assert bool(allowed[stop].any()) == complete(text), f"stop ids allowed={allowed[stop].tolist()} at {text!r}"
            logits = model(torch.tensor([ids]))[0, -1].float()
            if bias is not None:
                logits = logits + bias * (0.05 * step)
            logits = logits.masked_fill(~allowed, float("-inf"))
            if gen is None:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            constraint.advance(token)
            ids.append(token)
            if token in stop:
                break
            out.append(token)
            if constraint.is_finished():
                break
    return tok.decode(out), constraint.is_finished()


def valid_json(schema):
    def complete(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True

    return complete


@pytest.mark.parametrize(
    "schema", [PERSON, SCORES, NULLABLE, UNBOUNDED, TREE], ids=["person", "scores", "nullable", "unbounded", "tree"]
)
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_sampled_json_matches_the_schema(tok, model, closers, schema, seed):
    bias = closers if schema is UNBOUNDED or schema is TREE else None
    constraint = build_constraint(tok, tok.vocab_size + PAD, json_schema=schema)
    text, finished = decode(tok, model, constraint, valid_json(schema), seed=seed, bias=bias)
    assert finished, f"no complete answer in {CAP} tokens: {text!r}"
    answer = json.loads(text)
    jsonschema.validate(answer, schema)
    assert "\n" not in text and (": " in text) == isinstance(answer, dict)  # one line, ", " and ": " separators


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_sampled_json_object_is_an_object(tok, model, closers, seed):
    constraint = build_constraint(tok, tok.vocab_size + PAD, json_object=True)
    text, finished = decode(tok, model, constraint, valid_json({"type": "object"}), seed=seed, bias=closers)
    assert finished, f"no complete answer in {CAP} tokens: {text!r}"
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("pattern", [DATE, PHONE, r"(yes|no|maybe)!*", r"[a-z]{2,5}(-[a-z]{2,5})?"])
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_sampled_text_fully_matches_the_regex(tok, model, pattern, seed):
    constraint = build_constraint(tok, tok.vocab_size + PAD, regex=pattern)
    text, finished = decode(tok, model, constraint, lambda t: re.fullmatch(pattern, t) is not None, seed=seed)
    assert finished and re.fullmatch(pattern, text), text


def test_date_mask_is_exactly_the_tokens_that_keep_a_date_prefix(tok):
    # Oracle: a token is allowed iff the text stays a prefix of some \d{4}-\d{2}-\d{2}; stop iff complete.
    shape = "dddd-dd-dd"

    def prefix_ok(b: bytes) -> bool:
        return len(b) <= len(shape) and all(
            48 <= c <= 57 if s == "d" else chr(c) == s for c, s in zip(b, shape, strict=False)
        )

    constraint = build_constraint(tok, tok.vocab_size + PAD, regex=DATE)
    pieces = tok.decode_stream()._pieces
    done = b""
    for token in tok.encode("2024-01-31"):
        allowed = constraint.allowed()
        for i in range(tok.vocab_size + PAD):
            if i in tok.stop_token_ids:
                expected = len(done) == len(shape)
            elif i >= tok.vocab_size or i in tok.special_token_ids:
                expected = False
            else:
                expected = prefix_ok(done + pieces[i])
            assert bool(allowed[i]) == expected, (done, i, pieces[i] if i < tok.vocab_size else None)
        constraint.advance(token)
        done += pieces[token]
    assert constraint.is_finished()  # only a stop id can follow: the engine may stop without it
    assert sorted(constraint.allowed().nonzero().flatten().tolist()) == sorted(tok.stop_token_ids)


def test_mask_forbids_what_would_break_the_json(tok):
    constraint = build_constraint(tok, tok.vocab_size + PAD, json_schema=PERSON)
    allowed = constraint.allowed()
    start = {piece(tok, i) for i in allowed.nonzero().flatten().tolist()}
    assert b"{" in start and all(b'{"name": "'.startswith(p) for p in start)  # the schema's first key, in order
    assert not allowed[tok.encode("[")[0]] and not allowed[tok.stop_token_ids].any()

    for token in tok.encode('{"name": "Bob", "age": '):
        constraint.advance(token)
    allowed = constraint.allowed()
    after_colon = [piece(tok, i) for i in allowed.nonzero().flatten().tolist()]
    assert after_colon and all(p[:1].isdigit() for p in after_colon)  # an integer in 0..150: no "-" either
    quote = tok.encode('"')[0]
    assert not allowed[quote]
    before = allowed.clone()
    with pytest.raises(LmforgeError, match="not allowed by the grammar"):
        constraint.advance(quote)
    assert torch.equal(constraint.allowed(), before)  # a refused token leaves the state as it was

    for token in tok.encode('42, "role": "'):
        constraint.advance(token)
    enum = {piece(tok, i) for i in constraint.allowed().nonzero().flatten().tolist()}
    assert enum and all(any(w.startswith(p) for w in (b'admin"', b'user"', b'guest"')) for p in enum)


def test_strings_refuse_control_bytes_and_special_tokens(tok):
    # A control byte is never valid raw inside a JSON string (xgrammar 0.2.9 lets them into length-bounded
    # strings); special tokens would decode to "<|...|>" text, which is not what the model meant.
    controls = [i for i, p in enumerate(tok.decode_stream()._pieces) if p and any(b < 0x20 for b in p)]
    assert tok.encode("\t")[0] in controls and tok.encode("\n")[0] in controls
    for schema in ({"type": "string"}, {"type": "string", "maxLength": 12}):
        constraint = build_constraint(tok, tok.vocab_size + PAD, json_schema=schema)
        constraint.advance(tok.encode('"')[0])
        allowed = constraint.allowed()
        assert allowed[tok.encode("a")[0]] and allowed[tok.encode('"')[0]]
        assert not allowed[controls].any(), schema
        assert not allowed[sorted(tok.special_token_ids)].any(), schema
        with pytest.raises(LmforgeError):
            constraint.advance(tok.encode("\t")[0])
    # A string pattern that needs a raw tab is a dead end in JSON: an error, not an empty mask.
    constraint = build_constraint(tok, tok.vocab_size + PAD, json_schema={"type": "string", "pattern": "^a\tb$"})
    for token in tok.encode('"a'):
        constraint.advance(token)
    with pytest.raises(LmforgeError, match="allows no next token here"):
        constraint.allowed()
    # A regex is the user's own: a newline it asks for is allowed.
    constraint = build_constraint(tok, tok.vocab_size + PAD, regex=r"a\nb")
    constraint.advance(tok.encode("a")[0])
    assert constraint.allowed()[tok.encode("\n")[0]]


def test_stop_is_allowed_where_the_grammar_may_end_and_then_finishes(tok):
    constraint = build_constraint(tok, tok.vocab_size + PAD, regex=r"\d+")
    assert not constraint.allowed()[tok.stop_token_ids].any()
    constraint.advance(tok.encode("7")[0])
    assert constraint.allowed()[tok.stop_token_ids].all() and constraint.allowed()[tok.encode("1")[0]]
    assert not constraint.is_finished()  # more digits may follow: the model decides
    constraint.advance(tok.stop_token_ids[-1])
    assert constraint.is_finished() and not constraint.allowed().any()
    with pytest.raises(LmforgeError, match="after the grammar ended"):
        constraint.advance(tok.encode("1")[0])


def test_compiled_grammars_are_cached_and_constraints_independent(tok):
    vocab = tok.vocab_size + PAD
    grammar = compile_grammar(tok, vocab, json_schema=NULLABLE)
    assert compile_grammar(tok, vocab, json_schema=json.dumps(NULLABLE)) is grammar
    assert compile_grammar(tok, vocab + 1, json_schema=NULLABLE) is not grammar
    a, b = grammar.constraint(), grammar.constraint()
    for token in tok.encode('{"id": 3'):
        a.advance(token)
    assert not torch.equal(a.allowed(), b.allowed())
    assert torch.equal(b.allowed(), compile_grammar(tok, vocab, json_schema=NULLABLE).constraint().allowed())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(json_schema={"type": "strnig"}), "json_schema is not a valid JSON Schema: 'strnig' is not valid"),
        (dict(json_schema={"type": "integer", "minimum": "zero"}), "not a valid JSON Schema: 'zero' is not of type"),
        (dict(json_schema='{"type": "object"'), "json_schema is not valid JSON"),
        (dict(json_schema=["string"]), "json_schema must be a JSON object"),
        (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 3}), "json_schema cannot be compiled"),
        (dict(json_schema={"$ref": "#/$defs/missing"}), "json_schema cannot be compiled"),
        (dict(regex="(ab"), "regex is not a valid regular expression: .*parenthesis"),
        (dict(regex=""), "regex must be a non-empty str"),
        (dict(), "give exactly one of json_schema, regex or json_object=True.*got none"),
        (dict(regex="a", json_object=True), "exactly one.*got regex, json_object"),
    ],
)
def test_invalid_grammars_are_refused(tok, kwargs, message):
    with pytest.raises(LmforgeError, match=message):
        build_constraint(tok, tok.vocab_size + PAD, **kwargs)


def test_vocab_smaller_than_the_tokenizer_is_refused(tok):
    with pytest.raises(LmforgeError, match="smaller than the tokenizer's"):
        build_constraint(tok, tok.vocab_size - 1, json_object=True)


def test_missing_xgrammar_names_the_extra(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # makes `import xgrammar` raise ImportError
    with pytest.raises(LmforgeError, match=r"lmforge\[structured\]"):
        structured.build_constraint(tok, tok.vocab_size + PAD + 7, json_object=True)
