"""Evaluation next to the reference libraries on one tiny random checkpoint: lmforge's lm-eval adapter
(`LmforgeLM`) against lm-eval's own HuggingFace backend (`HFLM`) request by request, and rolling perplexity
with stride < window against transformers' strided-perplexity recipe and lm-eval's rolling windows."""

from __future__ import annotations

import pytest
import torch
from conftest import load_hf, randomize_
from lm_eval.api.instance import Instance  # lm-eval is in the dev extra: a missing one fails, never skips
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.eval.harness import LmforgeLM
from lmforge.eval.perplexity import text_perplexity
from lmforge.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Paris is the capital of France, and Berlin is the capital of Germany. Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
    "Hello world, hello again, world of words and worlds; words are worlds and worlds are words.",
]
MAX_LEN = 32  # small enough that the texts need several windows and long contexts are cut from the left
# A one-token misalignment moves a sum of log-probs by nats (see the controls below); float32 sums over a
# few dozen tokens agree to ~1e-5.
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random llama with a real (Llama 3 style, BOS-adding) tokenizer, as an HF directory."""
    tok = Tokenizer.train(TEXTS * 20, 300, "llama3", min_frequency=1)
    config = ModelConfig.from_preset("tiny-llama").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tuple(tok.stop_token_ids)
    )
    with torch.no_grad():
        model = randomize_(Transformer(config), std=0.2).eval()
    path = tmp_path_factory.mktemp("refmodel")
    lmforge.save_pretrained(model, path)
    tok.save(path)
    return path, tok


@pytest.fixture(scope="module")
def models(checkpoint):
    """(lmforge's, transformers') reading of the checkpoint."""
    path, _ = checkpoint
    return lmforge.load_pretrained(path).eval(), load_hf(path)


@pytest.fixture(scope="module")
def backends(checkpoint):
    """(lmforge's adapter, lm-eval's HF backend) on the same directory; HFLM loads it with transformers.
    HFLM runs one request at a time (its simplest path); lmforge batches them."""
    path, _ = checkpoint
    ours = LmforgeLM(pretrained=str(path), batch_size=4, max_length=MAX_LEN, dtype="float32")
    theirs = HFLM(pretrained=str(path), device="cpu", batch_size=1, max_length=MAX_LEN, dtype="float32")
    return ours, theirs


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def greedy_request(hflm: HFLM) -> tuple[str, str]:
    """A (context, continuation) pair whose continuation is one token, the model's argmax after the context
    (found with transformers alone), so that the greedy flag has a True case to agree on."""
    for text in TEXTS:
        words = text.split(" ")
        for n in range(1, len(words)):
            context = " ".join(words[:n])
            ids = hflm.tok_encode(context)
            with torch.no_grad():
                best = int(hflm.model(torch.tensor([ids])).logits[0, -1].argmax())
            piece = hflm.tokenizer.decode([best])
            if piece.strip() and piece.isprintable() and hflm._encode_pair(context, piece) == (ids, [best]):
                return context, piece
    raise AssertionError("no context whose greedy next token is a printable, re-encodable piece")


def test_loglikelihood_equals_lm_evals_hf_backend(backends):
    ours, theirs = backends
    args = [
        ("The quick brown", " fox jumps"),
        ("Paris is the cap", "ital of France"),  # the split falls inside a word
        ("Hello wor", "ld, hello again"),  # inside a word again
        ("def add(a, b):\n    ", "return a + b"),  # trailing whitespace moves to the continuation
        ("", "Hello world"),  # empty context: both use the BOS token as the context
        ("The quick", " brown fox"),  # one context, two continuations: lmforge's shared-KV-cache path
        ("The quick", " lazy dog"),
        (TEXTS[0] + TEXTS[1], " Berlin"),  # longer than MAX_LEN: the context is cut from the left
        greedy_request(theirs),
    ]
    reqs = requests("loglikelihood", args)
    got = ours.loglikelihood(reqs, disable_tqdm=True)
    want = theirs.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert True in [g for _, g in want] and False in [g for _, g in want]  # the flags are not all alike
    for (ctx, cont), (lp, _), (ref, _) in zip(args, got, want, strict=True):
        assert lp == pytest.approx(ref, abs=TOL), (ctx, cont)
    # Control: the same continuation lengths scored one token too early (the last context token becomes
    # the first scored one) by lm-eval itself moves every sum far outside TOL.
    shifted = []
    for ctx, cont in args:
        ctx_ids, cont_ids = theirs._encode_pair(ctx, cont) if ctx else ([theirs.prefix_token_id], None)
        if cont_ids is None or len(ctx_ids) < 2:
            continue
        shifted.append(((ctx, cont), ctx_ids[:-1], [ctx_ids[-1], *cont_ids[:-1]]))
    moved = theirs._loglikelihood_tokens(shifted, disable_tqdm=True)
    for (key, *_), (lp, _) in zip(shifted, moved, strict=True):
        ref = want[args.index(key)][0]
        assert abs(lp - ref) > 100 * TOL, key


def test_loglikelihood_rolling_equals_lm_evals_hf_backend(checkpoint, backends):
    """lmforge scores a document's tokens from one prefix token (BOS): t_0 | BOS, t_1 | BOS t_0, ...
    lm-eval's HF backend encodes the document with the tokenizer's defaults, which for a BOS-adding
    tokenizer (Llama 3's) put a BOS in the document too, so it also scores log p(BOS | BOS prefix) and every
    later window is shifted by that token. `add_bos_token=False` makes HFLM encode the text bare, which is
    the same convention; with it the windows (max_length tokens of input, disjoint predictions) and the
    sums must be the same."""
    path, tok = checkpoint
    ours, theirs_default = backends
    theirs = HFLM(
        pretrained=str(path), device="cpu", batch_size=1, max_length=MAX_LEN, dtype="float32", add_bos_token=False
    )
    assert all(len(tok.encode(t)) > MAX_LEN for t in TEXTS)  # every text needs more than one window
    assert max(len(tok.encode(t)) for t in TEXTS) > 2 * MAX_LEN
    reqs = requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    got = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    want = theirs.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert got == pytest.approx(want, abs=TOL)
    # The difference the comment describes is real: HFLM's default scores one more token (and shifts the
    # windows), so comparing against it would compare different quantities.
    default = theirs_default.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert all(abs(g - d) > 0.1 for g, d in zip(got, default, strict=True))


def test_generate_until_equals_lm_evals_hf_backend(backends):
    """Greedy generation from the same prompts (both start the prompt with BOS) gives the same text; a stop
    string cuts both at the same place."""
    ours, theirs = backends
    # The first prompt's greedy continuation ends after two tokens with a stop token (<|eom_id|>): both stop.
    contexts = ["The quick brown", "def add(a, b):", "Hello", "The lazy"]
    free = requests("generate_until", [(c, {"until": [], "max_gen_toks": 12, "do_sample": False}) for c in contexts])
    want_free = theirs.generate_until(free, disable_tqdm=True)
    assert ours.generate_until(free, disable_tqdm=True) == want_free
    assert len(want_free[0]) < 6 and all(len(t) > 10 for t in want_free[1:])
    # A stop string from the middle of each long generation: both must stop there and return the text before it.
    stops = [text[len(text) // 2 : len(text) // 2 + 2] for text in want_free[1:]]
    cut = requests(
        "generate_until",
        [(c, {"until": [s, "never-generated"], "max_gen_toks": 12}) for c, s in zip(contexts[1:], stops, strict=True)],
    )
    want_cut = theirs.generate_until(cut, disable_tqdm=True)
    assert ours.generate_until(cut, disable_tqdm=True) == want_cut
    for free_text, cut_text, stop in zip(want_free[1:], want_cut, stops, strict=True):
        assert cut_text == free_text.split(stop)[0] and len(cut_text) < len(free_text)


# --- windowed perplexity (stride < window) ----------------------------------------------------------------
def transformers_strided_nll(hf, seq: list[int], window: int, stride: int) -> tuple[float, int]:
    """transformers' "perplexity of fixed-length models" recipe: windows of `window` tokens starting every
    `stride` tokens; each window's labels are -100 except the tokens the previous window did not score, and
    the model's own loss (`labels=`) averages over them. The docs multiply that mean by `valid - 1` for the
    label shift, which is exact only in the first window (where label 0 is valid); later windows' label 0 is
    already -100, so the tokens the loss averaged over are counted directly."""
    ids = torch.tensor([seq])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window, ids.shape[1])
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target).loss
        scored = int((target[:, 1:] != -100).sum())  # the labels the shifted loss averaged over
        nll += float(loss) * scored
        count += scored
        prev_end = end
        if end == ids.shape[1]:
            break
    return nll, count


def texts_whose_last_window_is_full(tok, max_length: int, stride: int) -> list[str]:
    """Word-boundary prefixes of the texts with n tokens, n - max_length a positive multiple of stride (the
    recipe's last window is then a full one; see lmforge.eval.perplexity's docstring for the shorter case)."""
    out = []
    for text in TEXTS:
        words = text.split(" ")
        for k in range(len(words), 0, -1):
            n = len(tok.encode(" ".join(words[:k])))
            if n > max_length + stride and (n - max_length) % stride == 0:
                out.append(" ".join(words[:k]))
                break
    return out


@pytest.mark.parametrize("max_length, stride", [(15, 4), (16, 6)])  # max_length % stride != 0 on purpose
def test_strided_perplexity_equals_transformers_recipe(checkpoint, models, max_length, stride):
    """Same first-token convention on both sides: the sequence is BOS + the text's tokens (what the
    checkpoint's transformers tokenizer gives by default) and BOS itself is never scored, so t_0 is
    predicted from BOS alone. lmforge's max_length counts the tokens a window reads; the recipe's window
    also holds the label of its last prediction, so it is max_length + 1 tokens long."""
    from transformers import AutoTokenizer

    path, tok = checkpoint
    model, hf = models
    hf_tok = AutoTokenizer.from_pretrained(path)
    texts = texts_whose_last_window_is_full(tok, max_length, stride)
    assert len(texts) >= 3
    for text in texts:
        seq = hf_tok(text)["input_ids"]
        assert seq == [tok.bos_token_id, *tok.encode(text)]
        want_nll, want_tokens = transformers_strided_nll(hf, seq, max_length + 1, stride)
        got = text_perplexity(model, tok, [text], max_length=max_length, stride=stride, batch_size=3)
        assert got.tokens == want_tokens == len(seq) - 1
        assert got.nll == pytest.approx(want_nll, abs=1e-3, rel=1e-5)


@pytest.mark.parametrize("max_length, stride", [(15, 4), (16, 6)])
def test_strided_perplexity_equals_lm_evals_rolling_windows(checkpoint, models, max_length, stride):
    """Any text length (a last window shorter than the stride included): lm-eval's own rolling windows with
    context_len = max_length - stride + 1, made disjoint, scored with transformers, give lmforge's sums."""
    _, tok = checkpoint
    model, hf = models
    for text in TEXTS[:2]:
        ids = tok.encode(text)
        windows = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(ids, tok.bos_token_id, max_length, max_length - stride + 1)
        ]
        assert len(windows) >= 3
        want = 0.0
        for ctx, cont in windows:
            inp = (ctx + cont)[:-1]
            assert len(inp) <= max_length
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([inp])).logits[0, -len(cont) :].float(), -1)
            want -= float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
        got = text_perplexity(model, tok, [text], max_length=max_length, stride=stride, batch_size=3)
        assert got.tokens == sum(len(c) for _, c in windows) == len(ids)
        assert got.nll == pytest.approx(want, abs=1e-3, rel=1e-5)
