"""Tokenizer: training, round trips, streaming, chat formats (byte-exact), transformers parity, errors.

Tokenizers are trained once per module on ~200 KB of the Python standard library's own source.
"""

from __future__ import annotations

import json
import sysconfig
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from lmforge import LmforgeError, Tokenizer
from lmforge.chat_formats import FORMATS, render_template

VOCAB = 1000
FORMAT_NAMES = ["llama3", "llama3.1", "chatml", "glm4"]
MODEL_TYPE = {"llama3": "llama", "llama3.1": "llama", "chatml": "qwen2", "glm4": "glm4"}

# Text with the characters byte-level tokenizers get wrong most easily, mixed with arbitrary code points.
TRICKY = "😀👍🏽👨‍👩‍👧日本語한국어中文é\u0301a\u0308\u200d\ufeff\x00\x07\t\r\n \u00a0\u2028\U0010fffd"
texts = st.text(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(TRICKY)), max_size=120)

VARIED = [
    "def f(x):\n    return x ** 2  # square\n",
    "Numbers 1234567 and 3.14159, dates 2024-07-26.",
    "Unicode: héllo wörld, 日本語, emoji 😀👍🏽, combining e\u0301, zero\x00byte\ttab\r\n",
    "   leading and trailing spaces   ",
    "special strings in text: <|eot_id|> <|im_end|>[gMASK]<sop><|user|> <|endoftext|>x",
    "",
]

MESSAGES = [
    {"role": "system", "content": " You are terse. "},
    {"role": "user", "content": "Hi!\n"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

# REFERENCE.md section 3, written out by hand for MESSAGES.
LLAMA3_TURNS = (
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
)
EXPECTED = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>" + LLAMA3_TURNS,
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\nYou are terse.<|eot_id|>" + LLAMA3_TURNS,
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": (
        "<|im_start|>system\n You are terse. <|im_end|>\n<|im_start|>user\nHi!\n<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "glm4": (
        "[gMASK]<sop><|system|>\n You are terse. <|user|>\nHi!\n<|assistant|>\nHello.<|user|>\nWhat is 2+2?",
        "<|assistant|>",
    ),
}
KWARGS = {"llama3.1": {"date_string": "01 Jan 2025"}}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    out, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(out[-1])
        if total > 200_000:
            break
    return out


@pytest.fixture(scope="module")
def toks(corpus: list[str]) -> dict[str, Tokenizer]:
    return {name: Tokenizer.train(corpus, VOCAB, chat_format=name) for name in FORMAT_NAMES}


@pytest.fixture(scope="module")
def tok(toks: dict[str, Tokenizer]) -> Tokenizer:
    return toks["llama3"]


