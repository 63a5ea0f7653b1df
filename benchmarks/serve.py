"""Serving benchmark: `lmforge serve` (and `transformers serve` side by side) under load, in the style of vLLM's
benchmarks/benchmark_serving.py (REFERENCE.md section 7).

Loopback only. The script starts each server on the same checkpoint (or connects to one with --url), sends one
warm-up request, then streams `/v1/completions` requests (async, aiohttp) in two kinds of runs:

- request-rate runs: arrivals with Gamma(shape=burstiness, scale=1/(rate*burstiness)) gaps (burstiness 1 =
  Poisson), the first request at once;
- fixed-concurrency runs: N clients, each sending its next request as soon as the last one ended.

Every run is bounded in requests and in seconds (no request starts after `--max-seconds`; those still running
`--drain-seconds` later are cancelled and reported as cut). Both servers run side by side and every run goes to
each in turn, the order alternating from run to run, so that the machine's load falls on both.

Prompts are windows of standard-library source text, `--input-len` tokens with the BOS the server adds,
decoded to text (both servers accept text; `--prompt-kind ids` sends random token ids, lmforge only); every
request gets a prompt of its own (no prefix-cache hits beyond BOS) and each server sees the same sequence.
Greedy, `max_tokens = --output-len`, and the end-of-sequence token ignored (random weights emit gibberish of any
length otherwise): lmforge takes vLLM's `ignore_eos`, transformers a per-request `generation_config` with
`eos_token_id: -1` (it refuses unknown fields with 422).

Per request: TTFT = time to the first chunk with text; ITL = gaps between later chunks with text; TPOT =
(E2E - TTFT) / (output tokens - 1), output tokens from the usage the stream ends with; E2E. Per run: mean,
median, p99 of each, request and output-token throughput (over the run's wall time), errors (HTTP status,
transport errors, an `error` in the stream) and outputs shorter than asked. The server's RSS
(/proc/PID/status) is sampled throughout. `--soak-minutes N` instead runs one fixed concurrency for N minutes
and reports RSS start/end/max and the throughput minute by minute.

    python benchmarks/serve.py --servers lmforge,transformers      # the sweep, JSON + PNG in --out
    python benchmarks/serve.py --servers lmforge --soak-minutes 5   # memory over a soak
    python benchmarks/serve.py --url http://127.0.0.1:8000 --server-pid PID --tokenizer DIR

The checkpoint (random weights, SmolLM2-135M's shape, a 49152-token BPE trained on the standard library) is
written to --checkpoint once and reused. Both servers get KV caches of the same 16,384 tokens (--kv-blocks,
--tf-num-blocks) and lmforge's per-step token budget (--tf-max-batch-tokens); transformers' defaults size its
cache from the machine's memory. Results: benchmarks/RESULTS.md, "Serving under load".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CHECKPOINT = "/tmp/lmforge-bench-serve/smollm2-135m-like"
VOCAB = 49152
SOAK_PROMPTS = 3000  # requests of a soak at most (its time bound ends it first here)
# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), random weights, fp32.
SMOLLM2_135M = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": VOCAB,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}


# --- the checkpoint and the prompts --------------------------------------------------------------------
def stdlib_texts(limit_chars: int = 12_000_000) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(lib.rglob("*.py")):
        if "test" in p.parts or "tests" in p.parts:
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total > limit_chars:
            break
    return texts


def make_checkpoint(out: Path) -> None:
    """Random SmolLM2-135M-shaped weights plus a tokenizer, in HF format (what `lmforge convert` writes)."""
    from lmforge import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train(stdlib_texts(), VOCAB, "llama3")
    cfg = {**SMOLLM2_135M, "bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.stop_token_ids)}
    spec = out.parent / (out.name + ".config.json")
    spec.write_text(json.dumps(cfg, indent=1))
    cmd = [sys.executable, "-m", "lmforge", "convert", str(spec), str(out), "--dtype", "float32"]
    subprocess.run(cmd, check=True)
    tok.save(out)


def make_prompts(tokenizer_dir: Path, n: int, input_len: int, kind: str, seed: int) -> list[Any]:
    """`n` prompts of `input_len` tokens each (counting the BOS the server puts in front of text)."""
    from lmforge import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    special = len(tok.encode("x", add_special_tokens=True)) - len(tok.encode("x"))
    want = input_len - special
    if kind == "ids":
        vocab = len(tok.get_vocab()) - 16  # leave out the special tokens at the end of the vocabulary
        return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(n)]
    corpus = tok.encode("\n".join(stdlib_texts(3_000_000)))
    prompts = []
    while len(prompts) < n:
        start = rng.randrange(len(corpus) - 4 * want)
        take = want
        for _ in range(8):  # decoding then re-encoding a window can merge or split tokens at its edges
            text = tok.decode(corpus[start : start + take])
            got = len(tok.encode(text))
            if got == want:
                break
            take += want - got
        prompts.append(text)
    return prompts


# --- servers -----------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str  # "lmforge" | "transformers"
    url: str
    model: str | None  # the "model" field to send
    pid: int | None
    command: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def payload(self, prompt: Any, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        if self.model is not None:
            body["model"] = self.model
        if self.name == "transformers":
            body["generation_config"] = json.dumps(
                {"max_new_tokens": max_tokens, "do_sample": False, "eos_token_id": -1}
            )
        else:
            body["ignore_eos"] = True
            body["stream_options"] = {"include_usage": True}
        return body


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, checkpoint: Path, args: argparse.Namespace, log_dir: Path) -> Server:
    port = free_port()
    if name == "lmforge":
        cmd = [sys.executable, "-m", "lmforge", "serve", "--model", str(checkpoint), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--max-batch", str(args.max_batch), "--dtype", args.dtype]
        cmd += ["--kv-blocks", str(args.kv_blocks)]
        model = None
    elif name == "transformers":
        entry = (
            "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
        )
        cmd = [sys.executable, "-c", entry, "serve", "--continuous-batching", "--device", "cpu"]
        cmd += ["--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port)]
        if args.tf_num_blocks:
            cmd += ["--cb-num-blocks", str(args.tf_num_blocks)]
        if args.tf_max_batch_tokens:
            cmd += ["--cb-max-batch-tokens", str(args.tf_max_batch_tokens)]
        cmd.append(str(checkpoint))
        model = str(checkpoint)
    else:
        raise SystemExit(f"unknown server {name!r}: lmforge or transformers")
    log = open(log_dir / f"{name}.server.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", model, proc.pid, cmd, proc)
    deadline = time.monotonic() + args.startup_timeout
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop_server(server)
    raise SystemExit(f"{name} server not healthy after {args.startup_timeout} s; see {log.name}")


def stop_server(server: Server) -> None:
    if server.proc is None or server.proc.poll() is not None:
        return
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def rss_kib(pid: int | None) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB of process `pid`."""
    if pid is None:
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class RssSampler:
    """Samples the server's RSS every `interval` seconds on the event loop."""

    def __init__(self, pid: int | None, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []  # (perf_counter, KiB)
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            s = rss_kib(self.pid)
            if s is not None:
                self.samples.append((time.perf_counter(), s[0]))
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def between(self, t0: float, t1: float) -> list[int]:
        return [kib for t, kib in self.samples if t0 <= t <= t1]


# --- one request -------------------------------------------------------------------------------------
@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    chunks: int = 0
    cut: bool = False  # still running when the run's hard time bound passed, and cancelled

    @property
    def e2e(self) -> float:
        return self.end - self.start


async def send(session: Any, server: Server, prompt: Any, max_tokens: int, timeout: float) -> Result:
    import aiohttp

    r = Result(start=time.perf_counter())
    last = r.start
    usage = None
    try:
        async with session.post(
            server.url + "/v1/completions",
            json=server.payload(prompt, max_tokens),
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                r.end = time.perf_counter()
                return r
            async for raw in resp.content:  # one SSE line at a time
                line = raw.strip()
                if not line:
                    continue
                data = line.decode().removeprefix("data: ")
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    break
                now = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    if r.chunks == 0:
                        r.ttft = now - r.start
                    else:
                        r.itl.append(now - last)
                    last = now
                    r.chunks += 1
    except asyncio.CancelledError:  # the run's hard time bound: report what had arrived
        r.cut, r.end, r.output_tokens = True, time.perf_counter(), r.chunks
        return r
    except Exception as e:  # transport errors, timeouts: counted, never fatal to the run
        r.error = f"{type(e).__name__}: {e}"[:200]
    r.end = time.perf_counter()
    if usage is not None:
        r.prompt_tokens = usage.get("prompt_tokens")
        r.output_tokens = int(usage.get("completion_tokens") or 0)
    else:
        r.output_tokens = r.chunks
    r.ok = r.error is None and r.chunks > 0
    if r.error is None and r.chunks == 0:
        r.error = "no text in the stream"
    return r


# --- runs --------------------------------------------------------------------------------------------
class PromptFeed:
    def __init__(self, prompts: list[Any], start: int = 0) -> None:
        self.prompts, self.i = prompts, start

    def next(self) -> Any:
        p = self.prompts[self.i % len(self.prompts)]
        self.i += 1
        return p


async def finish(tasks: list[asyncio.Task], deadline: float) -> None:
    """Await `tasks`, cancelling those still running at `deadline` (perf_counter seconds)."""
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def run_concurrency(session, server, feed, c, args, max_requests, max_seconds):
    """`c` clients, each sending its next request when the last one ended; (results, start, end)."""
    issued = 0
    results: list[Result] = []
    t0 = time.perf_counter()

    async def client() -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() - t0 < max_seconds:
            issued += 1
            r = await send(session, server, feed.next(), args.output_len, args.request_timeout)
            results.append(r)
            if r.cut:
                return

    await finish([asyncio.create_task(client()) for _ in range(c)], t0 + max_seconds + args.drain_seconds)
    return results, t0, max([r.end for r in results] or [time.perf_counter()])


async def run_rate(session, server, feed, rate, args, max_requests, max_seconds):
    """Requests at Gamma-distributed gaps (shape = burstiness, mean 1/rate); (results, start, end)."""
    rng = np.random.default_rng(args.seed)
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    while len(tasks) < max_requests and time.perf_counter() - t0 < max_seconds:
        tasks.append(asyncio.create_task(send(session, server, feed.next(), args.output_len, args.request_timeout)))
        await asyncio.sleep(rng.gamma(args.burstiness, 1.0 / (rate * args.burstiness)))
    await finish(tasks, t0 + max_seconds + args.drain_seconds)
    results = [t.result() for t in tasks if not t.cancelled()]
    return results, t0, max([r.end for r in results] or [time.perf_counter()])


def stats(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[Result], t0: float, t1: float, output_len: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok and not r.cut]
    cut = [r for r in results if r.cut]
    duration = t1 - t0
    out_tokens = sum(r.output_tokens for r in ok) + sum(r.output_tokens for r in cut)  # cut: chunks received
    # Peak number of requests in flight at once.
    edges = sorted([(r.start, 1) for r in results] + [(r.end, -1) for r in results])
    live = peak = 0
    for _, d in edges:
        live += d
        peak = max(peak, live)
    errors = [r.error for r in results if not r.ok and not r.cut]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(e or "" for e in errors))[:5],
        "cut": len(cut),
        "short_outputs": sum(r.output_tokens < output_len for r in ok),
        "duration_s": duration,
        "peak_in_flight": peak,
        "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None] or [0])),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": stats([x for r in ok for x in r.itl]),
        "e2e_ms": stats([r.e2e for r in ok]),
        # per request, in sending order: start (s from the run's start), TTFT and E2E (ms), output tokens
        "per_request": [
            {"start_s": r.start - t0, "ttft_ms": r.ttft * 1e3, "e2e_ms": r.e2e * 1e3, "tokens": r.output_tokens}
            | ({"error": r.error} if r.error else {})
            | ({"cut": True} if r.cut else {})
            for r in sorted(results, key=lambda r: r.start)
        ],
    }


