"""Evaluation: log-likelihoods against transformers, rolling perplexity, multiple choice by hand, generation
metrics, the lm-evaluation-harness adapter, the CLI and bad task files."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_hf, randomize_

import lmforge
from lmforge import LmforgeError, ModelConfig, Transformer
from lmforge.eval import metrics as M
from lmforge.eval.perplexity import rolling_windows, text_perplexity
from lmforge.eval.run import EvalSettings, run_task
from lmforge.eval.scoring import encode_pair, loglikelihood, score_tokens
from lmforge.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Hello world, hello again, world of words and worlds.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model with a real tokenizer, saved as an HF directory transformers can read."""
    tok = Tokenizer.train(TEXTS * 20, 300, "llama3", min_frequency=1)
    config = ModelConfig.from_preset("tiny-llama").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tuple(tok.stop_token_ids)
    )
    with torch.no_grad():
        model = randomize_(Transformer(config), std=0.2).eval()
    path = tmp_path_factory.mktemp("evalmodel")
    lmforge.save_pretrained(model, path)
    tok.save(path)
    return model, tok, path


def hf_continuation_logprob(hf, context_ids: list[int], cont_ids: list[int]) -> float:
    ids = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits.float(), dim=-1)[0]
    n = len(context_ids)
    return sum(float(logp[n - 1 + i, t]) for i, t in enumerate(cont_ids))


def test_loglikelihood_equals_transformers_incl_splits_inside_words(setup):
    model, tok, path = setup
    hf = load_hf(path)
    requests = [
        ("The quick brown", " fox jumps"),
        ("Paris is the cap", "ital of France"),  # the split falls inside a word
        ("def add(a, b):\n    ", "return a + b"),  # trailing whitespace moves to the continuation
        ("", "Hello world"),  # empty context: the BOS token stands in
        ("Hello wor", "ld, hello again"),
    ]
    scores = loglikelihood(model, tok, requests, batch_size=2)
    for (ctx, cont), score in zip(requests, scores, strict=True):
        ctx_ids, cont_ids = encode_pair(tok, ctx, cont)
        if ctx:  # the whole string's tokens, BOS first, split after the context's own encoding
            whole = tok.encode(ctx + cont, add_special_tokens=True)
            assert ctx_ids == tok.encode(ctx.rstrip(), add_special_tokens=True) and ctx_ids[0] == tok.bos_token_id
            assert cont_ids == whole[len(ctx_ids) :]
        assert score.num_tokens == len(cont_ids)
        assert score.logprob == pytest.approx(hf_continuation_logprob(hf, ctx_ids, cont_ids), abs=1e-4)
    # Batch size does not change the numbers.
    again = loglikelihood(model, tok, requests, batch_size=5)
    assert [s.logprob for s in again] == pytest.approx([s.logprob for s in scores], abs=1e-5)


def test_a_continuation_swallowed_by_the_context_tokens_is_an_error(setup):
    _, tok, _ = setup
    context, continuation = "Hello wor", "ld"
    # This tokenizer has " wor" and " world" as single tokens, so the whole string has no more tokens than
    # the context alone: nothing is left to score. (Checked, so that the error path below really runs.)
    assert tok.decode(tok.encode(context)[-1:]) == " wor"
    assert tok.decode(tok.encode(context + continuation)[-1:]) == " world"
    assert len(tok.encode(context + continuation)) <= len(tok.encode(context))
    with pytest.raises(LmforgeError, match="vanished"):
        encode_pair(tok, context, continuation)


def test_greedy_flag(setup):
    model, tok, _ = setup
    ctx = tok.encode("The quick")
    greedy = lmforge.generate(model, ctx, max_new_tokens=3, eos_token_id=())
    other = [(greedy[0] + 1) % tok.vocab_size, *greedy[1:]]
    flags = [s.greedy for s in score_tokens(model, [(ctx, greedy), (ctx, other)])]
    assert flags == [True, False]


