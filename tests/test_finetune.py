"""Fine-tuning: SFT loss masks per chat format, packing, SFT / DPO / distillation runs, bad data, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_

import lmforge
from lmforge import LmforgeError, ModelConfig, Transformer
from lmforge.data import prepare
from lmforge.finetune.config import DistillConfig, DPOConfig, SFTConfig
from lmforge.finetune.dpo import dpo, dpo_loss
from lmforge.finetune.sft import finetune
from lmforge.finetune.sft_data import SFTLoader, read_conversations, render, tokenize_conversations
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.objectives import IGNORE_INDEX

CORPUS = [
    f"The answer to question {i} is {i * 7 % 13}. Hello world, how are you today? Fine, thanks! " * 3 for i in range(40)
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine, thanks"},
]
# What each format trains on, per REFERENCE.md section 3: the assistant text and the token that ends the turn.
TRAINED = {
    "llama3": "hello<|eot_id|>fine, thanks<|eot_id|>",
    "chatml": "hello<|im_end|>\nfine, thanks<|im_end|>\n",
    "glm4": "\nhello<|user|>\nfine, thanks<|endoftext|>",
}


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {fmt: Tokenizer.train(CORPUS, 290, fmt, min_frequency=1) for fmt in TRAINED}


@pytest.mark.parametrize("fmt", list(TRAINED))
def test_loss_mask_token_by_token(tokenizers, fmt):
    tok = tokenizers[fmt]
    ex = render(tok, CONVERSATION)
    full = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert ex.ids[: len(full)] == full  # the rendered conversation, plus EOS where the format has no end token
    trained = [t for t, label in zip(ex.ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ex.ids, ex.labels, strict=True))
    assert tok.decode(trained) == TRAINED[fmt]
    # Every trained stretch is exactly an assistant turn: nothing from the system or user turns leaks in.
    assert "hi" not in tok.decode(trained).replace("thanks", "") and "Be brief" not in tok.decode(trained)


def test_instruction_format_and_bad_data(tmp_path):
    good = tmp_path / "inst.jsonl"
    good.write_text(json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}) + "\n")
    assert read_conversations(good) == [
        [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    ]
    cases = {
        '{"messages": [{"role": "user", "content": "hi"}]}\n': "no assistant turn",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n': "content",
        '{"messages": [{"role": "robot", "content": "x"}]}\n': "unknown role",
        '{"text": "x"}\n': "expected 'messages'",
        '{"instruction": "a", "output": "b"}\n{broken\n': ":2",
    }
    for text, words in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(LmforgeError, match=words):
            read_conversations(bad)


def test_too_long_examples_are_truncated_or_skipped(tokenizers):
    tok = tokenizers["llama3"]
    limit = len(render(tok, CONVERSATION).ids) + 5
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 80}]
    convs = [CONVERSATION, long]
    examples, report = tokenize_conversations(tok, convs, limit, "truncate")
    assert report.truncated == 1 and report.skipped == 0 and max(len(e.ids) for e in examples) == limit
    examples, report = tokenize_conversations(tok, convs, limit, "skip")
    assert report.skipped == 1 and len(examples) == 1


def test_packing_keeps_examples_apart(tokenizers):
    tok = tokenizers["llama3"]
    examples, _ = tokenize_conversations(tok, [CONVERSATION, CONVERSATION[:3], CONVERSATION[1:3]], 200)
    loader = SFTLoader(examples, batch_size=1, seq_len=250, pad_id=tok.eos_token_id, shuffle=False)
    batch = next(loader)
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) >= 3  # three packed examples (and padding, which restarts too)
    # A packed row gives each example the logits it gets alone: attention never crosses an example.
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama").replace(vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"])
        second = examples[1].ids
        begin = starts[1]
        alone = model(torch.tensor([second]))
    assert torch.allclose(packed[0, begin : begin + len(second)], alone[0], atol=1e-5)
    labels = batch["labels"][0].tolist()
    assert labels[: len(examples[0].ids) - 1] == examples[0].labels[1:]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizers) -> Path:
    tok = tokenizers["llama3"]
    config = ModelConfig.from_preset("tiny-llama").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tuple(tok.stop_token_ids)
    )
    with torch.no_grad():
        model = randomize_(Transformer(config), std=0.05)
    path = tmp_path_factory.mktemp("chatmodel")
    lmforge.save_pretrained(model, path)
    tok.save(path)
    return path


def write_chats(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}?"},
                    {"role": "assistant", "content": f"The answer to question {i} is {i * 7 % 13}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_cfg(**kw) -> TrainConfig:
    base = dict(steps=30, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=3, eval_every=0, save_every=0)
    base["dtype"] = "float32"  # exact comparisons; `auto` would pick bf16 on some machines
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def test_sft_learns_the_assistant_turns(tmp_path, chat_model):
    data = write_chats(tmp_path / "chat.jsonl")
    cfg = small_cfg(eval_every=10)
    out = finetune(chat_model, data, tmp_path / "run", cfg, SFTConfig(val_fraction=0.1), progress=False)
    series = losses(tmp_path / "run")
    assert sum(series[-5:]) / 5 < 0.6 * sum(series[:3]) / 3
    assert out.data.trained_tokens < out.data.tokens  # the prompts are not trained
    val = losses(tmp_path / "run", "val_loss")  # the held-out conversations at steps 10, 20 and 30
    assert len(val) == 3 and val[-1] == out.result.val_loss
    assert val[-1] < 0.8 * val[0]  # the held-out loss itself fell (2.29 -> 1.09 here), not only the training loss
    reloaded = lmforge.load_pretrained(out.result.checkpoint)
    assert (out.result.checkpoint / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(reloaded(ids), out.start.model.eval()(ids), atol=1e-6)


def test_dpo_loss_equals_a_hand_computation():
    policy = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])
    reference = torch.tensor([[-3.5, -4.5], [-4.0, -3.0]])
    beta = 0.2
    losses_, stats = dpo_loss(policy, reference, beta, "sigmoid")
    logits = [(-3.0 + 5.0) - (-3.5 + 4.5), (-4.0 + 2.0) - (-4.0 + 3.0)]  # [1.0, -1.0]
    expected = [-math.log(1 / (1 + math.exp(-beta * x))) for x in logits]
    assert losses_.tolist() == pytest.approx(expected)
    assert float(stats["preference_accuracy"]) == 1.0  # pair 1: chosen reward 0.1 > -0.1; pair 2: 0 < 0.2
    assert float(stats["reward_margin"]) == pytest.approx(beta * (1.0 + -1.0))
    ipo, _ = dpo_loss(policy, reference, beta, "ipo")
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in logits])


def test_dpo_margin_grows(tmp_path, chat_model):
    rows = [
        {
            "prompt": f"question {i}?",
            "chosen": f"The answer to question {i} is {i * 7 % 13}.",
            "rejected": "Hello world, how are you today?",
        }
        for i in range(16)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = small_cfg(steps=25, lr=1e-3)
    dpo(chat_model, data, tmp_path / "run", cfg, DPOConfig(beta=0.1, val_fraction=0.0), progress=False)
    margins = losses(tmp_path / "run", "reward_margin")
    accuracy = losses(tmp_path / "run", "preference_accuracy")
    assert abs(margins[0]) < 1e-4  # the policy starts as the reference
    assert sum(margins[-5:]) / 5 > 0.5 and sum(accuracy[-5:]) / 5 > 0.9
    with pytest.raises(LmforgeError, match="beta"):
        dpo(chat_model, data, tmp_path / "other", small_cfg(), DPOConfig(beta=0.0), progress=False)


def test_distillation_drives_the_kl_down(tmp_path, chat_model, tokenizers):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(CORPUS):
        (corpus / f"{i}.txt").write_text(text)
    prepare([str(corpus)], Tokenizer.from_pretrained(chat_model), tmp_path / "data", val_fraction=0.1, progress=False)
    from lmforge.finetune.distill import distill

    distill(
        chat_model,
        "tiny-llama",
        tmp_path / "data",
        tmp_path / "run",
        small_cfg(steps=40, seq_len=32),
        DistillConfig(temperature=2.0, alpha=1.0),
        progress=False,
    )
    kl = losses(tmp_path / "run", "kl")
    assert sum(kl[-5:]) / 5 < 0.5 * sum(kl[:3]) / 3

    # A student directory whose tokenizer differs from the teacher's is refused. The other tokenizer is
    # trained on different text to the same size, so the vocabularies really differ while the sizes (and
    # the student model's vocab_size) match: only the tokenizer comparison can catch it.
    teacher_tok = Tokenizer.from_pretrained(chat_model)
    other_text = [f"Zebras {i} graze; xylophones jingle, kites fly above {i * 3} valleys. " * 3 for i in range(40)]
    other = Tokenizer.train(other_text, 290, "llama3", min_frequency=1)
    assert other.vocab_size == teacher_tok.vocab_size and other.get_vocab() != teacher_tok.get_vocab()
    student = tmp_path / "student"
    lmforge.save_pretrained(
        Transformer(ModelConfig.from_preset("tiny-llama").replace(vocab_size=teacher_tok.vocab_size)), student
    )
    other.save(student)
    with pytest.raises(LmforgeError, match="use different tokenizers"):
        distill(chat_model, str(student), tmp_path / "data", tmp_path / "run2", small_cfg(steps=1), progress=False)
    # Control: the same student directory with the teacher's tokenizer is accepted and trains.
    teacher_tok.save(student)
    same = distill(chat_model, str(student), tmp_path / "data", tmp_path / "run3", small_cfg(steps=1), progress=False)
    assert same.result.steps == 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env)


def test_cli_finetune_and_dpo(tmp_path, chat_model):
    data = write_chats(tmp_path / "chat.jsonl", 8)
    out = run_cli(
        "finetune",
        "--model",
        str(chat_model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "sft"),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "48",
    )
    assert out.returncode == 0, out.stderr
    assert "trained 3 steps" in out.stdout and "assistant tokens trained" in out.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    fail = run_cli("finetune", "--model", str(chat_model), "--data", str(bad), "--out", str(tmp_path / "x"))
    assert fail.returncode == 2 and "no assistant turn" in fail.stderr and "Traceback" not in fail.stderr
    prefs = tmp_path / "p.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": "q?", "chosen": "yes", "rejected": "no"}) + "\n" for _ in range(4)))
    d = run_cli(
        "dpo",
        "--model",
        str(tmp_path / "sft"),
        "--data",
        str(prefs),
        "--out",
        str(tmp_path / "dpo"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--loss",
        "ipo",
    )
    assert d.returncode == 0, d.stderr
    assert "preference accuracy" in d.stdout


def test_lora_sft_saves_adapters_and_merge_folds_them(tmp_path, chat_model):
    from lmforge.finetune.lora import LoraConfig

    data = write_chats(tmp_path / "chat.jsonl", 8)
    base = lmforge.load_pretrained(chat_model)
    out = finetune(
        chat_model,
        data,
        tmp_path / "run",
        small_cfg(steps=6),
        SFTConfig(method="lora", val_fraction=0.0),
        LoraConfig(r=4, alpha=8.0, targets=("q", "v", "down")),
        progress=False,
    )
    ckpt = out.result.checkpoint
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    assert out.start.report.trainable < 0.5 * out.start.report.total
    # Only the adapters trained: every base weight is unchanged.
    trained = out.start.model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in base.state_dict().items())
    merged_dir = tmp_path / "merged"
    cli = run_cli("finetune", "--merge", "--model", str(chat_model), "--adapter", str(ckpt), "--out", str(merged_dir))
    assert cli.returncode == 0, cli.stderr
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        expected = out.start.model.eval()(ids)
        got = lmforge.load_pretrained(merged_dir)(ids)
    assert torch.allclose(got, expected, atol=1e-5) and (merged_dir / "tokenizer.json").is_file()
    bad = run_cli(
        "finetune",
        "--model",
        str(chat_model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "bad"),
        "--method",
        "lora",
        "--lora-targets",
        "q,attention",
    )
    assert bad.returncode == 2 and "attention" in bad.stderr and "Traceback" not in bad.stderr