def rss_summary(samples: list[int]) -> dict[str, float | None]:
    if not samples:
        return {"start_mib": None, "end_mib": None, "max_mib": None}
    return {"start_mib": samples[0] / 1024, "end_mib": samples[-1] / 1024, "max_mib": max(samples) / 1024}


def print_run(server: str, label: str, s: dict[str, Any]) -> None:
    f = lambda d: f"{d['p50']:.0f}/{d['p99']:.0f}" if d["p50"] is not None else "-"  # noqa: E731
    print(
        f"  {server:<12} {label:<14} req {s['completed']:>3}/{s['requests']:<3} err {s['errors']} cut {s['cut']} "
        f"{s['duration_s']:6.1f}s  {s['request_throughput']:.3f} req/s  {s['output_throughput']:7.1f} tok/s  "
        f"TTFT p50/p99 {f(s['ttft_ms'])} ms  TPOT {f(s['tpot_ms'])} ms  ITL {f(s['itl_ms'])} ms  "
        f"E2E {f(s['e2e_ms'])} ms  load {s['loadavg_before'][0]:.2f}->{s['loadavg_after'][0]:.2f}",
        flush=True,
    )


def run_plan(args: argparse.Namespace) -> list[tuple[str, float, int, int]]:
    """(kind, value, requests at most, index of its first prompt) of each run: no prompt is sent twice."""
    if args.soak_minutes > 0:
        runs = [("soak", float(args.soak_concurrency), SOAK_PROMPTS)]
    else:
        runs = [("concurrency", float(c), max(args.min_requests, args.rounds * c)) for c in args.concurrency]
        runs += [("rate", r, args.rate_requests) for r in args.rates]
    offsets = np.cumsum([0] + [n for _, _, n in runs]).tolist()
    return [(k, v, n, int(o)) for (k, v, n), o in zip(runs, offsets, strict=False)]


