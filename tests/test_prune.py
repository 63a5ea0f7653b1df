"""Pruning (lmforge.quant): magnitude and 2:4 masks, masks held through a recovery fine-tune, structured
removal of KV groups and FFN channels checked against the original model with those parts zeroed, pruned
checkpoints read by transformers with equal logits, and `lmforge prune`'s errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import max_diff, random_ids, randomize_
from test_train import corpus_texts

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.data import prepare
from lmforge.quant.prune import PROJECTIONS, PruneConfig, projections, prune, size_stats
from lmforge.quant.recover import masks_held, recover
from lmforge.tokenizer import Tokenizer

VOCAB = 300
ATOL = 2e-5  # fp32: a matmul over fewer terms sums in another order


def tiny(family: str = "llama", **kw) -> ModelConfig:
    base = ModelConfig.from_preset(f"tiny-{family}").replace(vocab_size=VOCAB, max_position_embeddings=128)
    return base.replace(**kw) if kw else base


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    return randomize_(Transformer(config), seed).eval()


def calibration(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": random_ids(2, 24, seed=100 + i, vocab=VOCAB)} for i in range(n)]


# --- unstructured ------------------------------------------------------------------------------------
def test_magnitude_zeroes_the_smallest_weights_of_each_projection_exactly():
    model = random_model(tiny())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, "magnitude", 0.3)
    assert len(result.masks) == len(PROJECTIONS) * model.config.num_layers
    for name, linear in projections(model).items():
        before, after = original[name + ".weight"], linear.weight.detach()
        zeros = after == 0
        assert int(zeros.sum()) == round(0.3 * after.numel()), name  # exact per matrix
        assert torch.equal(after[~zeros], before[~zeros])  # kept weights untouched
        assert before[zeros].abs().max() <= before[~zeros].abs().min(), name  # the smallest ones went
        assert torch.equal(result.masks[name], ~zeros)
    for key in ("embed.weight", "norm.weight", "layers.0.attn_norm.weight", "layers.1.mlp_norm.weight"):
        assert torch.equal(model.state_dict()[key], original[key]), key  # not pruned
    stats = size_stats(model)
    assert abs(stats.projection_sparsity - 0.3) < 1e-3
    assert stats.params == sum(v.numel() for v in original.values())  # tied head counted once


def test_two_four_keeps_the_two_largest_of_every_four_inputs():
    model = random_model(tiny("qwen2"))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, "2:4")
    for name, linear in projections(model).items():
        w, before = linear.weight.detach(), original[name + ".weight"]
        groups = w.reshape(w.shape[0], -1, 4)  # [O, I/4, 4]
        assert bool(((groups != 0).sum(-1) == 2).all()), name
        top2 = before.abs().reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices.sort(-1).values
        kept = (groups != 0).nonzero()[:, 2].reshape(top2.shape)
        assert torch.equal(kept, top2), name


def test_activation_scores_are_wanda_per_row():
    model = random_model(tiny())
    magnitude = prune(random_model(tiny()), "magnitude", 0.5).masks
    result = prune(model, "magnitude", 0.5, importance="activation", calibration=calibration())
    for name, mask in result.masks.items():
        assert bool((mask.sum(1) == mask.shape[1] // 2).all()), name  # every output row at 50%
    assert any(not torch.equal(result.masks[n], magnitude[n]) for n in magnitude)  # the activations changed it


def test_masks_hold_under_any_optimizer_step():
    """The parametrization keeps pruned weights at zero even where the optimizer writes a dense update."""
    from lmforge.train.optim import build_optimizer

    model = random_model(tiny())
    result = prune(model, "magnitude", 0.5)
    model.train()
    with masks_held(model, result.masks):
        for kind in ("adamw", "muon"):
            opt = build_optimizer(model, 1e-2, weight_decay=0.1, kind=kind)
            for seed in range(2):
                ids = random_ids(2, 16, seed=seed, vocab=VOCAB)
                torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
                opt.step()
                opt.zero_grad()
    for name, mask in result.masks.items():
        assert not projections(model)[name].weight[~mask].any(), name
    assert not any(".parametrizations." in k for k in model.state_dict())  # plain parameters again


# --- data for the recovery fine-tune and the CLI (the training tests' corpus) ------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(corpus_texts()):
        (root / f"doc{i:03d}.txt").write_text(text)
    tok = Tokenizer.train(corpus_texts(), VOCAB, "llama3", min_frequency=1)
    prepare([str(root / "*.txt")], tok, root / "data", val_fraction=0.1, seed=0, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir) -> Path:
    """A tiny llama checkpoint with the data's tokenizer beside it."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    lmforge.save_pretrained(random_model(tiny(), seed=1), path)
    for f in (data_dir / "tokenizer").iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def test_recovery_fine_tune_holds_the_zeros_and_lowers_the_loss(data_dir):
    model = random_model(tiny(), seed=2)
    result = prune(model, "2:4")
    before = {n: m.weight.detach().clone() for n, m in projections(model).items()}
    cfg = PruneConfig(
        method="2:4",
        recover_steps=15,
        recover_lr=3e-3,
        recover_batch_size=4,
        recover_seq_len=32,
        recover_dtype="float32",
    )
    trained = recover(model, result.masks, data_dir, cfg, progress=False)
    losses = [r["loss"] for r in trained.history if "loss" in r]
    assert len(losses) == 15 and losses[-1] < losses[0] - 0.5, losses
    for name, linear in projections(model).items():
        mask = result.masks[name]
        assert not linear.weight[~mask].any(), name  # still 2:4
        assert not torch.equal(linear.weight[mask], before[name][mask]), name  # the kept weights trained
    assert not any(".parametrizations." in k for k in model.state_dict())


