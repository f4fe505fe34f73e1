"""Resumable studies: a grid of pruning runs, each evaluated, compared with the dense model.

A study is a list of :class:`Cell` (a label and a :class:`PruneConfig`, plus any extra settings
such as the MoT pathway). Each cell loads the checkpoint afresh, prunes it and evaluates it
through the lmms-eval bridge (:mod:`.cells`); the dense evaluation is a cell too. An executor
(:mod:`.executors`) runs the cells, in this process or on a Ray cluster, and this driver alone
writes the study folder: each finished cell's record as ``cells/<key>.json``, atomically, as it
arrives. A re-run of the same study skips the cells already stored (whichever executor computed
them), and a cell that failed is recorded as such, shown as missing in the tables, and computed
again by the next run. The folder's ``study.json`` pins what the study is (model, calibration,
tasks, evaluation settings), so a different study is never mixed into it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm.auto import tqdm

from ..errors import AtvPruneError, one_line
from ..model.loading import parse_device
from ..model.shrink import shrink_surgery
from ..model.structured import SurgeryFactory
from ..validation import Record
from ..versions import package_versions
from .cells import Cell, CellJob, CellRunner, PruneFunction, StudySettings, default_prune
from .executors import CellExecutor, CellOutcome, SerialExecutor
from .export import check_creatable, write_json_atomic
from .tables import markdown_text

__all__ = ["Cell", "CellsFailed", "Study", "StudyManifest", "StudySettings", "cell_summary", "failed_cells",
           "markdown_table", "retention_rows"]


class StudyManifest(Record):
    """``study.json``: what the study is (its identity) and the versions that started it."""

    identity: dict[str, Any]
    versions: dict[str, str]


class CellsFailed(AtvPruneError):
    """Cells of a study that have no result; the others are stored. Exit status 2 when every
    failure is a problem with the inputs, 1 when one is the environment's (a lost worker)."""

    def __init__(self, failed: list[dict[str, Any]], folder: Path) -> None:
        names = "; ".join(f"'{record['label']}' ({one_line(record['failed']['error'], limit=160)}"
                          f"{_attempts(record['failed'])})" for record in failed)
        stored = "nothing is stored" if not folder.exists() else f"the finished cells are stored in {folder}"
        super().__init__(f"{len(failed)} cell{'s' if len(failed) > 1 else ''} failed: {names}; {stored}: "
                         "re-run the same command to compute what is missing")
        self.exit_status = 2 if all(record["failed"]["input_error"] for record in failed) else 1


def _attempts(failure: dict[str, Any]) -> str:
    return f", {failure['attempts']} attempts" if failure["attempts"] > 1 else ""


