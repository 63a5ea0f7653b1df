"""Perplexity and bits per byte over long texts, with rolling windows (lm-evaluation-harness style).

The text's tokens t_0..t_{n-1} are scored one window at a time, each window reading at most `max_length`
tokens of input, the ones just before its predictions: the first window starts from a prefix token and
predicts up to max_length tokens, every later one predicts the next `stride` tokens (the last one fewer)
from the max_length tokens before its last prediction. These are lm-evaluation-harness's rolling windows
(`get_rolling_token_windows` with context_len = max_length - stride + 1, made disjoint): with stride ==
max_length its `loglikelihood_rolling` (disjoint predictions, as much context as fits); a smaller stride
gives every prediction after the first window at least max_length - stride + 1 tokens of context, at the
cost of more forward passes. Where the last window is a full one, this is also transformers' strided
perplexity recipe with windows of max_length + 1 tokens; that recipe starts its last window at the next
stride step, so a shorter last window sees fewer tokens of context there than here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.scoring import prefix_token_id, score_tokens
from lmforge.model import Transformer


@dataclass
class Perplexity:
    nll: float  # total negative log-likelihood, nats
    tokens: int
    words: int
    bytes: int
    documents: int = 1
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {
            "token_perplexity": math.exp(self.nll / self.tokens),
            "bits_per_byte": self.nll / self.bytes / math.log(2),
            "byte_perplexity": math.exp(self.nll / self.bytes),
            "nll_per_token": self.nll / self.tokens,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }
        if self.words:
            out["word_perplexity"] = math.exp(self.nll / self.words)
            out["words"] = self.words
        return out


def rolling_windows(
    tokens: Sequence[int], prefix: int, max_length: int, stride: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token pairs covering every token of `tokens` exactly once (module docstring)."""
    if not 0 < stride <= max_length:
        raise LmforgeError(f"stride must be in [1, max_length={max_length}], got {stride}.")
    seq = [prefix, *tokens]  # seq[j + 1] is tokens[j]; it is predicted from seq[: j + 1]
    pairs = []
    start = 0
    while start < len(tokens):
        end = min(start + (stride if start else max_length), len(tokens))  # predict tokens[start:end]
        first_input = max(0, end - max_length)  # the input is seq[first_input:end]
        pairs.append((seq[first_input : start + 1], seq[start + 1 : end + 1]))
        start = end
    return pairs


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def text_perplexity(
    model: Transformer,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of documents (each scored on its own, from a prefix token)."""
    max_length = max_length or model.config.max_position_embeddings
    stride = stride or max_length
    prefix = prefix_token_id(tokenizer)
    pairs, words, nbytes = [], 0, 0
    for text in texts:
        if not text:
            continue
        pairs += rolling_windows(tokenizer.encode(text), prefix, max_length, stride)
        words += count_words(text)
        nbytes += len(text.encode("utf-8"))
    if not pairs:
        raise LmforgeError("no text to evaluate: every document is empty.")
    scores = score_tokens(model, pairs, batch_size, max_length, progress)
    return Perplexity(-sum(s.logprob for s in scores), sum(s.num_tokens for s in scores), words, nbytes, len(texts))


def shard_perplexity(
    model: Transformer,
    shards: Any,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of a prepared split (lmforge.data.TokenShards): its whole token stream, documents joined
    by their EOS tokens. Bytes come from the split's index; the first token is predicted from EOS."""
    n = shards.num_tokens if max_tokens is None else min(max_tokens, shards.num_tokens)
    tokens = shards.read(0, n).tolist()
    pairs = rolling_windows(tokens, shards.eos_token_id, max_length, stride or max_length)
    scores = score_tokens(model, pairs, batch_size, max_length, progress)
    nbytes = shards.num_bytes if n == shards.num_tokens else round(shards.num_bytes * n / shards.num_tokens)
    return Perplexity(-sum(s.logprob for s in scores), n, 0, nbytes, shards.num_documents)


MAX_EVAL_LENGTH = 1024  # default window of held_out_perplexity: the model's context, but no more than this


def held_out_perplexity(
    model: Transformer, path: str | Path, tokenizer: Any = None, max_length: int = 0, max_tokens: int = 0
) -> Perplexity:
    """Perplexity of prepared shards (their val split, else train) or of a text / JSONL file (`tokenizer`
    needed), scored in disjoint windows of `max_length` tokens (default: the model's context, at most
    MAX_EVAL_LENGTH; give the training length for a model trained on shorter windows)."""
    from lmforge.data.shards import TokenShards, has_split
    from lmforge.eval.tasks import load_texts

    path = Path(path)
    max_length = max_length or min(model.config.max_position_embeddings, MAX_EVAL_LENGTH)
    was_training = model.training
    try:
        if path.is_dir():
            shards = TokenShards(path, "val" if has_split(path, "val") else "train")
            if shards.vocab_size > model.config.vocab_size:
                raise LmforgeError(
                    f"{path} uses {shards.vocab_size} token ids but the model's vocabulary has "
                    f"{model.config.vocab_size}; prepare it with this model's tokenizer."
                )
            return shard_perplexity(model, shards, max_length, max_tokens=max_tokens or None)
        if not path.is_file():
            raise LmforgeError(f"--eval-data {path} does not exist; give prepared shards or a text file.")
        if tokenizer is None:
            raise LmforgeError(f"scoring the text file {path} needs the model's tokenizer.json beside its weights.")
        return text_perplexity(model, tokenizer, load_texts(path), max_length)
    finally:
        model.train(was_training)
