"""Replacing a directory without ever leaving a half-written one in its place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)  # no second copy of a large file; the old directory is deleted afterwards
    except OSError:
        shutil.copy2(src, dst)


def write_directory(path: str | os.PathLike, write: Callable[[Path], None], owned: Callable[[str], bool]) -> Path:
    """Run `write(tmp)` on a fresh sibling directory, then put it in place of `path`.

    Files already in `path` that `owned(name)` does not claim (a tokenizer beside weights, a README) are
    carried over. The old directory is replaced only once the new one is complete, and put back if the final
    rename fails; a failure at any point leaves `path` as it was and no temporary directory behind."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise LmforgeError(f"{path} exists and is a file; choose a directory path to save into.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        write(tmp)
        if not path.exists():
            os.replace(tmp, path)
            return path
        for item in path.iterdir():
            if owned(item.name) or (tmp / item.name).exists():
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy, symlinks=True)
            else:
                _link_or_copy(item, tmp / item.name)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the previous directory back
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
