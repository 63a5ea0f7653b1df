"""GGUF in and out, against the references: transformers' GGUF loader (llama, qwen2) and the gguf package.

- lmforge's export is read by transformers with the same logits (f32) or the logits of the same weights
  quantized by the gguf package (q8_0, q4_0), and its embedded tokenizer gives the same ids;
- files written here directly with gguf.GGUFWriter (names from gguf's own HF -> GGUF map, Q8_0 / Q4_0 /
  a Q4_K tensor) are read by lmforge exactly as transformers and gguf.quants read them;
- glm4 (no transformers GGUF loader): the exact llama.cpp tensor names and keys, and round trips;
- `lmforge convert` both ways, and its one-line errors.

Besides these, the exports were loaded by llama.cpp itself (llama-cpp-python 0.3.36, benchmarks/llamacpp.py's
build): f32 logits within 1.1e-6 of lmforge's for tiny-llama (Llama 3 rope_freqs), tiny-qwen2 and tiny-glm4,
with the same token ids; benchmarks/llamacpp.py checks that parity where llama.cpp can be built.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hf_logits, load_hf, make_hf_model, max_diff, our_logits, random_ids

import lmforge
from lmforge import LmforgeError, Tokenizer
from lmforge.chat_formats import FORMATS
from lmforge.checkpoint.gguf_read import gguf_to_hf, read_gguf_config
from lmforge.checkpoint.gguf_write import save_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
Q = gguf.GGMLQuantizationType

VOCAB = 512  # model rows; the tokenizers have fewer tokens, so the file also carries padding rows
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Numbers 1234567 and 3.14159, dates 2024-07-26.",
    "Unicode: héllo wörld, 日本語, emoji 😀👍🏽, zero\x00byte\ttab\r\n",
    "   leading and trailing spaces   ",
    "special strings in text: <|eot_id|> <|im_end|>[gMASK]<sop><|user|> <|endoftext|>x",
]


# transformers' GGUF reader builds a GPT2Tokenizer, which adds GPT-2's "<|endoftext|>" as a token of its own
# when the vocabulary has none (Llama 3's): that string in text then gets an id past the vocabulary. Texts
# compared with it leave the string out; lmforge's own reading is checked on all of TEXTS.
def for_transformers(texts: list[str], tok: Tokenizer) -> list[str]:
    return texts if tok.token_to_id("<|endoftext|>") is not None else [t.replace("<|endoftext|>", "") for t in texts]


NOT_NFC = "combining e\u0301 and a\u0308"  # Qwen's NFC step changes this text; GGUF readers have none
FORMAT = {"llama": "llama3", "qwen2": "chatml", "glm4": "glm4"}


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    corpus, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        corpus.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(corpus[-1])
        if size > 100_000:
            break
    return {fmt: Tokenizer.train(corpus, 480, chat_format=fmt) for fmt in FORMAT.values()}


def hf_gguf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="sdpa", dtype=torch.float32
    ).eval()


def hf_gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def tensor_types(path: Path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def tensor_data(path: Path, name: str) -> torch.Tensor:
    """A tensor of the file as gguf.quants dequantizes it."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def field(path: Path, key: str):
    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


# --- lmforge export -> transformers ---------------------------------------------------------------------
EXPORTS = {
    "llama-llama3rope-tied": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
}


