"""Checkpoint loading: `lmforge.load_pretrained(dir)` vs `transformers.AutoModelForCausalLM.from_pretrained(dir)`.

Both loaders read the same random checkpoint with the qwen2.5-0.5b shape (written once by
`lmforge convert qwen2.5-0.5b <dir> --dtype float32` and cached under --workdir). Every measurement runs in
a fresh Python process so that its peak RSS is that loader's alone; the loaders alternate order across
repeats. Per run we record:

- import time and baseline RSS after `import torch, lmforge` or `import torch, transformers` (plus the lazy
  Qwen2 modeling module, so that neither loader's timed phase pays for importing its model code),
- load time: the call that returns the model,
- first-forward time on 8 tokens: both loaders memory-map safetensors, so loading is lazy and the first
  forward pays the page faults; load + first forward is the time to a usable model,
- peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) after load and after the forward, and the
  resident anonymous / file-backed split at the end.

Before every timed run the checkpoint files are read once, so the page cache is warm and neither loader
pays the disk. The logits of the two loaders are compared at the end.

    python benchmarks/load.py [--dtype float32|bfloat16] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESET = "qwen2.5-0.5b"
LOADERS = ("lmforge", "transformers")
MIB = 1024 * 1024


# --- child: one measurement in a fresh process ------------------------------------------------------
def _proc_status() -> dict[str, int]:
    """Current VmRSS / RssAnon / RssFile in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024  # reported in kB
    return out


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _faults() -> tuple[int, int]:
    """(minor, major) page faults so far: major ones mean the page cache was not warm."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_majflt


def child(loader: str, ckpt: str, tokens: int, logits_out: str) -> dict:
    t0 = time.perf_counter()
    import torch

    if loader == "lmforge":
        import lmforge

        def load():
            return lmforge.load_pretrained(ckpt)

        def forward(model, ids):
            return model(ids)

    else:
        import transformers
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (resolve the lazy import now)

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(ckpt)

        def forward(model, ids):
            return model(ids).logits

    vocab = json.loads((Path(ckpt) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    import_s = time.perf_counter() - t0
    base = _proc_status()
    base_maxrss = _maxrss()

    faults0 = _faults()
    t = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t
    load_maxrss = _maxrss()
    faults1 = _faults()

    with torch.inference_mode():
        t, cpu = time.perf_counter(), time.process_time()
        logits = forward(model, ids)
        forward_s = time.perf_counter() - t
        forward_cpu_s = time.process_time() - cpu
    forward_maxrss = _maxrss()
    faults2 = _faults()
    end = _proc_status()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    torch.save(logits.detach().float().cpu(), logits_out)
    return {
        "loader": loader,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "import_s": import_s,
        "load_s": load_s,
        "forward_s": forward_s,
        "forward_cpu_s": forward_cpu_s,
        "base_rss": base["VmRSS"],
        "base_maxrss": base_maxrss,
        "load_maxrss": load_maxrss,
        "peak_rss": forward_maxrss,
        "end_anon": end["RssAnon"],
        "end_file": end["RssFile"],
        "load_faults": [b - a for a, b in zip(faults0, faults1, strict=True)],
        "forward_faults": [b - a for a, b in zip(faults1, faults2, strict=True)],
    }


# --- parent ---------------------------------------------------------------------------------------
def weight_bytes(ckpt: Path) -> int:
    """Bytes of tensor data in the checkpoint's safetensors files (headers excluded)."""
    total = 0
    for file in sorted(ckpt.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def warm_cache(ckpt: Path) -> float:
    """Read every file of the checkpoint once so that it sits in the page cache; return GB/s."""
    buf = bytearray(64 * MIB)
    view = memoryview(buf)
    size = 0
    t = time.perf_counter()
    for file in sorted(ckpt.iterdir()):
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                size += n
    return size / (time.perf_counter() - t) / 1e9


def ensure_checkpoint(workdir: Path, dtype: str) -> tuple[Path, str]:
    ckpt = workdir / f"{PRESET}-{dtype}"
    # The console script's entry point (`lmforge.cli:main`), called in a separate process.
    argv = ["convert", PRESET, str(ckpt), "--dtype", dtype]
    cmd = [sys.executable, "-c", f"import sys; from lmforge.cli import main; sys.exit(main({argv!r}))"]
    shown = f"lmforge convert {PRESET} {ckpt} --dtype {dtype}"
    if (ckpt / "config.json").is_file() and list(ckpt.glob("*.safetensors")):
        return ckpt, f"reused {ckpt} (written earlier by `{shown}`)"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"writing the checkpoint once: {shown}", flush=True)
    subprocess.run(cmd, check=True)  # a separate process: the parent stays small
    return ckpt, f"wrote {ckpt} with `{shown}`"


