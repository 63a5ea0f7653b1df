"""Fault injection: SIGKILL a real `lmforge pretrain` process at random moments - during training steps and
during checkpoint saves - resume it each time, and check that it ends exactly where an uninterrupted run
ends: the same per-step records (losses bit for bit), the same final weights (byte for byte), every step
once in metrics.jsonl, and nothing left behind by the killed writers.

    python scripts/fault_injection.py --kills 100 [--seed 0] [--steps N] [--workdir DIR]

tests/test_crash.py runs this harness with a few kills. After every kill (before resuming) it also checks
that `latest` names an intact checkpoint. Every other kill waits for a checkpoint save to be under way (a
`.step-*.partial-*` directory) and lands at a uniformly random point of it (the save's length is measured
on the uninterrupted run), so that every stage of a save gets hit; the others land at a uniformly random
moment of the next few steps. The delays are seeded. What each kill hit is read off the run directory
right after it: a save's temporary entries (partial: writing the checkpoint or the pointer; trash: pruning
old checkpoints), or none (between saves). A run killed before its first checkpoint starts over
(--overwrite); every other launch resumes (--resume).

A SIGKILL keeps what the kernel's page cache holds, so this tests atomicity and recovery, not fsync
(which only a power cut would test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TIMING = {"tokens_per_s", "mfu", "elapsed_s"}  # per-step fields that measure the machine, not the run
# A model big enough that a checkpoint (weights, AdamW state, fsyncs) takes tens of milliseconds to save.
MODEL = {
    "vocab_size": 300,
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 384,
    "tie_embeddings": True,
    "max_position_embeddings": 64,
    "family": "llama",
}


@dataclass
class Setup:
    data: Path
    model: Path
    steps: int
    save_every: int = 2
    keep_last: int = 2
    eval_every: int = 5

    def command(self, out: Path, *flags: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "lmforge",
            "pretrain",
            "--model",
            str(self.model),
            "--data",
            str(self.data),
            "--out",
            str(out),
            "--steps",
            str(self.steps),
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "2",
            "--save-every",
            str(self.save_every),
            "--keep-last",
            str(self.keep_last),
            "--eval-every",
            str(self.eval_every),
            "--eval-batches",
            "1",
            "--dtype",
            "float32",
            *flags,
        ]


@dataclass
class Report:
    kills: int = 0
    kills_in_save: int = 0
    hit: Counter = field(default_factory=Counter)  # what the kills landed in
    launches: int = 0
    restarts: int = 0  # launches with --overwrite: killed before the first checkpoint
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        hits = ", ".join(f"{k}: {v}" for k, v in sorted(self.hit.items()))
        outcome = "PASS" if not self.problems else f"FAIL ({len(self.problems)} problems)"
        return (
            f"{outcome}: {self.kills} SIGKILLs ({self.kills_in_save} during a checkpoint save; {hits}), "
            f"{self.launches} launches ({self.restarts} restarted from scratch), {self.seconds:.0f} s"
        )


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }


def corpus_texts(n: int = 80) -> list[str]:
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "the",
        "dog",
        "ran",
        "to",
        "the",
        "red",
        "door",
        "and",
        "back",
        "again",
    ]
    return [" ".join(words[(i + j) % len(words)] for j in range(40 + i % 7)) + "." for i in range(n)]


def make_workspace(root: Path, steps: int, **kw) -> Setup:
    """A tokenizer, prepared shards and a model config under `root`."""
    from lmforge.data import prepare
    from lmforge.tokenizer import Tokenizer

    root.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts()
    (root / "corpus.txt").write_text("\n\n".join(texts))
    for i, text in enumerate(texts):
        (root / f"doc{i:03d}.txt").write_text(text)
    tok = Tokenizer.train(texts, MODEL["vocab_size"], "llama3", min_frequency=1)
    prepare([str(root / "doc*.txt")], tok, root / "data", val_fraction=0.1, seed=0, progress=False)
    (root / "model.json").write_text(json.dumps(MODEL))
    return Setup(root / "data", root / "model.json", steps, **kw)


# --- reading a run directory -------------------------------------------------------------------------
def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_logged_step(metrics: Path) -> int:
    """The step of the last complete record (0 if none); tolerates a torn last line."""
    try:
        data = metrics.read_bytes()
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def temp_entries(root: Path) -> list[Path]:
    """Everything under `root` that is a temporary of lmforge.atomic (or any other writer's .tmp file)."""
    from lmforge.atomic import is_temp_name

    if not root.exists():
        return []
    return [p for p in root.rglob("*") if is_temp_name(p.name) or ".tmp" in p.name]


def resume_point(run_dir: Path) -> int | None:
    """The step a launch will resume from (None: nothing to resume, the run starts over)."""
    from lmforge.train.checkpoints import checkpoint_damage, checkpoint_steps

    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        return int(pointer.read_text().strip().removeprefix("step-"))
    intact = [s for s, p in checkpoint_steps(root).items() if checkpoint_damage(p) is None]
    return max(intact) if intact else None


def check_latest(run_dir: Path) -> str | None:
    """A problem with `latest` (it must always name an intact checkpoint), or None."""
    from lmforge.train.checkpoints import checkpoint_damage

    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    damage = checkpoint_damage(pointer.parent / pointer.read_text().strip())
    return None if damage is None else f"latest points to a damaged checkpoint: {damage}"


# --- running -----------------------------------------------------------------------------------------
def launch(setup: Setup, out: Path, log: Path) -> tuple[subprocess.Popen, int | None]:
    point = resume_point(out)
    flags = ["--resume"] if point is not None else (["--overwrite"] if out.exists() and any(out.iterdir()) else [])
    with log.open("ab") as err:
        proc = subprocess.Popen(setup.command(out, *flags), stdout=subprocess.DEVNULL, stderr=err, env=child_env())
    return proc, point


def run_to_end(setup: Setup, out: Path, log: Path, report: Report | None = None) -> None:
    proc, point = launch(setup, out, log)
    if report is not None:
        report.launches += 1
        report.restarts += point is None and report.launches > 1
    if proc.wait() != 0:
        raise RuntimeError(f"lmforge pretrain failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")


def _wait(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """Poll `ready()` until true (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.001)
    raise TimeoutError("the run neither reached the moment to kill nor ended")


def kill_once(
    setup: Setup, out: Path, log: Path, rng: random.Random, timing: tuple[float, float], report: Report
) -> bool:
    """Launch (resuming), SIGKILL at a random moment, check the directory. False if the run finished first.

    Every other kill waits for a checkpoint save to start and lands at a random point of it (`timing`: the
    seconds of a step and of a save, as measured on the uninterrupted run); the others land at a random
    moment of the next few steps."""
    step_s, save_s = timing
    metrics = out / "metrics.jsonl"
    before = metrics.stat().st_ino if metrics.exists() else None
    stale = last_logged_step(metrics) > (resume_point(out) or 0)
    proc, point = launch(setup, out, log)
    report.launches += 1
    report.restarts += point is None and report.launches > 1
    start = point or 0

    def training() -> bool:  # this launch has logged a step (not a record left by the killed one)
        if stale and (not metrics.exists() or metrics.stat().st_ino == before):
            return False
        return last_logged_step(metrics) > start

    def saving() -> bool:  # a checkpoint save is under way
        root = out / "checkpoints"
        try:
            return any(".partial-" in p.name for p in root.iterdir())
        except FileNotFoundError:
            return False

    if report.kills % 2 == 1:
        reached = _wait(proc, training)
        delay = rng.uniform(0, 3 * setup.save_every * step_s)
    else:
        reached = _wait(proc, saving)
        delay = rng.uniform(0, save_s)
    if reached:
        time.sleep(delay)
    if proc.poll() is not None:
        if proc.returncode != 0:
            tail = log.read_text()[-2000:]
            report.problems.append(f"launch {report.launches} failed (exit {proc.returncode}): {tail}")
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reaped: its PID is dead, not a zombie
    report.kills += 1
    left = temp_entries(out / "checkpoints")
    if left:
        report.kills_in_save += 1
        kinds = sorted({p.name.rsplit(".", 1)[-1].split("-")[0] for p in left})
        report.hit["save (" + "+".join(kinds) + ")"] += 1
    else:
        report.hit["between saves"] += 1
    problem = check_latest(out)
    if problem:
        report.problems.append(f"after kill {report.kills}: {problem}")
    return True


def step_and_save_seconds(history: list[dict], save_every: int) -> tuple[float, float]:
    """Median seconds of a step, and of a checkpoint save (how much longer a step that saved took)."""
    t = {r["step"]: r["elapsed_s"] for r in history if "loss" in r and "elapsed_s" in r}
    gaps = {s: t[s] - t[s - 1] for s in t if s - 1 in t}
    saving = [g for s, g in gaps.items() if (s - 1) % save_every == 0]
    plain = [g for s, g in gaps.items() if (s - 1) % save_every != 0]
    step_s = statistics.median(plain) if plain else 0.01
    return step_s, max(statistics.median(saving) - step_s, 0.002) if saving else 0.02


def compare(straight: Path, killed: Path) -> list[str]:
    """Differences between the uninterrupted run and the killed-and-resumed one."""
    problems = []
    a = [{k: v for k, v in r.items() if k not in TIMING} for r in records(straight)]
    b = [{k: v for k, v in r.items() if k not in TIMING} for r in records(killed)]
    steps = [r["step"] for r in b if "loss" in r]
    if steps != sorted(set(steps)) or steps != list(range(1, len(steps) + 1)):
        dupes = sorted(s for s, n in Counter(steps).items() if n > 1)
        problems.append(f"metrics.jsonl does not hold every step once (repeated: {dupes[:10]}, {len(steps)} records)")
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        problems.append(
            f"records differ from the uninterrupted run's at record {first} "
            f"({a[first] if first < len(a) else None} vs {b[first] if first < len(b) else None})"
        )
    names_a = sorted(p.name for p in (straight / "checkpoints").iterdir())
    names_b = sorted(p.name for p in (killed / "checkpoints").iterdir())
    if names_a != names_b:
        problems.append(f"checkpoints differ: {names_a} vs {names_b}")
    final = (straight / "checkpoints" / "latest").read_text().strip()
    wa = (straight / "checkpoints" / final / "model.safetensors").read_bytes()
    wb_file = killed / "checkpoints" / final / "model.safetensors"
    if not wb_file.is_file() or wb_file.read_bytes() != wa:
        problems.append("the final weights differ from the uninterrupted run's")
    left = temp_entries(killed)
    if left:
        problems.append(f"leftovers: {[str(p.relative_to(killed)) for p in left]}")
    return problems


def fault_injection(setup: Setup, workdir: Path, kills: int, seed: int = 0, say=print) -> Report:
    """Run uninterrupted, then with `kills` SIGKILLs and resumes; compare."""
    rng = random.Random(seed)
    report = Report()
    t0 = time.perf_counter()
    straight, killed, log = workdir / "straight", workdir / "killed", workdir / "stderr.log"
    run_to_end(setup, straight, log)
    history = records(straight)
    timing = step_and_save_seconds(history, setup.save_every)
    say(f"uninterrupted run: {setup.steps} steps of {timing[0] * 1e3:.0f} ms, saves of {timing[1] * 1e3:.0f} ms")
    finished = False
    while report.kills < kills and not finished:
        finished = not kill_once(setup, killed, log, rng, timing, report)  # it got to its end first
        if report.kills % 10 == 0 and not finished:
            say(f"  {report.kills} kills, {report.kills_in_save} during saves")
    if not finished:
        run_to_end(setup, killed, log, report)
    warnings = [line for line in log.read_text().splitlines() if "warning" in line or "Traceback" in line]
    if warnings:
        report.problems.append(f"unexpected stderr: {warnings[:5]}")
    report.problems += compare(straight, killed)
    report.seconds = time.perf_counter() - t0
    return report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 6 per kill, at least 40)")
    p.add_argument("--workdir", type=Path, default=None, help="where to run (default: a temporary directory)")
    args = p.parse_args(argv)
    steps = args.steps or max(40, 6 * args.kills)
    with tempfile.TemporaryDirectory(prefix="lmforge-faults-") as tmp:
        workdir = args.workdir or Path(tmp)
        setup = make_workspace(workdir / "workspace", steps)
        report = fault_injection(setup, workdir, args.kills, args.seed)
    print(report.summary())
    for problem in report.problems:
        print("  " + problem)
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} CPUs, seed {args.seed}, {steps} steps")
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmforge, here and in the runs
    sys.exit(main())