@pytest.fixture(scope="module")
def saved(toks: dict[str, Tokenizer], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each format saved twice: a bare tokenizer directory, and one beside a config.json of its model family
    (transformers picks the tokenizer class by model_type there)."""
    out = {}
    for name, t in toks.items():
        out[name] = tmp_path_factory.mktemp(name.replace(".", "_"))
        t.save(out[name])
        out[name + "+config"] = tmp_path_factory.mktemp(name.replace(".", "_") + "_model")
        t.save(out[name + "+config"])
        (out[name + "+config"] / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE[name]}))
    return out


# --- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_train_puts_specials_at_the_end(toks: dict[str, Tokenizer], name: str) -> None:
    t, specials = toks[name], FORMATS[name].special_tokens
    assert t.vocab_size == len(t) == VOCAB
    assert [t.token_to_id(s) for s in specials] == list(range(VOCAB - len(specials), VOCAB))
    assert t.special_token_ids == set(range(VOCAB - len(specials), VOCAB))
    assert t.chat_format == name
    # Every byte is a token of its own, so any text can be encoded.
    assert all(t.token_to_id(c) is not None for c in pre_tokenizers.ByteLevel.alphabet())


def test_named_and_stop_ids(toks: dict[str, Tokenizer]) -> None:
    ids = {name: t.token_to_id for name, t in toks.items()}
    llama = ids["llama3"]
    assert toks["llama3"].bos_token_id == llama("<|begin_of_text|>")
    assert toks["llama3"].eos_token_id == llama("<|end_of_text|>")
    assert toks["llama3"].pad_token_id is None
    assert toks["llama3"].stop_token_ids == [llama("<|end_of_text|>"), llama("<|eom_id|>"), llama("<|eot_id|>")]
    qwen = ids["chatml"]
    assert toks["chatml"].bos_token_id is None
    assert toks["chatml"].eos_token_id == toks["chatml"].pad_token_id == qwen("<|endoftext|>")
    assert toks["chatml"].stop_token_ids == [qwen("<|endoftext|>"), qwen("<|im_end|>")]
    glm = ids["glm4"]
    assert toks["glm4"].bos_token_id is None
    assert toks["glm4"].eos_token_id == toks["glm4"].pad_token_id == glm("<|endoftext|>")
    assert toks["glm4"].stop_token_ids == [glm("<|endoftext|>"), glm("<|user|>"), glm("<|observation|>")]


def test_training_learns_merges_and_digit_groups(toks: dict[str, Tokenizer]) -> None:
    tok = toks["llama3"]
    code = "    def __init__(self):\n        return None\n"
    assert len(tok.encode(code)) < len(code.encode()) / 2.5  # merges learned from Python source compress it
    # Llama 3 splits digit runs into groups of at most 3; Qwen 2.5 (chatml) into single digits.
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert "123" in pieces and {3, 6} <= {len("".join(pieces[:k])) for k in range(len(pieces))}
    assert [toks["chatml"].decode([i]) for i in toks["chatml"].encode("1234567")] == list("1234567")


# --- round trips ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(text=texts)
@example(text=TRICKY)
@example(text="  \n\n\t x  ")
def test_round_trip_any_unicode(tok: Tokenizer, toks: dict[str, Tokenizer], text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert toks["glm4"].decode(toks["glm4"].encode(text)) == text
    # chatml normalizes to NFC first, as Qwen 2.5's tokenizer does.
    assert toks["chatml"].decode(toks["chatml"].encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=50, deadline=None)
@given(batch=st.lists(texts, max_size=8))
def test_encode_batch_equals_encode(tok: Tokenizer, batch: list[str]) -> None:
    for add in (False, True):
        assert tok.encode_batch(batch, add_special_tokens=add) == [tok.encode(t, add_special_tokens=add) for t in batch]


def test_add_special_tokens_adds_the_format_prefix(toks: dict[str, Tokenizer]) -> None:
    for name, prefix in [("llama3", ["<|begin_of_text|>"]), ("chatml", []), ("glm4", ["[gMASK]", "<sop>"])]:
        t = toks[name]
        assert t.encode("hi", add_special_tokens=True) == [t.token_to_id(p) for p in prefix] + t.encode("hi")


def test_special_token_strings_in_text_are_parsed(tok: Tokenizer) -> None:
    eot = tok.token_to_id("<|eot_id|>")
    ids = tok.encode("a<|eot_id|>b")
    assert ids == tok.encode("a") + [eot] + tok.encode("b")
    assert tok.decode(ids) == "a<|eot_id|>b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


# --- streaming --------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    dec = tok.decode_stream(skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


@settings(max_examples=200, deadline=None)
@given(text=texts)
@example(text="😀日本語é\u0301")
def test_stream_never_breaks_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB + 5), max_size=30), skip=st.booleans())
def test_stream_equals_decode_for_any_ids(tok: Tokenizer, ids: list[int], skip: bool) -> None:
    # Arbitrary ids can form invalid UTF-8: the stream must replace it exactly as decode does (and, like
    # decode, ignore ids past the vocabulary, which a model with padded embeddings can sample).
    assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_holds_partial_character(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes are split over several byte tokens in this small vocab
    pieces = _stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2:] == ["😀", ""]


def test_stream_flush_emits_a_dangling_byte(tok: Tokenizer) -> None:
    ids = tok.encode("😀")[:1]
    dec = tok.decode_stream()
    assert dec.push(ids[0]) == ""
    assert dec.flush() == tok.decode(ids) == "\ufffd"


# --- token bytes ------------------------------------------------------------------------------------


def test_token_bytes(tok: Tokenizer, corpus: list[str]) -> None:
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    assert (tb[sorted(tok.special_token_ids)] == 0).all()
    assert (tb[: VOCAB - 6] >= 1).all()
    for text in [*VARIED[:4], corpus[0][:5000]]:
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# --- chat formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_chat_format_byte_exact(toks: dict[str, Tokenizer], name: str, gen: bool) -> None:
    body, prompt = EXPECTED[name]
    expected = body + (prompt if gen else "")
    kwargs = KWARGS.get(name, {})
    assert toks[name].apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False, **kwargs) == expected
    # The jinja template written by save renders the same bytes.
    fmt = FORMATS[name]
    specials = {"bos_token": fmt.bos, "eos_token": fmt.eos} if fmt.bos else {"eos_token": fmt.eos}
    assert render_template(fmt.template, MESSAGES, gen, specials, kwargs) == expected
    ids = toks[name].apply_chat_template(MESSAGES, add_generation_prompt=gen, **kwargs)
    assert ids == toks[name].encode(expected)
    assert toks[name].decode(ids) == expected


def test_chat_format_defaults(toks: dict[str, Tokenizer]) -> None:
    user_only = [{"role": "user", "content": "Hi"}]
    cases = {
        "llama3.1": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "chatml": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n",
    }
    for name, expected in cases.items():
        assert toks[name].apply_chat_template(user_only, add_generation_prompt=False, tokenize=False) == expected
        assert render_template(FORMATS[name].template, user_only, False, {}, {}) == expected


def test_glm4_rejects_roles_without_a_token(toks: dict[str, Tokenizer], saved: dict[str, Path]) -> None:
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(LmforgeError, match="no role tool; use one of system, user, assistant, observation"):
        toks["glm4"].apply_chat_template(bad)
    with pytest.raises(LmforgeError, match="no role tool; use one of system, user, assistant, observation"):
        Tokenizer.from_pretrained(saved["glm4"]).apply_chat_template(bad)  # the jinja path


# --- save / load / transformers parity ----------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_tokenizer():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained


@pytest.mark.parametrize("where", ["", "+config"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_transformers_loads_saved_dir_identically(
    toks: dict[str, Tokenizer], saved: dict[str, Path], auto_tokenizer, name: str, where: str
) -> None:
    ours, hf = toks[name], auto_tokenizer(saved[name + where])
    assert len(hf) == ours.vocab_size
    for text in VARIED:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == ours.encode(text, add_special_tokens=True), text
        for skip in (False, True):
            assert hf.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        ours.bos_token_id,
        ours.eos_token_id,
        ours.pad_token_id,
    )
    for gen in (True, False):
        kwargs = KWARGS.get(name, {})
        text = hf.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False, **kwargs)
        assert text == ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False, **kwargs)
        hf_ids = hf.apply_chat_template(MESSAGES, add_generation_prompt=gen, return_dict=False, **kwargs)
        assert hf_ids == ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, **kwargs)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_from_pretrained_round_trip(toks: dict[str, Tokenizer], saved: dict[str, Path], name: str) -> None:
    ours, loaded = toks[name], Tokenizer.from_pretrained(saved[name])
    attrs = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "stop_token_ids", "special_token_ids")
    assert {a: getattr(loaded, a) for a in attrs} == {a: getattr(ours, a) for a in attrs}
    assert loaded.chat_format == name and loaded.chat_template == FORMATS[name].template
    assert loaded.encode_batch(VARIED, add_special_tokens=True) == ours.encode_batch(VARIED, add_special_tokens=True)
    assert (loaded.token_bytes() == ours.token_bytes()).all()


def test_bare_tokenizer_json_detects_the_format(toks: dict[str, Tokenizer], saved: dict[str, Path], tmp_path: Path):
    for name, expected in [("llama3.1", "llama3"), ("chatml", "chatml"), ("glm4", "glm4")]:
        bare = tmp_path / name
        bare.mkdir()
        (bare / "tokenizer.json").write_bytes((saved[name] / "tokenizer.json").read_bytes())
        t = Tokenizer.from_pretrained(bare)
        assert t.chat_format == expected and t.chat_template is None
        assert t.eos_token_id == toks[name].eos_token_id and t.stop_token_ids == toks[name].stop_token_ids
        # Rendered natively (Llama 3.0 for the Llama 3 tokens: nothing says 3.1 without the config).
        assert t.apply_chat_template(MESSAGES, tokenize=False) == "".join(EXPECTED[expected])


# The published tokenizer.json files carry more special tokens than lmforge's formats, and Llama 3.0 has a
# reserved token where 3.1 has <|eom_id|>; each bare file below is shaped that way.
PUBLISHED_SHAPES = {
    "llama3": ({"<|eom_id|>": "<|reserved_special_token_4|>"}, ["<|reserved_special_token_5|>"]),
    "chatml": ({}, ["<|object_ref_start|>", "<|object_ref_end|>", "<|vision_start|>", "<|vision_pad|>"]),
    "glm4": ({}, ["<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]),
}


def _published_shape(saved: Path, out: Path, renamed: dict[str, str], extra: list[str]) -> Path:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    raw = json.loads((saved / "tokenizer.json").read_text())
    for entry in raw["added_tokens"]:
        entry["content"] = renamed.get(entry["content"], entry["content"])
    backend = RustTokenizer.from_str(json.dumps(raw))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    out.mkdir()
    backend.save(str(out / "tokenizer.json"))  # and nothing else: no tokenizer_config.json
    return out


@pytest.mark.parametrize("name", list(PUBLISHED_SHAPES))
def test_bare_published_tokenizer_json_gets_its_format_with_a_note(
    saved: dict[str, Path], tmp_path: Path, auto_tokenizer, capsys, name: str
) -> None:
    bare = _published_shape(saved[name], tmp_path / name, *PUBLISHED_SHAPES[name])
    capsys.readouterr()
    t = Tokenizer.from_pretrained(bare)
    err = capsys.readouterr().err
    assert t.chat_format == name and t.chat_template is None
    assert err.count("\n") == 1 and err.startswith(f"lmforge: warning: {bare}: no chat template"), err
    assert f"the {name} chat format, inferred from the special tokens" in err
    assert t.apply_chat_template(MESSAGES, tokenize=False) == "".join(EXPECTED[name])
    stops = {"llama3": ["<|end_of_text|>", "<|eot_id|>"], "chatml": ["<|endoftext|>", "<|im_end|>"]}
    stops["glm4"] = ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert t.stop_token_ids == [t.token_to_id(s) for s in stops[name]]
    # transformers reads the same bare directory to the same ids.
    hf = auto_tokenizer(bare)
    assert len(hf) == t.vocab_size
    for text in [*VARIED, "<|reserved_special_token_5|> <|vision_pad|> <|end_of_video|>"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == t.encode(text), text
        assert hf.decode(t.encode(text)) == t.decode(t.encode(text))


def test_no_note_when_the_format_is_known(saved: dict[str, Path], tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert Tokenizer.from_pretrained(saved["glm4"]).chat_format == "glm4"  # lmforge_chat_format says it
    (tmp_path / "tokenizer.json").write_bytes((saved["chatml"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    t = Tokenizer.from_pretrained(tmp_path)  # a template renders; the format only supplies the stop ids
    assert t.chat_format == "chatml"
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"
    assert capsys.readouterr().err == ""


def test_foreign_chat_template_renders_like_transformers(saved: dict[str, Path], tmp_path: Path, auto_tokenizer):
    # A template in the style of hub templates: named-template list, bos_token variable, namespace, tojson,
    # loop variables and whitespace control, rendered with trim_blocks/lstrip_blocks.
    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "[{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | tojson }}{% if not loop.last %}\n{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %} >{{ greeting | default('?') }}{% endif %}"
    )
    (tmp_path / "tokenizer.json").write_bytes((saved["llama3"] / "tokenizer.json").read_bytes())
    config = json.loads((saved["llama3"] / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": template}, {"name": "other", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_pretrained(tmp_path), auto_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": 'say "hé" <b>'}, {"role": "assistant", "content": "ok"}]
    for kwargs in ({}, {"greeting": "hello"}):
        expected = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.apply_chat_template(msgs, tokenize=False, **kwargs) == expected
    # trim_blocks ate the newline after {% if not loop.last %}; tojson kept "é" and "<b>" unescaped.
    assert expected == '<|begin_of_text|>[1] USER: "say \\"hé\\" <b>"[2] ASSISTANT: "ok" >hello'


def test_template_errors_become_lmforge_errors(saved: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved["chatml"] / "tokenizer.json").read_bytes())
    config = {"chat_template": "{{ raise_exception('only user messages, please') }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="only user messages, please"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(LmforgeError, match="not valid jinja"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


# --- errors -------------------------------------------------------------------------------------------


def test_loading_errors(tmp_path: Path, saved: dict[str, Path]) -> None:
    with pytest.raises(LmforgeError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(LmforgeError, match="has no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid tokenizer file"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((saved["llama3"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(LmforgeError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"lmforge_chat_format": "llama4"}')
    with pytest.raises(LmforgeError, match="unknown lmforge_chat_format 'llama4'"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user"}], "'content' is missing"),
        ([{"role": "user", "content": None}], "'content' is a NoneType"),
        ([{"content": "hi"}], "'role' is missing"),
        ([], "non-empty list .* got an empty list"),
        ("hello", "non-empty list .* got a str"),
        (["hello"], "message 0 is a str"),
    ],
)
def test_bad_messages(tok: Tokenizer, messages, match: str) -> None:
    with pytest.raises(LmforgeError, match=match):
        tok.apply_chat_template(messages)


def test_no_chat_format_and_no_template(saved: dict[str, Path], tmp_path: Path) -> None:
    raw = json.loads((saved["llama3"] / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|eot_id|>"]  # no longer llama3
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.chat_format is None
    with pytest.raises(LmforgeError, match="no chat template and no known chat format"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(LmforgeError, match="unknown chat format 'chat-ml'.*Did you mean: chatml"):
        t.chat_format = "chat-ml"
    t.chat_format = "chatml"  # the remedy the error names
    assert t.apply_chat_template(MESSAGES, tokenize=False) == "".join(EXPECTED["chatml"])


def test_config_fills_in_what_tokenizer_json_lacks(saved: dict[str, Path], tmp_path: Path, auto_tokenizer) -> None:
    raw = json.loads((saved["llama3"] / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|eot_id|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    config = json.loads((saved["llama3"] / "tokenizer_config.json").read_text())
    del config["bos_token"], config["eos_token"]  # now only in special_tokens_map.json...
    config["added_tokens_decoder"] = {"999": config["added_tokens_decoder"]["999"]}  # ...and eot only here
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    stm = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}  # dict and str forms
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(stm))
    ours, hf = Tokenizer.from_pretrained(tmp_path), auto_tokenizer(tmp_path)
    assert ours.token_to_id("<|eot_id|>") == 999 and 999 in ours.special_token_ids
    assert (ours.bos_token_id, ours.eos_token_id) == (994, 999)
    assert ours.stop_token_ids == [999, 995, 998]
    text = "x<|eot_id|>y<|begin_of_text|>"
    assert (
        ours.encode(text)
        == hf(text, add_special_tokens=False)["input_ids"]
        == [*ours.encode("x"), 999, *ours.encode("y"), 994]
    )


def test_training_errors(corpus: list[str]) -> None:
    with pytest.raises(LmforgeError, match=r"vocab_size=261 is too small.*vocab_size>=262"):
        Tokenizer.train(corpus, 261, chat_format="llama3")
    with pytest.raises(LmforgeError, match=r"too small.*vocab_size>=266"):
        Tokenizer.train(corpus, 100, chat_format="glm4")
    with pytest.raises(LmforgeError, match="unknown chat format 'llama'.*Did you mean: llama3"):
        Tokenizer.train(corpus, VOCAB, chat_format="llama")
    with pytest.raises(LmforgeError, match="only supports"):
        Tokenizer.train(["tiny text, tiny text"], VOCAB)
    with pytest.raises(LmforgeError, match="not a single str"):
        Tokenizer.train("some text", VOCAB)
    assert Tokenizer.train([], 262).vocab_size == 262  # exactly the bytes and the specials
