"""Replacing files and directories so that a crash - even `kill -9` or a power cut - never leaves a
half-written one in their place, and cleaning up after writers that died.

Everything is written to a hidden sibling named for the writer, then renamed over the target:

    .NAME.partial-PID-START-RANDOM    being written (or, after an exchange, the old content being deleted)
    .NAME.old-PID-START-RANDOM        the previous NAME, between the two renames of the fallback swap
    .NAME.trash-PID-START-RANDOM      a directory being deleted (`remove_tree`)

PID and START (the process's start time, from /proc) identify the writer, so that `recover` can tell a
dead writer's leftovers from a live writer's work even when the PID has been reused; it never touches the
files of a live writer. Durability follows SQLite and etcd: every written file and the temporary directory
are fsynced before the rename, and the parent directory after it, so that a rename that survived a power
cut names complete content.

A directory is swapped in with one `renameat2(RENAME_EXCHANGE)` on Linux (there is no moment without the
target); elsewhere, or on a filesystem without it, with two renames and an `.old-*` sibling that `recover`
puts back if the process died between them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError

KINDS = ("partial", "old", "trash")
_TEMP = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|old|trash)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+")


# --- who is writing ----------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None if it does not exist
    or /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    return fields[0], int(fields[19])


_token: tuple[int, str] | None = None


def writer_token() -> str:
    """ "PID-START" of this process (START is 0 where /proc is unavailable)."""
    global _token
    pid = os.getpid()
    if _token is None or _token[0] != pid:  # recomputed in a forked child
        stat = _proc_stat(pid)
        _token = (pid, f"{pid}-{stat[1] if stat else 0}")
    return _token[1]


def writer_alive(pid: int, start: int) -> bool:
    """Whether the process that wrote a temporary name may still be running. A zombie, or a live process
    with the same PID but another start time (a reused PID), is not that writer."""
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        return state not in ("Z", "X") and (start == 0 or started == start)
    if os.path.isdir("/proc/self"):  # /proc works and has no such process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temp_name(name: str, kind: str) -> str:
    assert kind in KINDS, kind
    return f".{name}.{kind}-{writer_token()}-{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    return _TEMP.fullmatch(name) is not None


# --- fsync ------------------------------------------------------------------------------------------
def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (renames, new and removed names) durable. A no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory; nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory bottom-up, `root` last."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file):
                fsync_file(file)
        fsync_dir(dirpath)


# --- recovery ---------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recover_entry(entry: Path) -> bool:
    """Remove (or, for an `.old-*` whose target is missing, put back) one dead writer's temporary entry.
    Returns whether anything was done."""
    m = _TEMP.fullmatch(entry.name)
    if m is None or writer_alive(int(m["pid"]), int(m["start"])):
        return False
    target = entry.parent / m["target"]
    if m["kind"] == "old" and not is_temp_name(target.name) and not os.path.lexists(target):
        try:  # the save died between its two renames: the new content never took the old one's place
            os.rename(entry, target)
        except FileNotFoundError:  # another process recovered it first
            return False
        return True
    _remove(entry)
    return True


def recover(path: str | os.PathLike) -> None:
    """Clean up after dead writers of `path`: remove their partial and trash siblings, and put back an
    `.old-*` sibling if `path` itself is missing (else remove it). A live writer's work is left alone."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    changed = False
    for entry in sorted(parent.iterdir(), key=lambda p: p.name):
        m = _TEMP.fullmatch(entry.name)
        if m is not None and m["target"] == path.name:
            changed |= _recover_entry(entry)
    if changed:
        fsync_dir(parent)


def recover_directory(directory: str | os.PathLike) -> None:
    """`recover` every target in `directory` that a dead writer left temporary entries for."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    changed = False
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        changed |= _recover_entry(entry)
    if changed:
        fsync_dir(directory)


# --- renames ----------------------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Callable[..., int] | None | bool = None  # None: not looked up yet; False: not available


def _lookup_renameat2() -> Callable[..., int] | None:
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
            except (OSError, AttributeError):
                pass
            else:
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
    return _renameat2 or None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the
    system or the filesystem cannot; then nothing has changed."""
    global _renameat2
    fn = _lookup_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOSYS:  # an old kernel: never try again
        _renameat2 = False
        return False
    if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # this filesystem does not support it
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


# --- writers ----------------------------------------------------------------------------------------
def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)  # no second copy of a large file; the old directory is deleted afterwards
    except OSError:
        shutil.copy2(src, dst)


def _fresh_sibling(path: Path, kind: str, directory: bool) -> Path:
    while True:
        tmp = path.with_name(temp_name(path.name, kind))
        try:
            if directory:
                tmp.mkdir()  # mkdir, not mkdtemp: the result gets the usual (umask) permissions, not 0700
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def write_directory(path: str | os.PathLike, write: Callable[[Path], None], owned: Callable[[str], bool]) -> Path:
    """Run `write(tmp)` on a fresh sibling directory, then put it in place of `path`.

    Files already in `path` that `owned(name)` does not claim (a tokenizer beside weights, a README) are
    carried over. The old directory is replaced only once the new one is complete and fsynced, and put back
    if the swap fails; a failure at any point leaves `path` as it was and no temporary directory behind, and
    a kill at any point leaves `path` either old or new, with leftovers that the next write (`recover`)
    removes."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise LmforgeError(f"{path} exists and is a file; choose a directory path to save into.")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _fresh_sibling(path, "partial", directory=True)
    try:
        write(tmp)
        if path.exists():
            for item in path.iterdir():
                if owned(item.name) or (tmp / item.name).exists():
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy, symlinks=True)
                else:
                    _link_or_copy(item, tmp / item.name)
        fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
            fsync_dir(path.parent)
            return path
        if exchange(tmp, path):  # tmp now holds the previous content, under a name `recover` deletes
            fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return path
        old = path.with_name(temp_name(path.name, "old"))
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)  # put the previous directory back
            raise
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh sibling file, fsync it, and rename it over `path` (then fsync the
    directory). `write` must not rely on the file name's extension (it is random)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _fresh_sibling(path, "partial", directory=False)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Atomically and durably replace `path` with `data` (text is written as UTF-8)."""
    content = data.encode("utf-8") if isinstance(data, str) else data
    return replace_file(path, lambda tmp: tmp.write_bytes(content))


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory so that no half-deleted one is ever left under its name: it is renamed to a
    trash sibling first (which `recover` finishes deleting if the process dies)."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(temp_name(path.name, "trash"))
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
