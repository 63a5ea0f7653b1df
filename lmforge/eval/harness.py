"""An lm-evaluation-harness model backed by lmforge: `LmforgeLM`, registered under the name "lmforge".

    import lmforge.eval.harness                       # registers the model with lm_eval
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/x", tasks=[...])

    lmforge-lm-eval --model lmforge --model_args pretrained=runs/x --tasks ...   # lm_eval's CLI, registered

lm-eval (an optional extra: `pip install lmforge[lm-eval]`) discovers models only from its own list, so
its plain `lm_eval` executable knows "lmforge" once this module is imported; `lmforge-lm-eval` is that
executable with the import done.
"""

from __future__ import annotations

import sys
from typing import Any

from lmforge.errors import LmforgeError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise LmforgeError(
        "the lm-evaluation-harness adapter needs lm-eval: `pip install lm-eval` (or `pip install lmforge[lm-eval]`)."
    ) from e

from lmforge.eval.perplexity import rolling_windows
from lmforge.eval.scoring import encode_pair, encode_text, prefix_token_id, score_tokens


@register_model("lmforge")
class LmforgeLM(LM):
    """lm-eval's three request types on an lmforge checkpoint (or run) directory with its tokenizer."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        max_length: int | None = None,
        dtype: str | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        from lmforge.loading import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(pretrained, dtype or "auto")
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else self.model.config.max_position_embeddings

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            pairs.append(encode_pair(self.tokenizer, context, continuation))
        scores = score_tokens(self.model, pairs, self.batch_size, self.max_length, progress=not disable_tqdm)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        prefix = prefix_token_id(self.tokenizer)
        owners, pairs = [], []
        for i, req in enumerate(requests):
            windows = rolling_windows(self.tokenizer.encode(req.args[0]), prefix, self.max_length, self.max_length)
            pairs += windows
            owners += [i] * len(windows)
        scores = score_tokens(self.model, pairs, self.batch_size, self.max_length, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, scores, strict=True):
            totals[owner] += score.logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from lmforge.generate.api import generate

        outputs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            options = {
                "max_new_tokens": int(kwargs.pop("max_gen_toks", 256)),
                "do_sample": bool(kwargs.pop("do_sample", False)),
                "eos_token_id": self.tokenizer.stop_token_ids,
            }
            if "temperature" in kwargs:
                options["temperature"] = float(kwargs.pop("temperature"))
            for key in ("top_k", "top_p", "min_p", "repetition_penalty", "seed"):
                if key in kwargs:
                    options[key] = kwargs.pop(key)
            # The prompt starts with the tokenizer's prefix (BOS) unless it already does, as loglikelihood's
            # contexts and lm-eval's HuggingFace backend do (its tok_batch_encode adds special tokens).
            ids = encode_text(self.tokenizer, context) or [prefix_token_id(self.tokenizer)]
            ids = ids[-(self.max_length - options["max_new_tokens"]) :]
            new = generate(self.model, ids, tokenizer=self.tokenizer, stop_strings=until, **options)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:  # lm-eval returns the text before the first stop sequence
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def main() -> None:
    """`lmforge-lm-eval`: lm-eval's command line with the "lmforge" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
