"""Bad input across the commands: one ``error:`` line, exit status 2, checked before the weights
are loaded or any evaluation runs, and nothing left behind (no study folder, no staging folder)."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

from atv_prune import PruneConfig, prune
from atv_prune.cli import main as atv_main
from atv_prune.errors import ConfigError
from atv_prune.model.loading import load_model
from motprobe.cli import main as motprobe_main
from tiny_checkpoints import make_llava_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    space = make_llava_workspace(tmp_path_factory.mktemp("bad"))
    text_only = space["root"] / "textonly.jsonl"
    text_only.write_text('{"image": null, "text": "just words"}\n{"text": "more words"}\n')
    space["textonly"] = text_only
    invalid = space["root"] / "invalid.json"
    invalid.write_text('[{"image": "x.png", "conversations": [}]')
    space["invalid"] = invalid
    return space


def _invoke(main, *args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def _one_error(code: int, lines: list[str], message: str, status: int = 2) -> None:
    assert code == status and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command loads weights: its input checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the inputs were checked")

    monkeypatch.setattr("atv_prune.model.loading.load_model", refuse)


def test_usage_errors_are_one_line() -> None:
    _one_error(*_invoke(atv_main, "prune", "--method", "bogus"), "Invalid value for '--method'")
    _one_error(*_invoke(atv_main, "prune"), "Missing option '--model'")
    _one_error(*_invoke(atv_main, "nosuch"), "No such command 'nosuch'")
    _one_error(*_invoke(atv_main, "demo", "--limit", "0"), "demo --help')")
    _one_error(*_invoke(motprobe_main, "tsne", "--perplexity", "-1"), "'--perplexity'")
    code, lines = _invoke(atv_main, "compare", "--help")
    assert code == 0 and lines[0].startswith("Usage:")


@pytest.mark.parametrize("where", ["file", "under-file", "read-only"])
def test_unwritable_output_is_refused_before_the_work(workspace, tmp_path: Path, where: str,
                                                       monkeypatch: pytest.MonkeyPatch, no_weights) -> None:
    (tmp_path / "f").write_text("a file")
    out = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "out", "read-only": tmp_path / "ro" / "out"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path / "ro"
                            else real_access(path, mode))
    message = {"file": "is a file", "under-file": "is a file", "read-only": "permission denied"}[where]
    base = ["--model", workspace["model"], "--calib", workspace["calib"], "--out", out]
    _one_error(*_invoke(atv_main, "prune", "--quiet", "--sparsity", "0.5", *base), message)
    _one_error(*_invoke(atv_main, "eval", "--model", workspace["model"], "--tasks", "exist", "--out", out), message)
    _one_error(*_invoke(atv_main, "compare", "--tasks", "exist", "--sparsity", "0.5", *base), message)
    _one_error(*_invoke(motprobe_main, "iou", *base), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["f", "ro"] if where == "read-only" else ["f"])


@pytest.mark.parametrize("command", ["compare", "sensitivity"])
@pytest.mark.parametrize("case", ["invalid calibration", "text-only calibration", "no model", "unsupported model",
                                  "pattern", "task", "device"])
def test_studies_check_every_input_first_and_leave_no_folder(workspace, tmp_path: Path, command: str, case: str,
                                                             no_weights) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    model, calib, tasks, target, device = workspace["model"], workspace["calib"], "exist", ["--sparsity", "0.5"], "cpu"
    if case == "invalid calibration":
        calib, message = workspace["invalid"], "malformed JSON"
    elif case == "text-only calibration":
        calib, message = workspace["textonly"], "has an image"
    elif case == "no model":
        model, message = tmp_path / "nowhere", "no model found"
    elif case == "unsupported model":
        model, message = tmp_path / "bert", "bert"
    elif case == "pattern":
        target, message = ["--pattern", "2:5"], "divisible by 5"
    elif case == "task":
        tasks, message = "exsit", "unknown task 'exsit'"
    else:
        device, message = "tpu", "unknown device 'tpu'"
    main = atv_main if command == "compare" else motprobe_main
    out = tmp_path / "study"
    _one_error(*_invoke(main, command, "--model", model, "--calib", calib, "--tasks", tasks, *target,
                        "--samples", "2", "--device", device, "--out", out), message)
    assert not out.exists()


def test_a_corrupt_or_misplaced_study_folder_is_one_line(workspace, tmp_path: Path, no_weights) -> None:
    args = ["compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", "exist",
            "--sparsity", "0.5"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "study.json").write_text("{oops")
    _one_error(*_invoke(atv_main, *args, "--out", tmp_path / "broken"), "not a study manifest")
    (tmp_path / "plain").write_text("x")
    _one_error(*_invoke(atv_main, *args, "--out", tmp_path / "plain"), "is a file")


def test_conflicting_or_meaningless_options_are_refused(workspace, tmp_path: Path, no_weights) -> None:
    base = ["--model", workspace["model"], "--calib", workspace["calib"]]
    _one_error(*_invoke(atv_main, "sweep", *base, "--tasks", "exist", "--sparsity", "0.5", "--pattern", "2:4",
                        "--out", tmp_path / "s"), "not both")
    _one_error(*_invoke(motprobe_main, "iou", *base, "--sparsity", "0.6", "--pattern", "2:4",
                        "--out", tmp_path / "i"), "not both")
    _one_error(*_invoke(motprobe_main, "iou", *base, "--pools", "text", "text", "--out", tmp_path / "i"),
               "twice")
    _one_error(*_invoke(motprobe_main, "sensitivity", *base, "--tasks", "exist", "--sparsity", "0.5",
                        "--method", "magnitude", "--pool", "text", "--out", tmp_path / "m"), "drop --pool")
    _one_error(*_invoke(motprobe_main, "tsne", "--model", workspace["model"], "--calib", workspace["textonly"],
                        "--blocks", "0", "--out", tmp_path / "t"), "has an image")
    _one_error(*_invoke(motprobe_main, "drift", "--report", tmp_path / "nosuch.json", "--out", tmp_path / "d"),
               "not found")
    _one_error(*_invoke(atv_main, "prune", *base, "--recipe", tmp_path / "nosuch.json", "--sparsity", "0.5",
                        "--out", tmp_path / "p"), "not found")
    assert list(tmp_path.iterdir()) == []


def test_eval_checks_tasks_and_baseline_before_loading(workspace, tmp_path: Path, no_weights) -> None:
    base = ["eval", "--model", workspace["model"], "--tasks", "exist"]
    _one_error(*_invoke(atv_main, "eval", "--model", workspace["model"], "--tasks", "exsit"), "unknown task 'exsit'")
    (tmp_path / "list.json").write_text("[1, 2]")
    _one_error(*_invoke(atv_main, *base, "--baseline", tmp_path / "list.json"), "no numeric per-task scores")
    (tmp_path / "partial.json").write_text(json.dumps({"result": {"scores": {"atvbench_exist": 50.0}}}))
    _one_error(*_invoke(atv_main, *base, "--baseline", tmp_path / "partial.json"), "no mean")
    (tmp_path / "out" / "eval_results.json").mkdir(parents=True)
    _one_error(*_invoke(atv_main, *base, "--out", tmp_path / "out", "--overwrite"), "is a folder")


def test_an_unforeseen_file_system_error_is_one_line(workspace, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr("atv_prune.runs.checkpoint.write_json_atomic", full)
    _one_error(*_invoke(atv_main, "prune", "--quiet", "--model", workspace["model"], "--method", "magnitude",
                        "--sparsity", "0.5", "--out", tmp_path / "out"), "No space left on device", status=1)


def test_an_nm_pattern_that_does_not_fit_fails_before_capture(workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_model(workspace["model"])
    before = [p.clone() for p in model.parameters()]

    def no_capture(*args, **kwargs):
        raise AssertionError("captured before the pattern was checked")

    monkeypatch.setattr("atv_prune.runs.api.capture_sample", no_capture)
    with pytest.raises(ConfigError, match="divisible by 5"):
        prune(model, None, None, PruneConfig(method="wanda", sparsity=None, pattern=(2, 5)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_late_found_cases_are_checked_up_front(workspace, tmp_path: Path, no_weights) -> None:
    base = ["--model", workspace["model"], "--calib", workspace["calib"]]
    _one_error(*_invoke(motprobe_main, "tsne", *base, "--blocks", "0", "--perplexity", "nan",
                        "--out", tmp_path / "t"), "not a finite number")
    _one_error(*_invoke(atv_main, "prune", *base, "--sparsity", "0.5", "--offload-device", "bogus",
                        "--out", tmp_path / "p"), "unknown device 'bogus'")
    _one_error(*_invoke(atv_main, "sweep", *base, "--tasks", "exist", "--ratios", "2", "--out", tmp_path / "s"),
               "--ratios 2")
    _one_error(*_invoke(motprobe_main, "iou", *base, "--pools", "text", "--out", tmp_path / "i"), "iou --help")
    (tmp_path / "words.json").write_text(json.dumps({"result": {"scores": {"atvbench_exist": "abc"}}}))
    _one_error(*_invoke(atv_main, "eval", "--model", workspace["model"], "--tasks", "exist", "--baseline",
                        tmp_path / "words.json"), "no numeric per-task scores")
    _one_error(*_invoke(atv_main, "eval", "--model", workspace["model"], "--tasks", "pope"),
               "task 'pope' cannot be loaded offline")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["words.json"]


def test_a_bad_device_on_resume_is_named_as_such(workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_study import _scripted_evaluate

    from atv_prune.runs.cells import CellRunner

    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    args = ["compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", "exist",
            "--methods", "magnitude", "--sparsity", "0.5", "--out", tmp_path / "study"]
    assert _invoke(atv_main, *args)[0] == 0
    _one_error(*_invoke(atv_main, *args, "--device", "tpu"), "unknown device 'tpu'")


def test_a_bare_command_shows_its_help() -> None:
    code, lines = _invoke(atv_main)
    assert code == 2 and lines[0].startswith("Usage:") and any("prune" in line for line in lines)


def test_a_finished_study_resumes_without_checking_its_inputs_again(workspace, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from test_study import _scripted_evaluate

    from atv_prune.runs.cells import CellRunner
    from atv_prune.runs.study import Study

    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    args = ["compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", "exist",
            "--methods", "magnitude", "--sparsity", "0.5", "--out", tmp_path / "study"]
    assert _invoke(atv_main, *args)[0] == 0

    def refuse(self, cells):
        raise AssertionError("a finished study checked its inputs again")

    monkeypatch.setattr(Study, "check_inputs", refuse)
    code, lines = _invoke(atv_main, *args)
    assert code == 0 and any("magnitude 50%" in line for line in lines)


def test_iou_refuses_a_zero_sparsity_instead_of_using_the_default(workspace, tmp_path: Path, no_weights) -> None:
    _one_error(*_invoke(motprobe_main, "iou", "--model", workspace["model"], "--calib", workspace["calib"],
                        "--sparsity", "0", "--out", tmp_path / "i"), "outside (0, 1)")


@pytest.mark.parametrize("main, command", [(atv_main, "sweep"), (motprobe_main, "iou")])
@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_mask_studies_do_not_offer_structured_methods(workspace, tmp_path: Path, main, command: str,
                                                      method: str) -> None:
    """`sweep` and `iou` always build a sparsity or N:M target, which structured methods refuse."""
    _one_error(*_invoke(main, command, "--model", workspace["model"], "--calib", workspace["calib"],
                        "--method", method, "--out", tmp_path / "s"), "Invalid value for '--method'")
    assert not (tmp_path / "s").exists()


def test_a_model_that_cannot_be_built_on_meta_is_left_to_the_run(workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForImageTextToText

    from atv_prune.runs.preflight import check_model

    assert check_model(workspace["model"]) == 2

    def needs_real_tensors(*args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_config", needs_real_tensors)
    assert check_model(workspace["model"], [PruneConfig(sparsity=None, pattern=(2, 5))]) is None


def test_messages_name_what_is_wrong_with_a_path_or_a_recipe(workspace, tmp_path: Path, no_weights) -> None:
    (tmp_path / "folder").mkdir()
    base = ["--model", workspace["model"], "--sparsity", "0.5", "--out", tmp_path / "p"]
    _one_error(*_invoke(atv_main, "prune", *base, "--calib", tmp_path / "folder"), "is a folder, not a file")
    _one_error(*_invoke(atv_main, "prune", *base, "--calib", workspace["calib"], "--recipe", tmp_path / "folder"),
               "is a folder, not a file")
    _one_error(*_invoke(motprobe_main, "drift", "--report", tmp_path / "folder", "--out", tmp_path / "d"),
               "is a folder, not a file")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"format": "atv-prune-recipe/1", "method": "atv", "pool": "atv", "alpha": -3}))
    _one_error(*_invoke(atv_main, "prune", *base, "--calib", workspace["calib"], "--recipe", recipe),
               f"{recipe} is not a valid recipe: it holds an invalid setting (alpha -3.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "recipe.json"]


def _save_fails_with(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)  # the weights are written, then the disk gives out
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)


@pytest.mark.parametrize("error, message", [
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system: choose a folder on a writable file"),
    (SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"),
     "Disk quota exceeded: free some of your quota"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device: free some space"),
])
def test_an_environment_failure_while_saving_is_one_line_with_status_1(workspace, tmp_path: Path, error, message,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _save_fails_with(monkeypatch, error)
    out = tmp_path / "out"
    _one_error(*_invoke(atv_main, "prune", "--quiet", "--model", workspace["model"], "--method", "magnitude",
                        "--sparsity", "0.5", "--out", out), message, status=1)
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder


def test_a_file_size_limit_hit_while_saving_is_one_line_with_status_1(workspace, tmp_path: Path) -> None:
    """A real limit (RLIMIT_FSIZE, as ``ulimit -f`` sets) in a child process: the write fails with
    EFBIG ("File too large") inside safetensors."""
    from crash import run

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "out" / "pruned"
    code, lines = run(atv_main, ["prune", "--quiet", "--model", workspace["model"], "--method", "magnitude",
                                 "--sparsity", "0.5", "--out", out], tmp_path / "log", small_files)
    _one_error(code, lines, f"error: writing {out} failed: File too large: raise the file-size limit", status=1)
    assert list(out.parent.iterdir()) == []


def test_seeds_beyond_the_supported_range_are_refused(workspace, tmp_path: Path, no_weights) -> None:
    from atv_prune.algorithms.specs import MAX_SEED

    base = ["--model", workspace["model"], "--calib", workspace["calib"], "--sparsity", "0.5", "--out", tmp_path / "p"]
    _one_error(*_invoke(atv_main, "prune", *base, "--seed", str(2**70)), "'--seed': 1180591620717411303424 is not "
               f"in the range 0<=x<={MAX_SEED}")
    _one_error(*_invoke(atv_main, "prune", *base, "--seed", "-1"), "'--seed'")
    with pytest.raises(ConfigError, match=f"seed {2**64} is outside 0..{MAX_SEED}"):
        PruneConfig(seed=2**64)


def test_the_largest_seed_prunes_with_a_random_pool(workspace) -> None:
    from atv_prune.algorithms.specs import MAX_SEED
    from atv_prune.model.loading import load_model_and_processor

    loaded = load_model_and_processor(workspace["model"])
    report = prune(loaded.model, loaded.processor, workspace["calib"],
                   PruneConfig(method="atv", pool="random", samples=2, seed=MAX_SEED))
    assert abs(report.sparsity["overall"] - 0.5) < 0.01


@pytest.mark.parametrize("device, message", [
    ("mps", "device 'mps' asked for but this torch build"),
    ("meta", "device 'meta' holds shapes but no data"),
    ("hpu", "device type 'hpu' is not supported"),
    ("cuda:7", "device 'cuda:7' asked for but"),
])
def test_devices_this_build_lacks_are_refused_before_loading(workspace, tmp_path: Path, device: str, message: str,
                                                             no_weights) -> None:
    _one_error(*_invoke(atv_main, "prune", "--model", workspace["model"], "--calib", workspace["calib"],
                        "--sparsity", "0.5", "--device", device, "--out", tmp_path / "p"), message)
    _one_error(*_invoke(atv_main, "eval", "--model", workspace["model"], "--tasks", "exist", "--device", device),
               message)


def test_calibration_messages_name_the_actual_problem(workspace, tmp_path: Path, no_weights) -> None:
    base = ["--model", workspace["model"], "--sparsity", "0.5", "--out", tmp_path / "p"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"image": "x.png", "conversations": []}], "version": 2}))
    _one_error(*_invoke(atv_main, "prune", *base, "--calib", wrapped),
               'wrapped.json holds a JSON object ({"data", "version"}), not a list of records')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # what process substitution, <(...), hands a command: /dev/fd/N, a pipe
    _one_error(*_invoke(atv_main, "prune", *base, "--calib", fifo), f"calibration file {fifo} is a pipe, not a "
               "regular file (as <(...) gives; it can be read only once, so save it to a file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "wrapped.json"]


def test_a_single_record_file_is_one_record(workspace, tmp_path: Path) -> None:
    from atv_prune.model.calibration import load_calibration
    from atv_prune.model.processors import load_processor

    records = json.loads(workspace["calib"].read_text())
    single = workspace["calib"].parent / "single.json"
    single.write_text(json.dumps(records[0], indent=2))  # one record, pretty-printed: not JSONL
    calibration = load_calibration(single, load_processor(workspace["model"]), samples=4)
    assert calibration.records_in_file == 1 and len(calibration.samples) == 1