# --- structured --------------------------------------------------------------------------------------
def _matching_blocks(pruned: torch.Tensor, original: torch.Tensor, size: int) -> list[int]:
    """Which `size`-row blocks of `original` the blocks of `pruned` are, in order."""
    blocks = original.reshape(-1, size, original.shape[1])
    found = []
    for block in pruned.reshape(-1, size, pruned.shape[1]):
        found.append(next(j for j, b in enumerate(blocks) if torch.equal(b, block)))
    return found


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_removing_kv_groups_equals_zeroing_their_heads(family):
    config = tiny(family, num_heads=8, num_kv_heads=4)  # G = 2 query heads per kv head
    model = random_model(config)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, "heads", 0.5).model
    c = pruned.config
    assert (c.num_kv_heads, c.num_heads, c.head_dim) == (2, 4, config.head_dim)  # the GQA ratio holds
    G, D = config.num_kv_groups, config.head_dim
    reference = random_model(config)
    reference.load_state_dict(original)
    with torch.no_grad():
        for i, block in enumerate(pruned.layers):
            p = f"layers.{i}.attn."
            groups = _matching_blocks(block.attn.k_proj.weight, original[p + "k_proj.weight"], D)
            assert groups == sorted(groups) and len(set(groups)) == 2
            # whole groups: the kept query heads are exactly those that read the kept kv heads
            assert _matching_blocks(block.attn.q_proj.weight, original[p + "q_proj.weight"], G * D) == groups
            assert _matching_blocks(block.attn.v_proj.weight, original[p + "v_proj.weight"], D) == groups
            # the weight score chose the groups with the smallest ||V_g|| * ||O_g||
            v = original[p + "v_proj.weight"].reshape(4, -1).norm(dim=1)
            o = original[p + "o_proj.weight"].reshape(-1, 4, G * D).transpose(0, 1).reshape(4, -1).norm(dim=1)
            assert set(groups) == set((v * o).topk(2).indices.tolist())
            for g in set(range(4)) - set(groups):
                reference.layers[i].attn.o_proj.weight[:, g * G * D : (g + 1) * G * D] = 0
    ids = random_ids(2, 19, vocab=VOCAB)
    assert max_diff(pruned(ids), reference(ids)) < ATOL
    assert max_diff(pruned(ids), model(ids)) > 1e-3  # and it is not the unpruned model


@pytest.mark.parametrize("family", ["llama", "glm4"])
def test_removing_channels_equals_zeroing_their_down_columns(family):
    config = tiny(family)
    model = random_model(config)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, "channels", 0.25).model
    assert pruned.config.intermediate_size == config.intermediate_size - 40
    reference = random_model(config)
    reference.load_state_dict(original)
    with torch.no_grad():
        for i, block in enumerate(pruned.layers):
            p = f"layers.{i}.mlp."
            rows = _matching_blocks(block.mlp.gate_proj.weight, original[p + "gate_proj.weight"], 1)
            assert _matching_blocks(block.mlp.up_proj.weight, original[p + "up_proj.weight"], 1) == rows
            score = (
                original[p + "gate_proj.weight"].norm(dim=1)
                * original[p + "up_proj.weight"].norm(dim=1)
                * original[p + "down_proj.weight"].norm(dim=0)
            )
            assert set(rows) == set(score.topk(len(rows)).indices.tolist())
            removed = sorted(set(range(config.intermediate_size)) - set(rows))
            reference.layers[i].mlp.down_proj.weight[:, removed] = 0
    ids = random_ids(2, 19, vocab=VOCAB)
    assert max_diff(pruned(ids), reference(ids)) < ATOL