def test_rolling_perplexity_matches_a_direct_computation(setup):
    model, tok, path = setup
    hf = load_hf(path)
    text = TEXTS[0]
    ids = tok.encode(text)
    assert len(ids) < model.config.max_position_embeddings
    direct = -hf_continuation_logprob(hf, [tok.bos_token_id], ids)
    result = text_perplexity(model, tok, [text], batch_size=1)
    assert result.nll == pytest.approx(direct, abs=1e-3)
    assert result.tokens == len(ids) and result.bytes == len(text.encode())
    m = result.metrics()
    assert m["token_perplexity"] == pytest.approx(math.exp(direct / len(ids)), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(direct / len(text.encode()) / math.log(2), rel=1e-5)
    words = len(re.split(r"\s+", text))  # lm-evaluation-harness's word count (a trailing space adds one)
    assert m["word_perplexity"] == pytest.approx(math.exp(direct / words), rel=1e-5)
    for batch in (1, 3, 7):  # windows of 16 predicting 5 new tokens each: same number at any batch size
        small = text_perplexity(model, tok, [text], max_length=16, stride=5, batch_size=batch)
        assert small.tokens == len(ids)
        assert small.nll == pytest.approx(
            text_perplexity(model, tok, [text], max_length=16, stride=5, batch_size=2).nll, abs=1e-4
        )


def test_rolling_windows_cover_each_token_once():
    tokens = list(range(10, 33))
    for max_len, stride in [(8, 8), (8, 3), (5, 1), (30, 30)]:
        windows = rolling_windows(tokens, 1, max_len, stride)
        predicted = [t for _, cont in windows for t in cont]
        assert predicted == tokens
        for ctx, cont in windows:
            assert len(ctx) + len(cont) - 1 <= max_len and len(ctx) >= 1
            assert ctx[-1] == ([1, *tokens][[1, *tokens].index(cont[0]) - 1])
        # The very windows lm-evaluation-harness builds (context_len = max_len - stride + 1, made disjoint).
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        reference = get_rolling_token_windows(tokens, 1, max_len, max_len - stride + 1)
        assert windows == [make_disjoint_window(w) for w in reference]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC = [
    {"question": "What jumps over the lazy dog?", "choices": ["the quick brown fox", "Berlin", "a"], "answer": 0},
    {"question": "What is the capital of France?", "choices": ["Paris", "the lazy dog", "return a + b"], "answer": 0},
    {"question": "def add(a, b):", "choices": ["return a + b", "Germany"], "answer": 0},
    {"context": "Hello world, hello", "choices": ["again", "France"], "answer": 1},
]


def test_multiple_choice_matches_a_hand_computation(setup, tmp_path):
    model, tok, path = setup
    hf = load_hf(path)
    task = write_jsonl(tmp_path / "mc.jsonl", MC)
    result = run_task(model, tok, str(task), EvalSettings(batch_size=3, progress=False))
    acc = acc_norm = 0
    confidences, correct = [], []
    for ex, sample in zip(MC, result.samples, strict=True):
        context = ex.get("context") or f"Question: {ex['question']}\nAnswer:"
        lls, norms = [], []
        for choice in ex["choices"]:
            cont = " " + choice
            ctx_ids, cont_ids = encode_pair(tok, context, cont)
            lls.append(hf_continuation_logprob(hf, ctx_ids, cont_ids))
            norms.append(lls[-1] / len(cont))
        assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        pick = max(range(len(lls)), key=lls.__getitem__)
        acc += pick == ex["answer"]
        acc_norm += max(range(len(norms)), key=norms.__getitem__) == ex["answer"]
        confidences.append(math.exp(lls[pick]) / sum(math.exp(x) for x in lls))  # p(pick), over the choices
        correct.append(pick == ex["answer"])
    assert result.metrics["acc"] == acc / len(MC)
    assert result.metrics["acc_norm"] == acc_norm / len(MC)
    # ECE by hand: 10 equal-width bins (lo, hi]; per bin |accuracy - mean confidence|, weighted by its share.
    bins: dict[int, list[int]] = {}
    for i, c in enumerate(confidences):
        bins.setdefault(math.ceil(c * 10), []).append(i)
    ece = sum(
        len(m) / len(MC) * abs(sum(correct[i] for i in m) / len(m) - sum(confidences[i] for i in m) / len(m))
        for m in bins.values()
    )
    # Near-certain wrong picks here, so ECE is close to 1: the tolerance is tight enough to tell p(pick) from
    # a constant 1.0 (3e-5 away), and log-likelihoods that agree to 1e-4 move these confidences by < 1e-7.
    assert result.metrics["calibration_error"] == pytest.approx(ece, abs=1e-7)
    assert len(result.sha256) == 64


def test_fewshot_prompts_come_from_the_other_split_with_a_seed(setup, tmp_path):
    model, tok, _ = setup
    task = write_jsonl(tmp_path / "mc.jsonl", MC[:2])
    shots = write_jsonl(tmp_path / "shots.jsonl", MC[2:])
    a = run_task(model, tok, str(task), EvalSettings(num_fewshot=1, fewshot_file=str(shots), seed=1, progress=False))
    b = run_task(model, tok, str(task), EvalSettings(num_fewshot=1, fewshot_file=str(shots), seed=1, progress=False))
    zero = run_task(model, tok, str(task), EvalSettings(progress=False))
    assert a.samples == b.samples and a.samples != zero.samples
    with pytest.raises(LmforgeError, match="fewshot"):
        run_task(model, tok, str(task), EvalSettings(num_fewshot=1, progress=False))


def test_generation_metrics():
    preds = ["the cat sat on the mat", "hello world", "a b a b"]
    refs = [["the cat sat on the mat"], ["hello there world"], ["c d"]]
    assert M.exact_match(preds, refs) == pytest.approx(1 / 3)
    unigrams = {"the", "cat", "sat", "on", "mat", "hello", "world", "a", "b"}
    assert M.distinct_n(preds, 1) == pytest.approx(len(unigrams) / 12)
    assert M.distinct_n(preds, 2) == pytest.approx(
        len(
            {
                ("the", "cat"),
                ("cat", "sat"),
                ("sat", "on"),
                ("on", "the"),
                ("the", "mat"),
                ("hello", "world"),
                ("a", "b"),
                ("b", "a"),
            }
        )
        / 9
    )
    import sacrebleu
    from rouge_score import rouge_scorer

    assert M.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(scorer.score(r[0], p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)) / 3
    assert M.rouge_l(preds, refs) == pytest.approx(expected)
    assert M.self_bleu(["same text here", "same text here"]) == pytest.approx(100.0)
    assert M.expected_calibration_error([0.9, 0.9, 0.6], [True, False, True]) == pytest.approx(
        2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1 - 0.6)
    )


