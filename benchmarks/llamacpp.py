"""lmforge vs llama.cpp (through llama-cpp-python) on the same exported weights: greedy parity, then decode speed.

1. Build. llama-cpp-python is only an sdist on PyPI, so it is compiled once (CPU, -march=native, OpenMP)
   into a cache outside the repository (--cache; default $LMFORGE_LLAMACPP_CACHE or
   ~/.cache/lmforge/llamacpp), one build per version and CPU flag set, and imported from there. Nothing is
   installed into the environment's site-packages.
2. Parity. Tiny presets trained for a few steps on a fixed text (so that every next token has a clear
   winner and greedy decoding is well defined) are saved with `lmforge.save_pretrained`, exported with
   `lmforge convert DIR x.gguf --quant f32` and decoded greedily by both; the tokens must agree, and the
   first step's logits are compared. llama.cpp runs with an f32 KV cache here, so only the export and the
   two implementations' arithmetic differ.
3. Speed. A random model with the qwen2.5-0.5b shape is exported to f32 / q8_0 / q4_0. Decode tokens/s of
   lmforge in fp32 / bf16 / int8 / w8a8 / int4 (`lmforge.quantize`, group size 32 like the q8_0 / q4_0
   blocks; w8a8 is int8 with `act_dtype="int8"`) against llama.cpp on the matching file (fp32 and bf16
   against f32, int8 and w8a8 against q8_0, int4 against q4_0): same weights, same thread count, one
   process, the two alternating round by round, one pair in memory at a time. Decode is tgN as llama-bench
   and `lmforge bench` measure it: N one-token forward passes (each followed by an argmax) from an empty
   context; lmforge's side is `lmforge.generate.bench`'s. For the quantized variants, more runs time each
   weight product where it runs, which splits a step into the products and the rest and gives the ratio
   lmforge could reach if the rest cost nothing.

    python benchmarks/llamacpp.py                  # goal: int8 (or w8a8) / q8_0 and int4 / q4_0 >= 0.8x
    python benchmarks/llamacpp.py --record         # also append the results to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.atomic import write_directory, write_file
from lmforge.generate.bench import decode_seconds
from lmforge.quant.layers import Int4Linear, Int8Linear, QuantLinear
from lmforge.quickstart import cpu_description

VERSION = "0.3.36"  # llama-cpp-python (vendors its own llama.cpp); the build cache is keyed by it
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release"
RUNTIME_DEPS = ("numpy", "jinja2", "diskcache", "typing_extensions")  # llama_cpp's; installed only if missing
RESULTS = Path(__file__).with_name("RESULTS.md")
# (lmforge precision, llama.cpp file it is compared with, goal for lmforge / llama.cpp)
PAIRS: tuple[tuple[str, str, float | None], ...] = (
    ("fp32", "f32", None),
    ("bf16", "f32", None),
    ("int8", "q8_0", 0.8),
    ("w8a8", "q8_0", 0.8),  # int8 with activations quantized per row too: what q8_0's products do
    ("int4", "q4_0", 0.8),
)
TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold; fortune favours the bold, and the early bird catches the worm. "
    "Every cloud has a silver lining, but it never rains but it pours. Time and tide wait for no one. "
    "Rome was not built in a day, yet all roads lead to Rome when in Rome you do as the Romans do. "
)


# --- building and importing llama-cpp-python -----------------------------------------------------------
def cpu_key() -> str:
    """-march=native code only runs on CPUs with the same extensions: one build per flag set."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.partition(":")[2].split()))
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _last_step(log: Path) -> str:
    """ninja's latest "[k/N]" in the build log (the build's progress), or ""."""
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 65536))
        steps = re.findall(rb"\[(\d+)/(\d+)\]", f.read())
    return f"[{steps[-1][0].decode()}/{steps[-1][1].decode()}]" if steps else ""


def _run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None, nice: bool = False) -> None:
    """Run `cmd` with its output appended to `log`, printing the build's progress while it runs."""
    print(f"  $ {shlex.join(cmd)}", flush=True)
    t0, shown = time.perf_counter(), ""
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        # nice: the machines are shared; the compile must not starve other work.
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=(lambda: os.nice(19)) if nice else None
        )
        while True:
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                step = _last_step(log)
                if step and step != shown:
                    print(f"    compiling {step} after {time.perf_counter() - t0:.0f} s", flush=True)
                    shown = step
    if proc.returncode:
        raise SystemExit(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}); see the end of {log}.")


