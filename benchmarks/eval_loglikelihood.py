"""Log-likelihood scoring throughput: lmforge's lm-eval adapter vs lm-eval's own HuggingFace backend (HFLM).

The same checkpoint directory (quickstart-shaped model by default, random weights, a BPE tokenizer trained
on the standard library), the same multiple-choice requests (contexts from standard-library source, four
continuations each), the same batch size; each backend's `loglikelihood` is called on the full list,
alternating, and the script reports requests/s and the largest difference between the two backends'
log-likelihoods.

    python benchmarks/eval_loglikelihood.py [--model quickstart|<preset>] [--questions 200] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.quickstart import model_config, stdlib_files
from lmforge.tokenizer import Tokenizer


def build_checkpoint(directory: Path, model_name: str) -> tuple[Tokenizer, list[str]]:
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files(3e6)]
    tok = Tokenizer.train(texts, 4096, "llama3")
    if model_name == "quickstart":
        config = model_config(tok=tok)
    else:
        config = ModelConfig.from_preset(model_name).replace(dtype="float32")
    torch.manual_seed(0)
    lmforge.save_pretrained(Transformer(config), directory)
    tok.save(directory)
    return tok, texts


def make_requests(texts: list[str], questions: int, seed: int = 0) -> list[tuple[str, str]]:
    """Four (context, continuation) pairs per question: a line of code and candidate next lines."""
    rng = random.Random(seed)
    lines = [ln for t in texts for ln in t.splitlines() if 20 < len(ln.strip()) < 100]
    requests = []
    for _ in range(questions):
        i = rng.randrange(len(lines) - 8)
        context = "\n".join(lines[i : i + rng.randint(3, 8)])
        for choice in [lines[i + 8], *rng.sample(lines, 3)]:
            requests.append((context + "\n", choice.strip()))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="quickstart")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM

    with tempfile.TemporaryDirectory() as d:
        _, texts = build_checkpoint(Path(d), args.model)
        pairs = make_requests(texts, args.questions)
        instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        backends = {
            "lmforge": LmforgeLM(pretrained=d, batch_size=args.batch_size),
            "lm-eval hf": HFLM(pretrained=d, batch_size=args.batch_size, device="cpu", dtype="float32"),
        }
        outputs, rates = {}, {name: [] for name in backends}
        for r in range(args.repeats + 1):  # the first round warms both up
            for name in list(backends) if r % 2 == 0 else list(reversed(backends)):
                t0 = time.perf_counter()
                outputs[name] = backends[name].loglikelihood(instances, disable_tqdm=True)
                if r:
                    rates[name].append(len(instances) / (time.perf_counter() - t0))
    diff = max(abs(a[0] - b[0]) for a, b in zip(outputs["lmforge"], outputs["lm-eval hf"], strict=True))
    same_greedy = all(a[1] == b[1] for a, b in zip(outputs["lmforge"], outputs["lm-eval hf"], strict=True))
    print(f"torch {torch.__version__}, lm-eval {lm_eval.__version__}, {torch.get_num_threads()} threads")
    print(
        f"model {args.model}, {len(instances)} loglikelihood requests ({args.questions} questions x 4), "
        f"batch size {args.batch_size}; max |logprob difference| {diff:.2e}, same greedy flags: {same_greedy}"
    )
    print("| backend | requests/s median [min-max] |\n|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} [{min(r):.1f}-{max(r):.1f}] |")
    ratio = statistics.median(rates["lmforge"]) / statistics.median(rates["lm-eval hf"])
    print(f"lmforge / lm-eval hf: {ratio:.2f}x (target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