def test_generation_task_runs_greedy_decoding(setup, tmp_path):
    model, tok, _ = setup
    rows = [{"prompt": "The quick brown", "reference": "fox"}, {"prompt": "Paris is", "reference": ["the capital"]}]
    task = write_jsonl(tmp_path / "gen.jsonl", rows)
    result = run_task(model, tok, str(task), EvalSettings(max_new_tokens=6, batch_size=2, progress=False))
    for row, sample in zip(rows, result.samples, strict=True):
        ids = lmforge.generate(
            model, tok.encode(row["prompt"], add_special_tokens=True), max_new_tokens=6, eos_token_id=tok.stop_token_ids
        )
        assert sample["prediction"] == tok.decode(ids, skip_special_tokens=True).strip()
    assert set(result.metrics) >= {"exact_match", "bleu", "rouge_l", "distinct_1", "distinct_2", "self_bleu"}


@pytest.mark.parametrize(
    "rows, words",
    [
        ("{not json\n", ":1"),
        ('{"question": "q", "choices": ["a"], "answer": 0}\n[1, 2]\n', ":2"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', "out of range"),
        ('{"question": "q", "choices": [], "answer": 0}\n', "non-empty"),
        ('{"question": "q", "choices": ["a"], "answer": "0"}\n', "index"),
        ('{"prompt": "p"}\n', "reference"),
        ('{"foo": 1}\n', "task type"),
    ],
)
def test_bad_task_files(setup, tmp_path, rows, words):
    model, tok, _ = setup
    task = tmp_path / "bad.jsonl"
    task.write_text(rows)
    with pytest.raises(LmforgeError, match=words):
        run_task(model, tok, str(task), EvalSettings(progress=False))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env)


def test_cli_eval_writes_json_and_markdown(setup, tmp_path):
    model, tok, path = setup
    task = write_jsonl(tmp_path / "mc.jsonl", MC)
    text = tmp_path / "text.txt"
    text.write_text(TEXTS[1])
    out = run_cli("eval", "--model", str(path), "--task", str(task), "--task", str(text), "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "| mc | choice |" in out.stdout and "bits_per_byte" in out.stdout
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    expected = run_task(model, tok, str(task), EvalSettings(progress=False)).metrics["acc"]
    assert results["results"][0]["metrics"]["acc"] == expected
    assert results["results"][1]["type"] == "perplexity" and (tmp_path / "r" / "report.md").is_file()
    no_tok = tmp_path / "bare"
    lmforge.save_pretrained(model, no_tok)
    bad = run_cli("eval", "--model", str(no_tok), "--task", str(task))
    assert bad.returncode == 2 and "tokenizer" in bad.stderr and "Traceback" not in bad.stderr


def test_lm_eval_harness_runs_a_local_task_through_the_adapter(setup, tmp_path):
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401  (registers "hf")
    from lm_eval.tasks import TaskManager

    import lmforge.eval.harness  # noqa: F401  (registers "lmforge")

    model, tok, path = setup
    data = write_jsonl(tmp_path / "mc.jsonl", [r for r in MC if "question" in r])
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "local_mc.yaml").write_text(
        "task: lmforge_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    task_manager = TaskManager(include_path=str(tasks_dir))  # slow to build (it indexes every task): once
    runs = {
        name: lm_eval.simple_evaluate(
            model=name,
            model_args=f"pretrained={path},batch_size=4,{extra}",
            tasks=["lmforge_local_mc"],
            task_manager=task_manager,
            log_samples=True,
        )
        for name, extra in [("lmforge", "dtype=float32"), ("hf", "device=cpu,dtype=float32")]
    }
    adapter = runs["lmforge"]["results"]["lmforge_local_mc"]
    ours = run_task(model, tok, str(data), EvalSettings(progress=False)).metrics
    assert adapter["acc,none"] == ours["acc"] and adapter["acc_norm,none"] == ours["acc_norm"]
    # lm-eval's own HuggingFace backend on the same directory: the same metrics, from the same per-choice
    # log-likelihoods (acc alone, over 3 questions, could agree by chance).
    reference = runs["hf"]["results"]["lmforge_local_mc"]
    assert adapter["acc,none"] == reference["acc,none"] and adapter["acc_norm,none"] == reference["acc_norm,none"]

    def per_choice(run: dict) -> list[float]:
        samples = sorted(run["samples"]["lmforge_local_mc"], key=lambda x: x["doc_id"])
        return [float(r[0][0]) for x in samples for r in x["resps"]]

    assert len(per_choice(runs["hf"])) == sum(len(r["choices"]) for r in MC if "question" in r)
    assert per_choice(runs["lmforge"]) == pytest.approx(per_choice(runs["hf"]), abs=1e-4)
