"""Writing results atomically: a folder or file appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AtvPruneError, environment_failure


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the permissions a plain create would."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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


def _staging_prefix(out: Path, kind: str) -> str:
    """``.<out>.<kind>-<host>-<pid>-``: the hidden siblings a writer of ``out`` makes (``tmp``: the
    folder being filled; ``old``: a replaced result being removed). Host and process id let a later
    run tell the leftovers of a killed run from those of a run still going."""
    return f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[^/]+)-(?P<pid>\d+)-[^-]+$")


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_leftovers(out: Path) -> None:
    """Remove what a killed writer of ``out`` left beside it (its staging folder, a replaced result
    it was removing): hidden siblings made on this host by a process that no longer runs."""
    out = Path(out)
    host = socket.gethostname()
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        match = _LEFTOVER.fullmatch(path.name)
        if match and match["name"] == out.name and match["host"] == host and not _running(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the filled ``staging`` folder to ``out``. Without ``overwrite``, an ``out`` that
    another run created meanwhile is left as it is and this run fails; with it, the previous
    ``out`` is replaced (renamed aside, then removed): at every moment ``out`` is absent or whole."""
    retired = None
    if overwrite and out.exists():
        retired = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "old"), dir=out.parent))
        with contextlib.suppress(FileNotFoundError):  # another run replaced it first
            os.replace(out, retired / out.name)
    try:
        os.rename(staging, out)  # never over a non-empty folder: ENOTEMPTY / EEXIST
    except OSError as error:
        if retired is not None and (retired / out.name).exists() and not out.exists():
            os.rename(retired / out.name, out)  # put the previous result back
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise AtvPruneError(f"output folder {out} was written by another run while this one worked; it was left as "
                            "that run wrote it: choose another --out, or pass --overwrite to replace it") from None
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


def write_dir_atomic(out: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Create folder ``out`` by letting ``fill`` write into a temporary sibling, then renaming it.

    On any error the temporary folder is removed and an existing ``out`` is left untouched; a full
    disk, a quota, a file-size limit or a read-only file system is an :class:`EnvironmentFailure`.
    A process killed at any moment leaves ``out`` absent or whole, and the next writer of ``out``
    removes what it left beside it (:func:`remove_leftovers`). Two runs racing to create the same
    ``out`` leave one result: the later one fails (:func:`_publish`).
    """
    out = Path(out).resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "tmp"), dir=out.parent))
    try:
        fill(staging)
        _publish_mode(staging)
        _publish(staging, out, overwrite)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        failure = environment_failure(error, f"writing {out}")
        if failure is not None:
            raise failure from error
        raise
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