def run_child(loader: str, ckpt: Path, tokens: int, logits_out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", loader, "--ckpt", str(ckpt), "--tokens", str(tokens)]
    cmd += ["--logits-out", str(logits_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{loader} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def med(values: list[float]) -> float:
    return statistics.median(values)


def cell(values: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    """median [min-max]"""
    v = [x / scale for x in values]
    return f"{fmt.format(med(v))} [{fmt.format(min(v))}-{fmt.format(max(v))}]"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="checkpoint dtype")
    p.add_argument("--repeats", type=int, default=3, help="runs per loader (default 3)")
    p.add_argument("--tokens", type=int, default=8, help="tokens in the first forward (default 8)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lmforge-bench-load",
        help="where the checkpoint is cached (default: %(default)s)",
    )
    p.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.ckpt, args.tokens, args.logits_out)))
        return
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    import torch
    import transformers

    import lmforge

    ckpt, how = ensure_checkpoint(args.workdir, args.dtype)
    wbytes = weight_bytes(ckpt)
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"lmforge {lmforge.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"checkpoint: {how}")
    print(f"weights: {wbytes:,} bytes ({wbytes / MIB:.1f} MiB, {args.dtype}); first forward on {args.tokens} tokens")
    print("page cache: before every timed run all checkpoint files are read once (warm cache: no loader pays the disk)")
    print("each run is a fresh process; the loader order alternates between repeats\n")

    results: dict[str, list[dict]] = {name: [] for name in LOADERS}
    logits_files = {name: args.workdir / f"logits-{name}-{args.dtype}.pt" for name in LOADERS}
    for r in range(args.repeats):
        order = LOADERS if r % 2 == 0 else LOADERS[::-1]
        for name in order:
            gbps = warm_cache(ckpt)
            res = run_child(name, ckpt, args.tokens, logits_files[name])
            results[name].append(res)
            print(
                f"run {r + 1} {name:<12} cache read {gbps:5.1f} GB/s | import {res['import_s']:.3f}s "
                f"load {res['load_s']:.3f}s fwd {res['forward_s']:.3f}s (cpu {res['forward_cpu_s']:.3f}s) | "
                f"base {res['base_rss'] / MIB:.0f} MiB "
                f"peak {res['peak_rss'] / MIB:.0f} MiB (after load {res['load_maxrss'] / MIB:.0f}) | "
                f"end anon {res['end_anon'] / MIB:.0f} MiB file {res['end_file'] / MIB:.0f} MiB | "
                f"faults load {res['load_faults'][0]}/{res['load_faults'][1]} "
                f"fwd {res['forward_faults'][0]}/{res['forward_faults'][1]} (minor/major) | {res['dtype']}",
                flush=True,
            )

    def col(name: str, key: str) -> list[float]:
        return [x[key] for x in results[name]]

    def total(name: str) -> list[float]:
        return [x["load_s"] + x["forward_s"] for x in results[name]]

    def over_base(name: str) -> list[float]:
        return [x["peak_rss"] - x["base_rss"] for x in results[name]]

    print(f"\nmedian [min-max] over {args.repeats} runs each; times in seconds, memory in MiB")
    rows = [["loader", "import", "load", "first forward", "load + forward", "import + load + forward"]]
    for name in LOADERS:
        e2e = [x["import_s"] + x["load_s"] + x["forward_s"] for x in results[name]]
        rows.append(
            [name, cell(col(name, "import_s")), cell(col(name, "load_s")), cell(col(name, "forward_s"))]
            + [cell(total(name)), cell(e2e)]
        )
    print(table(rows) + "\n")
    rows = [["loader", "baseline RSS", "peak RSS after load", "peak RSS", "peak - baseline", "(peak - base) / weights"]]
    for name in LOADERS:
        ratio = [v / wbytes for v in over_base(name)]
        rows.append(
            [name, cell(col(name, "base_rss"), MIB, "{:.0f}"), cell(col(name, "load_maxrss"), MIB, "{:.0f}")]
            + [cell(col(name, "peak_rss"), MIB, "{:.0f}"), cell(over_base(name), MIB, "{:.0f}"), cell(ratio)]
        )
    print(table(rows) + "\n")

    lf, tf = "lmforge", "transformers"
    time_ratio = med(total(lf)) / med(total(tf))
    load_ratio = med(col(lf, "load_s")) / med(col(tf, "load_s"))
    fwd_ratio = med(col(lf, "forward_s")) / med(col(tf, "forward_s"))
    e2e_ratio = sum(med(col(lf, k)) for k in ("import_s", "load_s", "forward_s")) / sum(
        med(col(tf, k)) for k in ("import_s", "load_s", "forward_s")
    )
    mem_lf = med(over_base(lf)) / wbytes
    mem_tf = med(over_base(tf)) / wbytes

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("ratios (of medians unless said otherwise):")
    print(
        f"  time to usable model, lmforge / transformers (load + first forward): {time_ratio:.2f}  "
        f"target <= 1.0: {verdict(time_ratio <= 1.0)}"
    )
    print(
        f"    load alone {load_ratio:.2f}, first forward alone {fwd_ratio:.2f}, import + load + forward {e2e_ratio:.2f}"
    )
    # Runs of the same repeat are adjacent in time, so their ratio suffers less from the machine's drift.
    paired = sorted(x / y for x, y in zip(total(lf), total(tf), strict=True))
    print(f"    paired per repeat (load + first forward): median {med(paired):.2f} [{paired[0]:.2f}-{paired[-1]:.2f}]")
    # The minimum is the run least disturbed by other work on the machine (the first forward is bimodal here).
    min_ratio = min(total(lf)) / min(total(tf))
    print(f"    ratio of minima (least disturbed runs): {min_ratio:.2f}  target <= 1.0: {verdict(min_ratio <= 1.0)}")
    print(f"  lmforge (peak - baseline) / weights bytes: {mem_lf:.2f}  target <= 1.3: {verdict(mem_lf <= 1.3)}")
    print(f"  transformers (peak - baseline) / weights bytes: {mem_tf:.2f}")

    a = torch.load(logits_files[lf])
    b = torch.load(logits_files[tf])
    diff = (a - b).abs().max().item()
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    same = "bitwise identical" if diff == 0 else ("agree" if diff <= tol else "DIFFER")
    print(
        f"\nlogits on {args.tokens} tokens, shape {list(a.shape)}, |logits| max {a.abs().max().item():.2f}: "
        f"max |lmforge - transformers| = {diff:.3e} ({same}; tolerance {tol:g})"
    )
    if diff > tol:
        sys.exit("the two loaders' models disagree: one of them loaded the weights wrongly")


if __name__ == "__main__":
    main()
