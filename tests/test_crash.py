"""Real crashes: processes killed with SIGKILL mid-write and mid-training, then recovered and resumed.

The fault-injection test runs scripts/fault_injection.py (the same harness that RESULTS.md reports for 100
kills) with a few kills; the others kill a writer of lmforge.atomic at a chosen moment.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmforge import atomic
from lmforge.atomic import is_temp_name, recover, recover_directory, temp_name, write_directory, writer_token

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc: Linux")


def load_harness():
    spec = importlib.util.spec_from_file_location("fault_injection", ROOT / "scripts" / "fault_injection.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_injection"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    fi = load_harness()
    setup = fi.make_workspace(tmp_path / "workspace", steps=40)  # more than 3 launches can get through
    report = fi.fault_injection(setup, tmp_path, kills=3, seed=1, say=lambda *a: None)
    assert report.kills == 3, report.summary()
    assert report.kills_in_save >= 1, report.summary()  # at least one kill hit a checkpoint save
    assert not report.problems, "\n".join(report.problems)
    # What the harness compared, checked here too: each step once, the same losses, nothing left behind.
    straight, killed = fi.records(tmp_path / "straight"), fi.records(tmp_path / "killed")
    assert [r["step"] for r in killed if "loss" in r] == list(range(1, 41))
    assert [r["loss"] for r in killed if "loss" in r] == [r["loss"] for r in straight if "loss" in r]
    assert not [p for p in (tmp_path / "killed").rglob("*") if p.name.startswith(".")]


# --- a writer killed at a chosen moment --------------------------------------------------------------
def start_writer(target: Path, body: str) -> subprocess.Popen:
    """A Python process that replaces `target` with lmforge.atomic.write_directory, set up by `body`."""
    code = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from lmforge import atomic
        target = Path({str(target)!r})
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the writer exited before the moment to kill it"
        assert time.monotonic() < deadline, "the writer never reached the moment to kill it"
        time.sleep(0.005)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # reaped: a dead PID, not a zombie


def old_directory(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old weights")
    (target / "README.md").write_text("kept")
    return target


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_writer_killed_while_writing_leaves_the_old_directory_and_its_partial_is_removed(tmp_path):
    target = old_directory(tmp_path)
    before = snapshot(target)
    proc = start_writer(
        target,
        """
        def write(tmp):
            (tmp / "weights.bin").write_bytes(b"new weights, half")
            time.sleep(600)  # killed here
        atomic.write_directory(target, write, owned=lambda name: name == "weights.bin")
        """,
    )
    partials = lambda: [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # noqa: E731
    wait_for(lambda: any((p / "weights.bin").exists() for p in partials()), proc)
    sigkill(proc)
    assert snapshot(target) == before
    [partial] = partials()
    assert str(proc.pid) in partial.name
    recover(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    write_directory(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"new"), owned=lambda n: n == "weights.bin")
    assert snapshot(target) == {"README.md": b"kept", "weights.bin": b"new"}


def test_writer_killed_between_the_two_renames_is_put_back(tmp_path):
    """Without renameat2(RENAME_EXCHANGE) the swap takes two renames; a kill between them leaves no target,
    and recovery puts the old directory back."""
    target = old_directory(tmp_path)
    before = snapshot(target)
    proc = start_writer(
        target,
        """
        atomic.exchange = lambda a, b: False  # as on a system without renameat2
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if ".old-" in str(dst):
                time.sleep(600)  # killed here: the target is at its .old name, the new one not yet in place
        os.rename = rename
        atomic.write_directory(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"new"), owned=lambda n: True)
        """,
    )
    wait_for(lambda: any(".old-" in p.name for p in tmp_path.iterdir()), proc)
    sigkill(proc)
    assert not target.exists()
    recover_directory(tmp_path)  # what the next start of a run does
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_exchange_swaps_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic.exchange(a, b):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# --- recovery rules ----------------------------------------------------------------------------------
def dead_token() -> str:
    """The "PID-START" token of a process that has exited."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lmforge.atomic import writer_token; print(writer_token())"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, _ = proc.communicate()
    return out.strip()


def test_recovery_removes_dead_writers_work_and_never_a_live_one(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    dead = dead_token()
    pid, start = writer_token().split("-")
    names = {
        "dead partial": f".ckpt.partial-{dead}-0a1b2c3d",
        "dead trash": f".ckpt.trash-{dead}-0a1b2c3d",
        "dead old (target exists)": f".ckpt.old-{dead}-0a1b2c3d",
        "live partial": temp_name("ckpt", "partial"),  # this process: a live writer
        "reused PID": f".ckpt.partial-{pid}-{int(start) + 1}-0a1b2c3d",  # our PID, another process's start
        "another target": f".other.partial-{dead}-0a1b2c3d",
        "not a temporary": ".ckpt.partial-notes",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    assert all(is_temp_name(n) for k, n in names.items() if k != "not a temporary")
    recover(target)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"ckpt", names["live partial"], names["another target"], names["not a temporary"]}
    recover_directory(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt", names["live partial"], names["not a temporary"]}


def test_a_file_write_killed_leaves_the_old_file(tmp_path):
    target = tmp_path / "latest"
    target.write_text("step-00000004\n")
    proc = start_writer(
        target,
        """
        def write(tmp):
            tmp.write_text("step-000")
            time.sleep(600)  # killed here
        atomic.replace_file(target, write)
        """,
    )
    wait_for(lambda: any(".partial-" in p.name and p.stat().st_size for p in tmp_path.iterdir()), proc)
    sigkill(proc)
    assert target.read_text() == "step-00000004\n"
    atomic.write_file(target, "step-00000008\n")  # recovers first
    assert target.read_text() == "step-00000008\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
