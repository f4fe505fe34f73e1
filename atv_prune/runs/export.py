"""Writing results atomically: a folder or file appears whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AtvPruneError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the permissions a plain create would."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=False)
            stream.write("\n")
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def check_creatable(folder: Path) -> None:
    """Refuse a ``folder`` that could not be created or written into: a file in its place or in its
    path (``... is a file``), or no write permission in the nearest folder that exists."""
    folder = Path(folder).resolve()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AtvPruneError(f"cannot create {folder}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AtvPruneError(f"cannot write into {existing} (permission denied): choose a writable --out")


def check_output_dir(out: Path, overwrite: bool, protected: list[Path] = ()) -> None:
    """Refuse an existing ``out`` (unless ``overwrite``), one that is a file or could not be
    created beside its siblings, and any ``out`` inside a protected folder."""
    out = Path(out).resolve()
    for folder in protected:
        folder = Path(folder).resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise AtvPruneError(f"--out {out} overlaps the input {folder}: choose a separate output folder")
    if out.exists() and not out.is_dir():
        raise AtvPruneError(f"--out {out} is a file, not a folder: choose another --out")
    if out.exists() and not overwrite:
        raise AtvPruneError(f"output folder {out} already exists: pass --overwrite or choose another --out")
    check_creatable(out.parent)


def write_dir_atomic(out: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Create folder ``out`` by letting ``fill`` write into a temporary sibling, then renaming it.

    On any error the temporary folder is removed and an existing ``out`` is left untouched.
    """
    out = Path(out).resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(staging)
        _publish_mode(staging)
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_files_into(out: Path, fill: Callable[[Path], None], last: str) -> None:
    """Let ``fill`` write files into a temporary folder inside ``out``, then move them into ``out``.

    For a folder that already holds other outputs (the trainer's generated data). The file named
    ``last`` — the one readers check for — is removed first and moved in last, so while the files
    move, and after a failure, ``out`` holds no ``last`` beside a mix of old and new files. A failed
    ``fill`` leaves ``out`` as it was. Files of ``out`` that ``fill`` does not write are kept.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        fill(staging)
        names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == last)
        clashes = [n for n in names if (out / n).exists() and (out / n).is_dir() != (staging / n).is_dir()]
        if clashes:
            raise AtvPruneError(f"{out} already holds {', '.join(clashes)} as a folder where a file goes or as a "
                                "file where a folder goes: remove it or choose another output folder")
        (out / last).unlink(missing_ok=True)
        for name in names:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            _publish_mode(staging / name)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