async def bench(servers: list[Server], prompts: list[Any], args: argparse.Namespace, save) -> list[dict[str, Any]]:
    """Warm each server up, then run the plan, each run on every server in turn (the order alternating from
    run to run, so that a change in the machine's load falls on both)."""
    import aiohttp

    outs = [{"server": s.name, "command": s.command, "url": s.url, "pid": s.pid, "runs": []} for s in servers]
    samplers = [RssSampler(s.pid, args.rss_interval) for s in servers]
    for sampler in samplers:
        sampler.start()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20) as session:
        live = []
        for server, out in zip(servers, outs, strict=True):
            t = time.perf_counter()
            warm = await send(session, server, prompts[-1], args.output_len, args.request_timeout)
            out["warmup"] = {"ok": warm.ok, "error": warm.error, "seconds": time.perf_counter() - t}
            print(f"  {server.name:<12} warm-up {'ok' if warm.ok else warm.error} in {out['warmup']['seconds']:.1f} s")
            rss = rss_kib(server.pid)
            out["rss_after_warmup_mib"] = rss[0] / 1024 if rss else None
            if warm.ok:
                live.append(server)
            else:
                out["failed"] = warm.error
        for step, (kind, value, n, offset) in enumerate(run_plan(args)):
            order = live if step % 2 == 0 else live[::-1]
            for server in order:
                if kind == "rate" and server.name not in args.rate_servers:
                    continue
                i = servers.index(server)
                feed = PromptFeed(prompts[: len(prompts) - 1], start=offset)  # every server: the same prompts
                load0 = os.getloadavg()
                if kind == "soak":
                    seconds = args.soak_minutes * 60
                    results, t0, t1 = await run_concurrency(session, server, feed, int(value), args, n, seconds)
                    label = f"soak c={int(value)}"
                elif kind == "concurrency":
                    c = int(value)
                    results, t0, t1 = await run_concurrency(session, server, feed, c, args, n, args.max_seconds)
                    label = f"concurrency={c}"
                else:
                    results, t0, t1 = await run_rate(session, server, feed, value, args, n, args.max_seconds)
                    label = f"rate={value:g}/s"
                s = summarize(results, t0, t1, args.output_len)
                s.update(kind=kind, value=value, label=label, loadavg_before=load0, loadavg_after=os.getloadavg())
                s["rss"] = rss_summary(samplers[i].between(t0, t1))
                if kind == "soak":
                    s["rss_samples"] = [(t - t0, kib / 1024) for t, kib in samplers[i].samples if t0 <= t <= t1]
                    s["throughput_by_minute"] = by_minute(results, t0, args.soak_minutes)
                outs[i]["runs"].append(s)
                print_run(server.name, label, s)
                save(outs)
    for sampler in samplers:
        await sampler.stop()
    return outs