# (family, heads, kv heads, sparsity, heads left): qwen2 keeps 6 heads of 16 dims in a 64-wide model, so
# transformers must take head_dim from config.json; llama must keep hidden_size % heads == 0 (LlamaConfig).
STRUCTURED = [("llama", 4, 2, 0.5, 2), ("qwen2", 8, 4, 0.25, 6), ("glm4", 4, 2, 0.5, 2)]


@pytest.mark.parametrize(("family", "heads", "kv", "sparsity", "left"), STRUCTURED)
def test_structured_checkpoints_load_in_transformers_with_equal_logits(tmp_path, family, heads, kv, sparsity, left):
    from transformers import AutoModelForCausalLM

    config = tiny(family, tie_embeddings=family != "glm4", num_heads=heads, num_kv_heads=kv)
    model = random_model(config)
    model = prune(model, "heads", sparsity, importance="activation", calibration=calibration()).model
    model = prune(model, "channels", 0.3).model
    out = lmforge.save_pretrained(model, tmp_path / "pruned")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["num_attention_heads"] == left and hf_config["num_key_value_heads"] == left * kv // heads
    assert hf_config["head_dim"] == config.head_dim and hf_config["intermediate_size"] == 112
    hf, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    ids = random_ids(2, 23, vocab=VOCAB)
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, use_cache=False).logits
    assert max_diff(model(ids), theirs) < ATOL
    assert max_diff(lmforge.load_pretrained(out)(ids), theirs) < ATOL


# --- the command -------------------------------------------------------------------------------------
def test_cli_prunes_recovers_and_writes_a_loadable_checkpoint(tmp_path, checkpoint, data_dir, capsys):
    from lmforge.cli import main

    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(checkpoint), "--out", str(out), "--method", "magnitude", "--sparsity", "0.5"]
    argv += ["--importance", "activation", "--data", str(data_dir), "--eval-data", str(data_dir)]
    argv += ["--recover-steps", "3", "--recover-batch-size", "2", "--recover-seq-len", "32", "--calib-batches", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity: dense" in printed and "-> recovered" in printed and "50.0%" in printed, printed
    assert (out / "tokenizer.json").is_file()
    loaded = lmforge.load_pretrained(out)
    assert abs(size_stats(loaded).projection_sparsity - 0.5) < 1e-3  # the zeros survived recovery and saving


def test_cli_refuses_bad_input_in_one_line(tmp_path, checkpoint, capsys):
    from lmforge.cli import main

    odd = tmp_path / "odd"  # hidden 66: the q/k/v/gate/up inputs are not a multiple of 4
    lmforge.save_pretrained(random_model(tiny(hidden_size=66, num_heads=3, num_kv_heads=1, head_dim=22)), odd)
    llama = tmp_path / "llama8"  # 8 heads over 4 kv heads in a 64-wide model
    lmforge.save_pretrained(random_model(tiny(num_heads=8, num_kv_heads=4)), llama)
    base = ["prune", "--model", str(checkpoint), "--out", str(tmp_path / "out")]
    llama8 = ["prune", "--model", str(llama), "--out", str(tmp_path / "out")]
    cases = {
        "in (0, 1)": [*base, "--sparsity", "1.5"],
        "at least one must stay": [*base, "--method", "heads", "--sparsity", "0.9"],
        "use --sparsity 0.5, 0.75": [*llama8, "--method", "heads", "--sparsity", "0.25"],  # 6 heads: 64 % 6
        "removes none": [*base, "--method", "channels", "--sparsity", "0.001"],
        "not a multiple of 4": ["prune", "--model", str(odd), "--out", str(tmp_path / "out"), "--method", "2:4"],
        "always removes half": [*base, "--method", "2:4", "--sparsity", "0.3"],
        "needs --data": [*base, "--recover-steps", "3"],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmforge prune: error: ") and expected in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_every_prune_option_is_a_flag_without_a_restated_default():
    import argparse

    from lmforge.cli import build_parser
    from lmforge.commands.flags import Options
    from lmforge.options import specs

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    by_dest = {a.dest: a for a in sub._actions}
    for spec in specs(PruneConfig):
        assert by_dest[spec.name].default is argparse.SUPPRESS, spec.name
    assert Options(parser.parse_args(["prune"])).build(PruneConfig) == PruneConfig()
    given = Options(parser.parse_args(["prune", "--method", "2:4", "--recover-steps", "5"])).build(PruneConfig)
    assert (given.method, given.recover_steps, given.sparsity) == ("2:4", 5, 0.5)