def failed_cells(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the cells that failed."""
    return [record for record in records if "failed" in record]


class _Progress:
    """The study's one progress bar: cells done of all, with how many run and how many failed;
    a line per finished cell."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=done, desc="cells", unit="cell", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True)
        self.total, self.done, self.failed, self.running = total, done, 0, 0
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(f"running {self.running}, failed {self.failed}")

    def set_running(self, count: int) -> None:
        self.running = count
        self._show()

    def finished(self, outcome: CellOutcome) -> None:
        self.done += 1
        if outcome.failure is None:
            line = f"[{self.done}/{self.total}] {outcome.job.label}"
        else:
            self.failed += 1
            line = f"[{self.done}/{self.total}] {outcome.job.label} FAILED: {outcome.failure.error}"
        self.bar.write(line, file=sys.stderr)
        self.bar.update(1)
        self._show()

    def close(self) -> None:
        self.bar.close()


class Study:
    """Runs cells into a study folder, resuming finished ones."""

    def __init__(self, folder: Path, settings: StudySettings, kind: str, overwrite: bool = False,
                 surgery: SurgeryFactory | None = shrink_surgery) -> None:
        """Check that ``folder`` is new, or holds this same study (unless ``overwrite``); nothing
        is written until :meth:`run_all` has checked the inputs. ``surgery``: what the input checks
        try structured cells with (``None`` when the cells' prune function brings its own)."""
        if settings.device is not None:
            parse_device(settings.device)  # a bad device is that, not "a different study"
        self.folder = Path(folder)
        self.settings = settings
        self.surgery = surgery
        self.cells_dir = self.folder / "cells"
        self.overwrite = overwrite
        self.versions = package_versions()
        self.identity = {"kind": kind, **settings.identity(),
                         "versions": {k: self.versions[k] for k in ("atv-prune", "torch", "transformers")}}
        manifest = self.folder / "study.json"
        check_creatable(self.folder)
        if manifest.exists() and not overwrite:
            try:
                stored = StudyManifest.model_validate(json.loads(manifest.read_text()))
            except (OSError, ValueError, ValidationError):
                raise AtvPruneError(f"{manifest} is unreadable or not a study manifest: pass --overwrite to start "
                                    "the study afresh, or choose another --out") from None
            if stored.identity != self.identity:
                changed = sorted(k for k in self.identity if stored.identity.get(k) != self.identity[k])
                raise AtvPruneError(f"{self.folder} holds a different study (differs in {', '.join(changed)}): "
                                    "choose another --out or pass --overwrite")
        elif self.folder.exists() and any(self.folder.iterdir()) and not manifest.exists():
            raise AtvPruneError(f"{self.folder} exists and is not a study folder: choose another --out")

    def check_inputs(self, cells: list[Cell], local: bool = True) -> None:
        """Everything about the model, calibration file, tasks and device that can fail, checked
        before the first cell: such an error then costs seconds and leaves no folder behind.
        The device is checked here only for cells that run here (``local``): a cluster worker
        has its own."""
        from ..eval.run import check_tasks
        from .preflight import check_run_inputs

        settings = self.settings
        check_run_inputs(settings.model, [cell.config for cell in cells], calib_path=settings.calib,
                         image_root=settings.image_root, max_pixels=settings.max_pixels,
                         device=settings.device if local else None, trust_remote_code=settings.trust_remote_code,
                         max_length=settings.max_length, surgery=self.surgery)
        check_tasks(settings.tasks, settings.bench_dir)

    def _open(self) -> None:
        """Create the folder (or empty its cells for ``overwrite``) and pin the study in
        ``study.json``."""
        if self.overwrite and self.cells_dir.exists():
            for stale in self.cells_dir.glob("*.json"):
                stale.unlink()
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / "study.json",
                          StudyManifest(identity=self.identity, versions=self.versions).to_dict())

    def _stored(self, key: str) -> dict[str, Any] | None:
        """The record stored under ``key`` (a cell's key, or "dense"), if any."""
        path = self.cells_dir / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _jobs(self, cells: list[Cell], prune_function: PruneFunction, executor: CellExecutor) -> list[CellJob]:
        """The jobs of what is not stored yet: the dense evaluation first, then each cell once.
        Cells computed elsewhere show no progress bars of their own (the driver shows the study's)."""
        stored = set() if self.overwrite else {path.stem for path in self.cells_dir.glob("*.json")}
        settings = self.settings if executor.local else dataclasses.replace(self.settings, progress=False)
        jobs = [] if "dense" in stored else [CellJob(settings, None, prune_function)]
        for cell in cells:
            job = CellJob(settings, cell, prune_function)
            if job.key not in stored and all(job.key != other.key for other in jobs):
                jobs.append(job)
        return jobs

    def run_all(self, cells: list[Cell], prune_function: PruneFunction = default_prune,
                executor: CellExecutor | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The dense evaluation and every cell's record (with its retention), computing only what
        is not stored yet, on ``executor`` (default: in this process, one after another).

        Each record is stored as it arrives. A cell that failed gets a record with ``failed`` (its
        error) instead of results, and is not stored (the next run computes it again); when the
        dense evaluation fails no retention can be computed and :class:`CellsFailed` is raised
        once the other cells are stored. The inputs are checked first (unless everything is
        stored already: a finished study's tables can be rebuilt without its inputs); a folder
        this call created is removed again if no result was stored in it."""
        executor = executor if executor is not None else SerialExecutor()
        jobs = self._jobs(cells, prune_function, executor)
        if jobs:
            pending = [job.cell for job in jobs if job.cell is not None]
            self.check_inputs(pending, local=executor.local)
            # decided here, once: every cell (wherever it runs) then takes the same path
            load = CellRunner(self.settings).check_streamable(prune_function, pending)
            jobs = [dataclasses.replace(job, settings=dataclasses.replace(job.settings, load=load)) for job in jobs]
        created = not self.folder.exists()
        failures: dict[str, CellOutcome] = {}
        try:
            self._open()
            if jobs:
                failures = self._compute(jobs, executor, total=len({cell.key() for cell in cells}) + 1)
        except BaseException:
            self._remove_if_empty(created)
            raise
        dense = self._stored("dense")
        records = [self._stored(cell.key()) or _failed_record(cell, failures.get(cell.key())) for cell in cells]
        if dense is None:
            self._remove_if_empty(created)
            raise CellsFailed([_failed_record(None, failures["dense"]), *failed_cells(records)], self.folder)
        return dense, [_with_retention(record, dense) for record in records]

    def _compute(self, jobs: list[CellJob], executor: CellExecutor, total: int) -> dict[str, CellOutcome]:
        """Run the jobs, storing each record as it arrives; the failed jobs' outcomes by key."""
        failures = {}
        with executor:  # joins or starts a cluster: the progress bar shows once the cells can run
            progress = _Progress(total, total - len(jobs), self.settings.progress)
            # closing(): an interrupted run stops its cells before the executor leaves the cluster.
            with closing(executor.run(jobs, progress.set_running)) as outcomes:
                try:
                    for outcome in outcomes:
                        if outcome.record is not None:
                            write_json_atomic(self.cells_dir / f"{outcome.job.key}.json", outcome.record)
                        else:
                            failures[outcome.job.key] = outcome
                        progress.finished(outcome)
                finally:
                    progress.close()
        return failures

    def _remove_if_empty(self, created: bool) -> None:
        if created and not any(self.cells_dir.glob("*.json")):
            shutil.rmtree(self.folder, ignore_errors=True)


def _failed_record(cell: Cell | None, outcome: CellOutcome | None) -> dict[str, Any]:
    """The record of a cell that has no result: what it is, and why."""
    if outcome is None or outcome.failure is None:
        raise AssertionError("a cell neither stored nor failed")
    record: dict[str, Any] = {"label": outcome.job.label}
    if cell is not None:
        record |= {"key": cell.key(), "config": cell.config.to_dict(), "extra": cell.extra}
    return record | {"failed": outcome.failure.to_dict()}


def _with_retention(record: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """A cell's record with its retention against the dense evaluation (none for a failed cell)."""
    if "failed" in record:
        return record
    from ..eval.run import EvalResult, retention

    kept = retention(EvalResult.from_dict(record["evaluation"]), EvalResult.from_dict(dense["evaluation"]))
    return record | {"retention": kept}


def retention_rows(records: list[dict[str, Any]], dense: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per cell: label, settings, per-task retention, mean, time and memory."""
    tasks = list(dense["evaluation"]["scores"])
    rows = [{"label": "dense", **{t: 100.0 for t in tasks}, "mean": 100.0, "prune_seconds": None,
             "peak_memory_gib": None, "visual_tokens_per_sample": None}]
    for record in records:
        if "failed" in record:
            rows.append({"label": record["label"], **{t: None for t in tasks}, "mean": None, "prune_seconds": None,
                         "peak_memory_gib": None, "visual_tokens_per_sample": None})
            continue
        per_task = record["retention"]["tasks"]
        rows.append({"label": record["label"], **{t: per_task.get(t) for t in tasks},
                     "mean": record["retention"]["mean"], "prune_seconds": record["prune_seconds"],
                     "peak_memory_gib": record["peak_memory_bytes"] / 2**30,
                     "visual_tokens_per_sample": record["visual_tokens_per_sample"]})
    return rows


def markdown_table(rows: list[dict[str, Any]], dense: dict[str, Any], records: Sequence[dict[str, Any]] = ()) -> str:
    """The rows as a Table-2-style markdown table (retention %, dense scores in the note below,
    and the failed cells among ``records``, which the table shows as missing)."""
    scores = ", ".join(f"{t} {s:.1f}" for t, s in dense["evaluation"]["scores"].items())
    text = markdown_text(rows) + f"\nRetention = pruned / dense × 100 per task. Dense scores: {scores}.\n"
    failed = failed_cells(list(records))
    if failed:
        text += "Failed, missing above: " + "; ".join(
            f"{record['label']} ({one_line(record['failed']['error'], limit=160)})" for record in failed) + ".\n"
    return text


def cell_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a cell record worth keeping in a study's summary file."""
    if "failed" in record:
        return {k: record.get(k) for k in ("label", "config", "extra", "failed")}
    return {k: record.get(k) for k in ("label", "config", "extra", "load", "prune_seconds", "peak_memory_bytes",
                                       "sparsity", "weights_sha256", "visual_tokens_per_sample", "retention")} | {
        "scores": record["evaluation"]["scores"]} | (
        {"structure": record["structure"]} if record.get("structure") else {})