def by_minute(results: list[Result], t0: float, minutes: float) -> list[dict[str, float]]:
    rows = []
    for m in range(int(np.ceil(minutes))):
        a, b = t0 + 60 * m, t0 + 60 * (m + 1)
        done = [r for r in results if r.ok and a <= r.end < b]
        rows.append(
            {"minute": m + 1, "completed": len(done), "output_tokens_per_s": sum(r.output_tokens for r in done) / 60}
        )
    return rows


# --- the record --------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")).split())
        info["cpu"] = name
        info["simd"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    except (OSError, StopIteration):
        pass
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()  # what a fresh process on this machine gets (the servers too)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    info["date"] = time.strftime("%a %b %d %H:%M:%S %Z %Y")
    info["loadavg"] = os.getloadavg()
    return info


def ratios(record: dict[str, Any]) -> list[dict[str, Any]]:
    by = {s["server"]: {r["label"]: r for r in s.get("runs", [])} for s in record["servers"]}
    lines = []
    lm = by.get("lmforge", {})
    one = lm.get("concurrency=1")
    for label, r in lm.items():
        row: dict[str, Any] = {"label": label}
        if one and r["kind"] == "concurrency":
            row["vs_one_at_a_time"] = r["output_throughput"] / one["output_throughput"]
        other = by.get("transformers", {}).get(label)
        if other and other["output_throughput"] > 0:
            row["vs_transformers"] = r["output_throughput"] / other["output_throughput"]
        lines.append(row)
    return lines


def plot(record: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (`pip install 'lmforge[plot]'`): no plot", file=sys.stderr)
        return
    soak = [(s["server"], r) for s in record["servers"] for r in s.get("runs", []) if r["kind"] == "soak"]
    if soak:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, r in soak:
            t, mib = zip(*r["rss_samples"], strict=True) if r["rss_samples"] else ((), ())
            axes[0].plot(np.asarray(t) / 60, mib, label=name)
            axes[1].plot(
                [m["minute"] for m in r["throughput_by_minute"]],
                [m["output_tokens_per_s"] for m in r["throughput_by_minute"]],
                "o-",
                label=name,
            )
        axes[0].set(xlabel="minutes", ylabel="server RSS (MiB)", title="RSS over the soak")
        axes[1].set(xlabel="minute", ylabel="output tokens/s", title="throughput per minute", ylim=(0, None))
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
    else:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for n, s in enumerate(record["servers"]):
            color = f"C{n}"
            conc = [r for r in s.get("runs", []) if r["kind"] == "concurrency"]
            rate = [r for r in s.get("runs", []) if r["kind"] == "rate"]
            if conc:
                x = [r["value"] for r in conc]
                axes[0].plot(x, [r["output_throughput"] for r in conc], "o-", color=color, label=s["server"])
                axes[0].set_xticks(x)
                axes[1].plot(x, [r["tpot_ms"]["p50"] for r in conc], "o-", color=color, label=f"{s['server']} TPOT p50")
                axes[1].plot(
                    x, [r["ttft_ms"]["p50"] for r in conc], "s--", color=color, label=f"{s['server']} TTFT p50"
                )
                axes[1].plot(x, [r["e2e_ms"]["p50"] for r in conc], "^:", color=color, label=f"{s['server']} E2E p50")
            if rate:
                x = [r["value"] for r in rate]
                axes[2].plot(x, [r["output_throughput"] for r in rate], "o-", color=color, label=f"{s['server']} tok/s")
        axes[0].set(
            xlabel="concurrent streams", ylabel="output tokens/s", title="throughput vs concurrency", ylim=(0, None)
        )
        axes[1].set(xlabel="concurrent streams", ylabel="ms", yscale="log", title="latency vs concurrency")
        axes[2].set(
            xlabel="request rate (req/s, Poisson)" if record["args"]["burstiness"] == 1 else "request rate (req/s)",
            ylabel="output tokens/s",
            title="throughput vs request rate",
            ylim=(0, None),
        )
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    cfg = record["args"]
    fig.suptitle(
        f"{Path(cfg['checkpoint']).name}: input {cfg['input_len']} / output {cfg['output_len']} tokens; "
        f"{record['machine'].get('cpu', '')}, {record['machine']['cpus']} CPUs",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="HF directory to serve (written if absent)")
    p.add_argument("--servers", default="lmforge,transformers", help="which servers to start, in order")
    p.add_argument("--url", help="benchmark a running server instead (loopback), e.g. http://127.0.0.1:8000")
    p.add_argument("--url-kind", default="lmforge", choices=["lmforge", "transformers"], help="what --url runs")
    p.add_argument("--server-pid", type=int, help="with --url: the server's PID, for RSS sampling")
    p.add_argument("--tokenizer", help="directory with tokenizer.json for the prompts (default: --checkpoint)")
    p.add_argument("--dtype", default="float32", help="both servers' --dtype")
    p.add_argument("--max-batch", type=int, default=16, help="lmforge serve --max-batch")
    p.add_argument("--kv-blocks", type=int, default=1024, help="lmforge serve --kv-blocks (0: automatic)")
    p.add_argument(
        "--tf-num-blocks",
        type=int,
        default=64,
        help="transformers serve --cb-num-blocks (256-token pages; 0: automatic)",
    )
    p.add_argument(
        "--tf-max-batch-tokens",
        type=int,
        default=272,
        help="transformers serve --cb-max-batch-tokens (0: automatic); 272 = lmforge's prefill chunk + 16 decode rows",
    )
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompt-kind", default="text", choices=["text", "ids"])
    p.add_argument("--concurrency", default="1,4,8,16", help="fixed-concurrency runs ('' for none)")
    p.add_argument("--rounds", type=int, default=2, help="requests per fixed-concurrency run = rounds x concurrency")
    p.add_argument("--min-requests", type=int, default=6, help="at least this many requests per concurrency run")
    p.add_argument("--rates", default="0.25,0.5,1", help="request rates in req/s ('' for none)")
    p.add_argument("--rate-servers", default="lmforge", help="the servers the request-rate runs are for")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    p.add_argument("--rate-requests", type=int, default=24, help="requests per rate run at most")
    p.add_argument("--max-seconds", type=float, default=60.0, help="no request starts after this many seconds of a run")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=240.0,
        help="requests still running this long after --max-seconds are cancelled (reported as cut)",
    )
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument(
        "--soak-minutes", type=float, default=0.0, help="run one fixed concurrency this long instead of the sweep"
    )
    p.add_argument("--soak-concurrency", type=int, default=8)
    p.add_argument("--rss-interval", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/lmforge-bench-serve/results", help="folder for the JSON, PNG and server logs")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.rates = [float(x) for x in args.rates.split(",") if x]
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise SystemExit("--url must be a loopback address: this benchmark is not meant for remote servers")

    checkpoint = Path(args.checkpoint)
    if not args.url and not (checkpoint / "config.json").is_file():
        print(f"writing the checkpoint to {checkpoint}", flush=True)
        make_checkpoint(checkpoint)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("soak" if args.soak_minutes else "sweep")

    runs = sum(n for _, _, n, _ in run_plan(args)) + 1  # the last one is the warm-up's
    prompts = make_prompts(Path(args.tokenizer or checkpoint), runs, args.input_len, args.prompt_kind, args.seed)
    record: dict[str, Any] = {"machine": machine(), "argv": sys.argv, "args": vars(args), "servers": []}
    record["args"]["checkpoint"] = str(checkpoint)
    print(
        f"{record['machine'].get('cpu')} x{record['machine']['cpus']}, load {record['machine']['loadavg']}", flush=True
    )

    names = [args.url_kind] if args.url else [s for s in args.servers.split(",") if s]
    servers: list[Server] = []

    def save(outs: list[dict[str, Any]]) -> None:
        record["servers"] = outs
        (out_dir / f"{tag}.json").write_text(json.dumps(record, indent=1, default=float))

    try:
        for name in names:
            if args.url:
                model = str(checkpoint) if name == "transformers" else None
                servers.append(Server(name, args.url.rstrip("/"), model, args.server_pid))
            else:
                t = time.perf_counter()
                servers.append(start_server(name, checkpoint, args, out_dir))
                print(f"  {name:<12} started (pid {servers[-1].pid}) in {time.perf_counter() - t:.1f} s", flush=True)
        save(asyncio.run(bench(servers, prompts, args, save)))
    finally:
        for server in servers:
            stop_server(server)
    record["ratios"] = ratios(record)
    record["machine"]["loadavg_end"] = os.getloadavg()
    (out_dir / f"{tag}.json").write_text(json.dumps(record, indent=1, default=float))
    for row in record["ratios"]:
        parts = [f"{k} {v:.2f}x" for k, v in row.items() if k != "label"]
        if parts:
            print(f"  lmforge {row['label']:<16} " + ", ".join(parts))
    plot(record, out_dir / f"{tag}.png")
    print(f"wrote {out_dir / (tag + '.json')} and {out_dir / (tag + '.png')}")


if __name__ == "__main__":
    main()
