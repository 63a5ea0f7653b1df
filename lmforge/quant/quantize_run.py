"""`lmforge quantize`: a float checkpoint -> a weight-only int8 / int4 checkpoint that `load_pretrained` loads
back quantized (config.json's quantization_config), with the held-out perplexity before and after."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoint import companion_files, load_pretrained, save_pretrained
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import Perplexity, held_out_perplexity
from lmforge.quant.quantize import QuantConfig, QuantReport, quantize


@dataclass
class QuantizeOutcome:
    source: Path
    out: Path
    report: QuantReport
    perplexity: dict[str, Perplexity] = field(default_factory=dict)  # "float", "quantized"
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"quantized {self.source} -> {self.out}", str(self.report)]
        if self.perplexity:
            f, q = (self.perplexity[k].metrics() for k in ("float", "quantized"))
            fp, qp = f["token_perplexity"], q["token_perplexity"]
            lines.append(
                f"held-out perplexity: {fp:.4f} float -> {qp:.4f} {self.report.method} ({qp / fp - 1:+.2%}); "
                f"bits per byte {f['bits_per_byte']:.4f} -> {q['bits_per_byte']:.4f}"
            )
        lines.append(f"done in {self.seconds:.1f} s; `lmforge.load_pretrained({str(self.out)!r})` loads it quantized")
        return "\n".join(lines)


def quantize_checkpoint(
    model_dir: str | Path, out: str | Path, cfg: QuantConfig, *, eval_data: str | Path | None = None
) -> QuantizeOutcome:
    """Load `model_dir` in fp32, quantize it as `cfg` says, score `eval_data` (prepared shards or a text file)
    before and after when given, and write `out` atomically with the source's tokenizer and generation config."""
    t0 = time.perf_counter()
    source, out = Path(model_dir), Path(out)
    if not (source / "config.json").is_file():
        raise LmforgeError(f"--model {source} is not a checkpoint directory (no config.json); give an HF-format one.")
    if out.resolve() == source.resolve():
        raise LmforgeError(f"--out {out} is the source checkpoint; write the quantized one to another directory.")
    model = load_pretrained(source, dtype=torch.float32)
    if getattr(model, "quantization_config", None) is not None:
        raise LmforgeError(f"{source} is already quantized; quantize the float checkpoint it came from.")
    tokenizer = None
    if eval_data is not None and (source / "tokenizer.json").is_file():
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(source)
    perplexity: dict[str, Perplexity] = {}
    if eval_data is not None:
        perplexity["float"] = held_out_perplexity(model, eval_data, tokenizer)
    report = quantize(model, cfg.method, cfg.group_size, act_dtype=cfg.act_dtype, head=cfg.head)
    if eval_data is not None:
        perplexity["quantized"] = held_out_perplexity(model, eval_data, tokenizer)
    extra = companion_files(source)
    save_pretrained(model, out, extra_files=extra)
    return QuantizeOutcome(source, out, report, perplexity, time.perf_counter() - t0)