def with_llamacpp_rope(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """transformers' GGUF loader ignores rope_freqs; apply it as llama.cpp does (base frequency / factor)."""
    factors = tensor_data(path, "rope_freqs.weight")
    rotary = model.model.rotary_emb
    base, _ = rotary.compute_default_rope_parameters(model.config)
    rotary.inv_freq = base / factors
    return model


@pytest.mark.parametrize("case", list(EXPORTS))
def test_transformers_reads_the_f32_export(case: str, toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    family, kw = EXPORTS[case]
    hf = make_hf_model(family, tmp_path / "hf", vocab_size=VOCAB, **kw)
    ours = lmforge.load_pretrained(tmp_path / "hf")
    tok = toks[FORMAT[family]]
    path = save_gguf(ours, tmp_path / "m.gguf", tokenizer=tok)
    ids = random_ids(2, 23, vocab=VOCAB)

    names = set(tensor_types(path))
    assert ("output.weight" in names) == (not kw["tie_word_embeddings"])
    loaded = hf_gguf(path)
    assert loaded.config.tie_word_embeddings == kw["tie_word_embeddings"]
    if "rope_scaling" in kw:
        # The file's rope_freqs are exactly transformers' Llama 3 table divided into the base one.
        base, _ = hf.model.rotary_emb.compute_default_rope_parameters(hf.config)
        factors = tensor_data(path, "rope_freqs.weight")
        torch.testing.assert_close(factors, base / hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
        assert max_diff(hf_logits(loaded, ids), hf_logits(hf, ids)) > 1e-3  # rope_freqs matters here
        loaded = with_llamacpp_rope(loaded, path)
    assert max_diff(hf_logits(loaded, ids), our_logits(ours, ids)) < 1e-5
    assert max_diff(hf_logits(loaded, ids), hf_logits(hf, ids)) < 1e-5

    hf_tok = hf_gguf_tokenizer(path)
    for text in for_transformers(TEXTS + ([NOT_NFC] if family != "qwen2" else []), tok):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf_tok(text)["input_ids"] == tok.encode(text, add_special_tokens=True), text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def fake_quantized(model: lmforge.Transformer, qtype: Q) -> lmforge.Transformer:
    """`model` with the weights the exporter quantizes replaced by gguf's quantize -> dequantize round trip."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    state = {}
    for name, w in model.state_dict().items():
        if w.ndim == 2 and w.shape[1] % block == 0:  # row permutations (llama Q/K) commute with this
            w = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
        state[name] = w
    out = lmforge.Transformer(model.config)
    out.load_state_dict(state)
    return out.eval()


@pytest.mark.parametrize("family, quant", [("llama", "q8_0"), ("llama", "q4_0"), ("qwen2", "q8_0")])
def test_transformers_reads_the_quantized_export(family: str, quant: str, tmp_path: Path) -> None:
    # intermediate 80: down_proj rows (80 columns) do not split into 32-blocks and must stay f32
    make_hf_model(family, tmp_path / "hf", vocab_size=VOCAB, intermediate_size=80, tie_word_embeddings=False)
    ours = lmforge.load_pretrained(tmp_path / "hf")
    path = save_gguf(ours, tmp_path / f"m-{quant}.gguf", quant=quant)
    qtype = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == qtype
    assert types["blk.0.ffn_gate.weight"] == qtype and types["blk.0.ffn_down.weight"] == Q.F32
    assert {types[n] for n in types if n.endswith(("norm.weight", ".bias"))} == {Q.F32}

    ids = random_ids(2, 23, vocab=VOCAB)
    theirs = hf_logits(hf_gguf(path), ids)
    expected = our_logits(fake_quantized(ours, qtype), ids)
    exact = our_logits(ours, ids)
    # Reading the file gives the gguf package's quantization of these weights, to float rounding; the
    # quantization error itself is orders of magnitude larger.
    assert max_diff(theirs, expected) < 1e-4
    assert max_diff(expected, exact) > 100 * max_diff(theirs, expected)
    assert max_diff(our_logits(lmforge.load_pretrained(path), ids), expected) < 1e-5


# --- files written directly with gguf.GGUFWriter -> lmforge == transformers -------------------------------
def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (REFERENCE.md section 9), written out independently of lmforge."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_k_bytes(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random but valid Q4_K blocks (the gguf package can dequantize K-quants, not make them)."""
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_K]
    raw = np.random.default_rng(seed).integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # super-block scale d
    raw[:, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # super-block min dmin
    return raw.reshape(rows, cols // block * size)


def write_reference_gguf(hf: torch.nn.Module, tok: Tokenizer, path: Path, pre: str, types: dict[str, Q]) -> None:
    """A GGUF file in llama.cpp's conventions, built from the HF model with the gguf package alone."""
    c, arch = hf.config, hf.config.model_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads(tok.backend.to_str())
    tokens = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    # llama.cpp's converter pads the list to the embedding's rows with unused [PAD<id>] tokens
    padding = [f"[PAD{i}]" for i in range(len(tokens), c.vocab_size)]
    writer.add_token_list(sorted(tokens, key=tokens.get) + padding)
    writer.add_token_types([3 if i in special else 1 for i in sorted(tokens.values())] + [5] * len(padding))
    writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tok.eos_token_id)
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    writer.add_add_bos_token(tok.bos_token_id is not None)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, w in hf.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        gname, data = f"{names.get_name(base)}.{suffix}", w.numpy()
        if arch == "llama" and ".q_proj." in name:
            data = permute(data, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            data = permute(data, c.num_key_value_heads)
        qtype = types.get(gname, types["2d"] if data.ndim == 2 else Q.F32)
        if qtype == Q.Q4_K:
            writer.add_tensor(gname, q4_k_bytes(*data.shape, seed=len(gname)), raw_dtype=Q.Q4_K)
        elif qtype in (Q.F32, Q.F16):
            writer.add_tensor(gname, data.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


REFERENCE_FILES = {
    # llama: Q8_0 matrices, a K-quant down_proj, an F16 embedding; GQA 4/2 heads exercises K's permutation
    "llama": ("llama-bpe", {"2d": Q.Q8_0, "blk.1.ffn_down.weight": Q.Q4_K, "token_embd.weight": Q.F16}),
    "qwen2": ("qwen2", {"2d": Q.Q4_0}),
}


@pytest.mark.parametrize("family", list(REFERENCE_FILES))
def test_import_equals_transformers_gguf_loader(family: str, toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    pre, types = REFERENCE_FILES[family]
    # intermediate 256: one Q4_K super-block per down_proj row
    hf = make_hf_model(family, vocab_size=VOCAB, intermediate_size=256, tie_word_embeddings=False)
    tok = toks[FORMAT[family]]
    path = tmp_path / "ref.gguf"
    write_reference_gguf(hf, tok, path, pre, types)

    ours, theirs = lmforge.load_pretrained(path), hf_gguf(path)
    ids = random_ids(2, 23, vocab=VOCAB)
    assert max_diff(our_logits(ours, ids), hf_logits(theirs, ids)) < 1e-5
    assert ours.config.tie_embeddings is False and ours.config.vocab_size == VOCAB
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    if family == "llama":  # the K-quant tensor is gguf's dequantization of its bytes, exactly
        k = reader["blk.1.ffn_down.weight"]
        assert k.tensor_type == Q.Q4_K
        expected = torch.from_numpy(gguf.quants.dequantize(k.data, Q.Q4_K))
        assert torch.equal(ours.layers[1].mlp.down_proj.weight, expected)
        assert torch.equal(theirs.model.layers[1].mlp.down_proj.weight, expected)
        # Q8_0 q_proj read back in transformers' row order: within Q8_0 error of the original
        assert max_diff(ours.layers[0].attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight) < 2e-3

    ours_tok, their_tok = Tokenizer.from_pretrained(path), hf_gguf_tokenizer(path)
    assert ours_tok.vocab_size == VOCAB  # with the padding rows, as the file lists them
    for text in TEXTS:
        assert ours_tok.encode(text) == tok.encode(text), text
        assert ours_tok.decode(ours_tok.encode(text)) == text
    for text in for_transformers(TEXTS, tok):
        assert ours_tok.encode(text) == their_tok(text, add_special_tokens=False)["input_ids"], text
        assert ours_tok.encode(text, add_special_tokens=True) == their_tok(text)["input_ids"], text
    assert (ours_tok.bos_token_id, ours_tok.eos_token_id) == (their_tok.bos_token_id, their_tok.eos_token_id)
    if family == "qwen2":
        # lmforge keeps Qwen's NFC step (as the HF tokenizer and lmforge's chatml tokenizers do); the GGUF
        # readers of transformers and llama.cpp skip it, so they differ on text that is not NFC.
        assert ours_tok.encode(NOT_NFC) == tok.encode(NOT_NFC)


# --- glm4: llama.cpp's names and keys; round trips ------------------------------------------------------
def test_glm4_export_names_keys_and_round_trips(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    hf = make_hf_model("glm4", tmp_path / "hf", vocab_size=VOCAB, head_dim=32, partial_rotary_factor=0.5)
    ours = lmforge.load_pretrained(tmp_path / "hf")
    tok = toks["glm4"]
    path = save_gguf(ours, tmp_path / "glm4.gguf", tokenizer=tok)

    T = gguf.MODEL_TENSOR
    per_layer = [T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_POST_NORM]
    per_layer += [T.FFN_NORM, T.FFN_UP, T.FFN_DOWN, T.FFN_POST_NORM]
    assert set(per_layer) <= set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GLM4])
    expected = {gguf.TENSOR_NAMES[t] + ".weight" for t in (T.TOKEN_EMBD, T.OUTPUT_NORM, T.OUTPUT)}
    for i in range(2):
        expected |= {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in per_layer}
        expected |= {f"blk.{i}.attn_{p}.bias" for p in "qkv"}
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(path).tensors}
    assert set(shapes) == expected
    assert shapes["blk.0.ffn_up.weight"] == (64, 2 * 128)  # ggml order: [n_embd, 2 * n_ff], gate then up
    assert torch.equal(tensor_data(path, "blk.0.ffn_up.weight"), hf.model.layers[0].mlp.gate_up_proj.weight)

    keys = {
        "general.architecture": "glm4",
        "glm4.rope.dimension_count": 16,  # head_dim 32 * partial_rotary_factor 0.5
        "glm4.attention.key_length": 32,
        "glm4.attention.value_length": 32,
        "glm4.attention.head_count": 4,
        "glm4.attention.head_count_kv": 2,
        "glm4.block_count": 2,
        "glm4.embedding_length": 64,
        "glm4.feed_forward_length": 128,
        "glm4.context_length": 128,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "glm4",
        "tokenizer.ggml.eot_token_id": tok.token_to_id("<|user|>"),
        "tokenizer.ggml.eos_token_id": tok.token_to_id("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: field(path, k) for k in keys} == keys
    assert field(path, "glm4.rope.freq_base") == hf.config.rope_parameters["rope_theta"]
    assert field(path, "tokenizer.chat_template") == FORMATS["glm4"].template

    ids = random_ids(2, 23, vocab=VOCAB)
    back = lmforge.load_pretrained(path)
    assert back.config == ours.config.replace(pad_token_id=tok.pad_token_id, eos_token_id=back.config.eos_token_id)
    assert torch.equal(our_logits(back, ids), our_logits(ours, ids))
    out, has_tokenizer = gguf_to_hf(path, tmp_path / "back")
    assert has_tokenizer
    assert type(load_hf(out)).__name__ == "Glm4ForCausalLM"
    assert max_diff(hf_logits(load_hf(out), ids), hf_logits(hf, ids)) < 1e-5
    back_tok = Tokenizer.from_pretrained(out)
    for text in TEXTS:
        assert back_tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
    messages = [{"role": "user", "content": "Hi!"}]
    assert back_tok.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert back_tok.stop_token_ids == tok.stop_token_ids


def test_round_trips_keep_the_config(tmp_path: Path) -> None:
    """Every lmforge knob the three families use comes back from the file, Llama 3 scaling included."""
    for preset in ("tiny-llama", "tiny-qwen2", "tiny-glm4"):
        config = lmforge.ModelConfig.from_preset(preset)
        model = lmforge.Transformer(config).eval()
        path = save_gguf(model, tmp_path / f"{preset}.gguf", quant="f16")
        back = read_gguf_config(path)
        assert back == config, preset
        loaded = lmforge.load_pretrained(path, dtype="bfloat16")
        assert loaded.embed.weight.dtype == torch.bfloat16
    assert tensor_types(tmp_path / "tiny-qwen2.gguf")["token_embd.weight"] == Q.F16


def test_exporter_refusals(tmp_path: Path) -> None:
    glm = lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-glm"))
    with pytest.raises(LmforgeError, match="llama, qwen2, glm4"):
        save_gguf(glm, tmp_path / "glm.gguf")
    yarn = lmforge.ModelConfig.from_preset("tiny-qwen2").replace(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    )
    with pytest.raises(LmforgeError, match="yarn"):
        save_gguf(lmforge.Transformer(yarn), tmp_path / "yarn.gguf")
    with pytest.raises(LmforgeError, match="q3_k"):
        save_gguf(lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-qwen2")), tmp_path / "q.gguf", quant="q3_k")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written left behind


def test_missing_gguf_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(LmforgeError, match=r"lmforge\[gguf\]"):
        lmforge.load_pretrained(tmp_path / "x.gguf")


# --- the command line -----------------------------------------------------------------------------------
def test_cli_convert_both_ways(toks: dict[str, Tokenizer], tmp_path: Path, capsys) -> None:
    from lmforge.cli import main

    hf = make_hf_model("qwen2", tmp_path / "hf", vocab_size=VOCAB, tie_word_embeddings=True)
    toks["chatml"].save(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--quant", "q8_0"]) == 0
    assert "q8_0; tokenizer embedded" in capsys.readouterr().out
    assert tensor_types(tmp_path / "m.gguf")["token_embd.weight"] == Q.Q8_0
    # `lmforge info` reads the GGUF's metadata: the same model as the directory, and what the file stores
    for spec in (tmp_path / "hf", tmp_path / "m.gguf"):
        assert main(["info", str(spec), "--json"]) == 0
    from_dir, from_gguf = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert from_gguf["params"] == from_dir["params"] and from_gguf["config"]["family"] == "qwen2"
    kinds = [t.name for t in tensor_types(tmp_path / "m.gguf").values()]
    assert from_gguf["file"]["tensor_types"] == {k: kinds.count(k) for k in set(kinds)} and "file" not in from_dir
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    assert str(tmp_path / "back") in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "back").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == field(tmp_path / "m.gguf", "tokenizer.chat_template")
    ids = random_ids(2, 23, vocab=VOCAB)
    back = load_hf(tmp_path / "back")
    assert max_diff(hf_logits(back, ids), hf_logits(hf_gguf(tmp_path / "m.gguf"), ids)) < 1e-5
    assert 1e-4 < max_diff(hf_logits(back, ids), hf_logits(hf, ids)) < 0.5  # q8_0 error, not garbage
    messages = [{"role": "user", "content": "Hi!"}]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == toks[
        "chatml"
    ].apply_chat_template(messages, tokenize=False)
    # a preset, random weights, straight to GGUF (no tokenizer to embed)
    assert main(["convert", "tiny-llama", str(tmp_path / "r.gguf"), "--quant", "q4_0"]) == 0
    assert "no tokenizer" in capsys.readouterr().out
    assert field(tmp_path / "r.gguf", "tokenizer.ggml.model") == "none"


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from lmforge.cli import main

    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    make_hf_model("llama", tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bars
    cases = {
        ("convert", str(tmp_path / "bad.gguf"), str(tmp_path / "o1")): "not a readable GGUF",
        ("convert", str(tmp_path / "gpt2.gguf"), str(tmp_path / "o2")): "architecture 'gpt2'",
        ("convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o3")): "does not exist",
        ("convert", str(tmp_path / "hf"), str(tmp_path / "o4.gguf"), "--quant", "q3_k"): "q8_0",
        ("convert", str(tmp_path / "hf"), str(tmp_path / "o5"), "--quant", "q8_0"): "GGUF output",
        ("convert", str(tmp_path / "hf"), str(tmp_path / "o6.gguf"), "--dtype", "bf16"): "--quant",
        ("convert", "tiny-glm", str(tmp_path / "o7.gguf")): "glm4",
    }
    for argv, words in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmforge convert: error: ") and words in err, (argv, err)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
    assert main(["info", str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lmforge info: error: " in err and "not a readable GGUF" in err, err
    # (tests/test_errors.py runs the CLI as a process: an LmforgeError is one line on stderr and exit 2)