def build_llama_cpp(root: Path) -> None:
    """Download the sdist, compile a wheel (cmake + the C/C++ compiler) and unpack it into `root`/site."""
    root.mkdir(parents=True, exist_ok=True)
    log, pip = root / "build.log", [sys.executable, "-m", "pip"]
    jobs = os.cpu_count() or 1
    print(f"building llama-cpp-python {VERSION} from source into {root} ({jobs} jobs; log {log})", flush=True)
    t0 = time.perf_counter()
    sdists, wheels = root / "sdist", root / "wheels"
    _run_logged(
        [*pip, "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "-d", str(sdists)], log
    )
    sdist = next(sdists.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    build = ["wheel", "--no-deps", "-v", "-w", str(wheels), f"--config-settings=build-dir={root / 'build'}"]
    _run_logged([*pip, *build, str(sdist)], log, env=env, nice=True)
    wheel = next(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    # --no-deps: never shadow the environment's own numpy; add only what it lacks.
    missing = [d for d in RUNTIME_DEPS if importlib.util.find_spec(d) is None]

    def install(tmp: Path) -> None:
        _run_logged([*pip, "install", "--no-deps", "--target", str(tmp), str(wheel), *missing], log)

    write_directory(root / "site", install, owned=lambda name: True)  # a failed install never looks cached
    seconds = time.perf_counter() - t0
    info = {"version": VERSION, "cmake_args": CMAKE_ARGS, "jobs": jobs, "seconds": round(seconds)}
    write_file(root / "build.json", json.dumps(info, indent=1) + "\n")
    print(f"built llama-cpp-python {VERSION} in {seconds / 60:.1f} min", flush=True)


def import_llama_cpp(cache: Path, build: bool) -> tuple[ModuleType, dict[str, Any]]:
    """The cached build's `llama_cpp` module (building it first if allowed) and its build.json."""
    root = cache / f"llama-cpp-python-{VERSION}-{cpu_key()}"
    if not (root / "site" / "llama_cpp").is_dir():
        if not build:
            raise SystemExit(f"no llama-cpp-python build in {root}; run without --no-build to compile it (minutes).")
        build_llama_cpp(root)
    sys.path.insert(0, str(root / "site"))
    import llama_cpp

    info_file = root / "build.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return llama_cpp, {**info, "root": str(root)}


# --- models and exports --------------------------------------------------------------------------------
def trained_tiny(preset: str, steps: int) -> tuple[Transformer, float]:
    """A tiny preset trained to continue TEXT (byte ids), and its final loss: its next-token logits have
    clear winners, so a numerical difference between two implementations cannot flip a near-tie."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset))
    ids = torch.tensor(list(TEXT.encode()))
    windows = ids.unfold(0, 65, 16)  # [W, 65]: overlapping training windows
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    # One thread: a model this small gains nothing from two, and on a busy machine OpenMP's spinning
    # barriers make a two-thread step up to 100x slower.
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            logits = model(windows[:, :-1])  # [W, 64, V]
            loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), float(loss.detach())


def export_gguf(model_dir: Path, out: Path, quant: str) -> float:
    """`lmforge convert DIR OUT.gguf --quant QUANT`, run as a user would; returns its seconds."""
    cmd = [sys.executable, "-m", "lmforge", "convert", str(model_dir), str(out), "--quant", quant]
    # The child must import the same lmforge as this process, wherever that came from.
    root = str(Path(lmforge.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode or not out.is_file():
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"`lmforge convert ... {out.name} --quant {quant}` failed (exit {r.returncode}): {why}")
    return time.perf_counter() - t0


def lmforge_variant(model_dir: Path, name: str) -> Transformer:
    """lmforge's model in precision `name` loaded from `model_dir`."""
    if name in ("fp32", "bf16"):
        return lmforge.load_pretrained(model_dir, dtype=torch.float32 if name == "fp32" else torch.bfloat16).eval()
    model = lmforge.load_pretrained(model_dir, dtype=torch.float32)
    method, act = ("int8", "int8") if name == "w8a8" else (name, "auto")
    lmforge.quantize(model, method=method, group_size=32, act_dtype=act)
    return model.eval()


# --- llama.cpp ---------------------------------------------------------------------------------------------
class LlamaCpp:
    """One GGUF file loaded by llama.cpp, driven token by token with greedy (argmax) choices."""

    def __init__(self, lib: ModuleType, path: Path, threads: int, n_ctx: int, f32_cache: bool = False) -> None:
        kv = {"type_k": lib.GGML_TYPE_F32, "type_v": lib.GGML_TYPE_F32} if f32_cache else {}
        self.lib = lib
        self.llm = lib.Llama(
            model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False, **kv
        )
        self.n_vocab = self.llm.n_vocab()

    def close(self) -> None:
        self.llm.close()

    def logits(self) -> np.ndarray:
        """The last evaluated token's logits (a view of llama.cpp's buffer)."""
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """n greedy tokens after `prompt`, and the logits that chose the first one."""
        self.llm.reset()
        self.llm.eval(prompt)
        first, out = self.logits().copy(), []
        for i in range(n):
            out.append(int(self.logits().argmax()))
            if i < n - 1:
                self.llm.eval([out[-1]])
        return out, first

    def decode_seconds(self, n: int, token: int = 1) -> float:
        """n forward passes of one token each over a growing cache from an empty context (llama-bench's tgN)."""
        self.llm.reset()  # the next eval drops the cached positions
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([token])
            token = int(self.logits().argmax())
        return time.perf_counter() - t0


def system_info(lib: ModuleType) -> str:
    """llama.cpp's compiled-in CPU features (those it reports as on)."""
    info = lib.llama_print_system_info().decode()
    on = re.findall(r"(\w+) = 1", info)
    return ", ".join(on) if on else info.strip()


# --- the two measurements --------------------------------------------------------------------------------
def check_parity(lib: ModuleType, preset: str, work: Path, args: argparse.Namespace) -> tuple[bool, str]:
    """(agreed, one line for the report) for one tiny preset."""
    model, loss = trained_tiny(preset, args.train_steps)
    model_dir, gguf = work / f"{preset}-trained", work / f"{preset}-f32.gguf"
    lmforge.save_pretrained(model, model_dir)
    export_gguf(model_dir, gguf, "f32")
    prompt = list(TEXT.encode()[: args.prompt_tokens])
    n = args.check_tokens
    ours = lmforge.generate(model, prompt, max_new_tokens=n, do_sample=False, eos_token_id=())
    with torch.inference_mode():
        steps = model(torch.tensor([prompt + ours]))[0, len(prompt) - 1 : len(prompt) - 1 + n].float()  # [n, V]
    top2 = steps.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    llama = LlamaCpp(lib, gguf, args.threads, n_ctx=len(prompt) + n, f32_cache=True)
    theirs, first = llama.greedy(prompt, n)
    llama.close()
    diff = float(np.abs(first - steps[0].numpy()).max())
    scale = float(steps[0].abs().max())
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    verdict = (
        f"all {n} tokens identical"
        if same is None
        else f"FIRST DIVERGENCE at new token {same}: lmforge {ours[same]}, llama.cpp {theirs[same]}"
    )
    line = (
        f"{preset} (trained {args.train_steps} steps, loss {loss:.3f}): {verdict}; "
        f"first-step logits max |lmforge - llama.cpp| = {diff:.2e} (max |logit| {scale:.1f}); "
        f"smallest top-1 - top-2 logit margin {margin:.2f}"
    )
    return same is None, line


def alternate(a: Callable[[int], float], b: Callable[[int], float], args: argparse.Namespace) -> tuple[list, list]:
    """tokens/s of `a` and of `b` over `repeats` rounds, the order flipping each round, after a warm-up."""
    for fn in (a, b):
        fn(16)  # warm-up: first touch of the weights, llama.cpp's repacking, the allocator
    rates: tuple[list[float], list[float]] = ([], [])
    for r in range(args.repeats):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            rates[i].append(args.gen_tokens / (a, b)[i](args.gen_tokens))
    return rates


@contextlib.contextmanager
def products_timed(seconds: list[float]) -> Iterator[None]:
    """Every quantized layer's kernel call (the weight product alone: not the input's quantization, not the
    thread hand-over) is timed where it runs, inside real decode steps; seconds[0] accumulates the time."""
    saved = {cls: cls.kernel for cls in (Int8Linear, Int4Linear)}

    def timed(kernel: Callable[[QuantLinear, torch.Tensor], torch.Tensor]) -> Callable:
        def run(self: QuantLinear, xa: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            out = kernel(self, xa)  # (CPU kernels return when done: nothing is left in flight)
            seconds[0] += time.perf_counter() - t0
            return out

        return run

    for cls, kernel in saved.items():
        cls.kernel = timed(kernel)
    try:
        yield
    finally:
        for cls, kernel in saved.items():
            cls.kernel = kernel


def measure_speed(
    lib: ModuleType, work: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, int], dict[str, list[tuple[float, float]]]]:
    """Per lmforge precision: (its tokens/s, its llama.cpp file's tokens/s) measured side by side; and the
    size of each exported file; and, for the quantized variants, their step and product times in separate
    timed runs (products_timed). One pair is in memory at a time (the fp32 pair alone holds 4 GB), so that a
    shared machine's page cache keeps both sides' weights."""
    model_dir = work / f"{args.model}-random"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        lmforge.save_pretrained(Transformer(ModelConfig.from_preset(args.model)), model_dir)
    pairs = [(ours, theirs) for ours, theirs, _ in PAIRS if ours in args.pairs]
    sizes: dict[str, int] = {}
    for quant in dict.fromkeys(theirs for _, theirs in pairs):
        gguf = work / f"{args.model}-{quant}.gguf"
        seconds = export_gguf(model_dir, gguf, quant)
        sizes[quant] = gguf.stat().st_size
        print(f"exported {gguf.name} in {seconds:.0f} s ({sizes[quant] / 1e6:.0f} MB)", flush=True)
    results: dict[str, Any] = {}
    split: dict[str, list[tuple[float, float]]] = {}  # quantized variants: (step, products) seconds per token
    loaded: tuple[str, LlamaCpp] | None = None
    generator = torch.Generator().manual_seed(0)
    for ours, theirs in pairs:
        model = lmforge_variant(model_dir, ours)
        if loaded is None or loaded[0] != theirs:
            if loaded is not None:
                loaded[1].close()
            loaded = (theirs, LlamaCpp(lib, work / f"{args.model}-{theirs}.gguf", args.threads, args.gen_tokens + 16))
        results[ours] = alternate(partial(decode_seconds, model, generator=generator), loaded[1].decode_seconds, args)
        a, b = (statistics.median(r) for r in results[ours])
        print(f"lmforge {ours} {a:.1f} tokens/s, llama.cpp {theirs} {b:.1f} tokens/s", flush=True)
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            split[ours] = []
            for _ in range(args.repeats):
                products = [0.0]
                with products_timed(products):
                    step = decode_seconds(model, args.gen_tokens, generator)
                split[ours].append((step / args.gen_tokens, products[0] / args.gen_tokens))
            step, products = (statistics.median(x) * 1e3 for x in zip(*split[ours], strict=True))
            print(f"  lmforge {ours}: {step:.1f} ms/token, of which the products {products:.1f}", flush=True)
        del model
        gc.collect()
    return results, sizes, split


def speed_table(results: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    def cell(r: list[float]) -> str:
        return f"{statistics.median(r):.1f} [{min(r):.1f}-{max(r):.1f}]"

    lines = [
        "| lmforge | tokens/s | llama.cpp | file | tokens/s | lmforge / llama.cpp | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for ours, theirs, goal in PAIRS:
        if ours not in results:
            continue
        file = f"{sizes[theirs] / 1e6:.0f} MB" if theirs in sizes else "-"
        a, b = results[ours]
        x = statistics.median(a) / statistics.median(b)
        verdict = "" if goal is None else f">= {goal}x: {'met' if x >= goal else 'NOT met'}"
        lines.append(f"| {ours} | {cell(a)} | {theirs} | {file} | {cell(b)} | **{x:.2f}x** | {verdict} |")
    return lines


def split_table(results: dict[str, Any], split: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Where a quantized step's time goes, and the ratio it could reach if nothing but its products cost."""
    lines = [
        "| lmforge | ms/token | products | rest | llama.cpp | ms/token | ratio | ratio with no rest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ours, theirs, _ in PAIRS:
        if ours not in split:
            continue
        step, products = (statistics.median(x) * 1e3 for x in zip(*split[ours], strict=True))
        other = 1e3 / statistics.median(results[ours][1])
        lines.append(
            f"| {ours} | {step:.1f} | {products:.1f} | {step - products:.1f} | {theirs} | {other:.1f} "
            f"| {other / step:.2f}x | {other / products:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_cache = os.environ.get("LMFORGE_LLAMACPP_CACHE", str(Path.home() / ".cache" / "lmforge" / "llamacpp"))
    parser.add_argument(
        "--cache", default=default_cache, help=f"llama-cpp-python build cache (default {default_cache})"
    )
    parser.add_argument("--no-build", action="store_true", help="fail instead of compiling llama-cpp-python")
    parser.add_argument("--check-presets", default="tiny-qwen2,tiny-llama", help="parity models ('' to skip)")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps of each parity model")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="parity prompt length")
    parser.add_argument("--check-tokens", type=int, default=48, help="greedy tokens compared per parity model")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="preset for the speed test ('' to skip)")
    parser.add_argument(
        "--pairs",
        default=",".join(p[0] for p in PAIRS),
        help="lmforge precisions to time, each against its llama.cpp file: "
        + ", ".join(f"{a} vs {b}" for a, b, _ in PAIRS),
    )
    parser.add_argument("--gen-tokens", type=int, default=128, help="decode test length (tgN)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both")
    parser.add_argument("--workdir", help="keep models and GGUF files here (default: a temporary directory)")
    parser.add_argument("--record", action="store_true", help=f"append the results to {RESULTS}")
    args = parser.parse_args()
    args.pairs = [p for p in args.pairs.split(",") if p]
    unknown = set(args.pairs) - {p[0] for p in PAIRS}
    if unknown:
        parser.error(f"unknown --pairs {', '.join(sorted(unknown))}; choose from {', '.join(p[0] for p in PAIRS)}")
    torch.set_num_threads(args.threads)

    lib, build = import_llama_cpp(Path(args.cache).expanduser(), build=not args.no_build)
    cpu = cpu_description()
    header = [
        f"Command: `{shlex.join(['python', 'benchmarks/llamacpp.py', *sys.argv[1:]])}`",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%a %b %d %H:%M UTC %Y}. CPU: {cpu['model']}, "
        f"{cpu['cores']} cores, flags {' '.join(cpu['flags'])} (amx: {'yes' if 'amx_tile' in cpu['flags'] else 'no'}); "
        f"load average {os.getloadavg()[0]:.1f}.",
        f"torch {torch.__version__} (capability {cpu['torch_cpu_capability']}), llama-cpp-python {lib.__version__} "
        f"(built in {build.get('seconds', '?')} s, {build.get('cmake_args', '?')}); {args.threads} threads for both.",
        f"llama.cpp CPU features: {system_info(lib)}.",
    ]
    if os.getloadavg()[0] > (os.cpu_count() or 1) / 2:
        # Seen here: llama.cpp's threads spin at a barrier after every op, so on a shared machine a descheduled
        # thread stalls the others; at load ~4 on 2 cores its 2-thread decode fell from ~15 to ~1 tokens/s.
        header.append(
            "WARNING: the machine is busy; with more than one thread llama.cpp's timings collapse under "
            "contention, so compare with --threads 1 or rerun when it is quiet."
        )
    print("\n".join(header), flush=True)

    with tempfile.TemporaryDirectory(prefix="lmforge-llamacpp-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        parity, all_same = [], True
        for preset in [p for p in args.check_presets.split(",") if p]:
            same, line = check_parity(lib, preset, work, args)
            all_same &= same
            parity.append(f"- {line}")
            print(parity[-1], flush=True)
        table: list[str] = []
        if args.model:
            results, sizes, split = measure_speed(lib, work, args)
            table = [
                f"Decode, {args.model} shape (random weights), batch 1, tg{args.gen_tokens} from an empty context, "
                f"median [min-max] of {args.repeats} rounds alternating within each pair (load average at the end "
                f"{os.getloadavg()[0]:.1f}):",
                "",
                *speed_table(results, sizes),
            ]
            if split:
                table += [
                    "",
                    f"Where lmforge's quantized step goes, in {args.repeats} more runs of tg{args.gen_tokens} "
                    "(medians) with every quantized product timed where it runs; the rest is everything else. The last "
                    "column is the ratio to llama.cpp's step above if the rest cost nothing:",
                    "",
                    *split_table(results, split),
                ]
            print("\n".join(table), flush=True)

    if args.record:
        block = ["", "## lmforge vs llama.cpp (issue: llama.cpp itself)", "", *header, ""]
        if parity:
            block += ["Greedy parity on the f32 export (llama.cpp with an f32 KV cache):", "", *parity, ""]
        block += [*table, ""] if table else []
        write_file(RESULTS, RESULTS.read_text().rstrip("\n") + "\n" + "\n".join(block))
        print(f"appended to {RESULTS}")
    if not all_same:
        sys.exit(1)


if __name__ == "__main__":
    main()
