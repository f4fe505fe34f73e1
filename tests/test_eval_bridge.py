"""The lmms-eval bridge: task files, the in-memory model class, scoring, retention and the CLI.

Everything runs offline on tiny random checkpoints and a tiny benchmark written here. lmms-eval
is imported unconditionally: without it these tests fail, they are not skipped.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import lmms_eval  # noqa: F401  (a missing lmms-eval must fail the suite, not skip it)
import pytest
import torch
from click.testing import CliRunner
from lmms_eval.api.task import ConfigurableTask, _resolve_hf_datasets_cache_dir
from lmms_eval.utils import load_yaml_config
from PIL import Image

from atv_prune.cli import main as atv_main
from atv_prune.cli.evaluate import eval_command
from atv_prune.errors import AtvPruneError
from atv_prune.eval import LMMS_EVAL_VERSION, EvalResult, env, evaluate, retention, write_builtin_tasks
from atv_prune.eval.env import offline, require_lmms_eval
from atv_prune.eval.hooks import doc_to_messages, doc_to_text, doc_to_visual, process_results
from atv_prune.eval.model import GenerationError, user_content
from atv_prune.model.loading import load_model
from atv_prune.model.processors import load_processor
from tiny_checkpoints import make_checkpoint

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def _write_bench(root: Path) -> Path:
    """A benchmark folder in the generator's layout: 3 PNGs, test/exist.jsonl and test/mcq.jsonl."""
    (root / "images").mkdir(parents=True)
    (root / "test").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(root / "images" / f"{name}.png")
    shown_asked = [("one", "red", "red"), ("two", "blue", "red"), ("three", "green", "green")]
    exist = [{"id": f"exist-{i}", "task": "exist", "image": f"images/{shown}.png",  # questions are unique
              "question": f"is picture {number} {asked}?", "answer": "yes" if shown == asked else "no",
              "chance": 0.5} for i, (number, shown, asked) in enumerate(shown_asked)]
    exist.append({"id": "exist-3", "task": "exist", "image": None, "question": "what is 2 plus 2?",
                  "answer": "4", "chance": 0.1})
    choices = ["red", "blue", "green"]
    listed = "A. red B. blue C. green"
    # The generator lists the choices in the question (mcq-0); the contract allows leaving them out.
    questions = [f"which colour is shape one? {listed}", "which colour is shape two?",
                 "which colour is shape three?"]
    mcq = [{"id": f"mcq-{i}", "task": "mcq", "image": f"images/{colour}.png", "question": question,
            "choices": choices, "answer": "ABC"[i], "chance": 1 / 3}
           for i, (colour, question) in enumerate(zip(choices, questions))]
    mcq[2]["image_position"] = "after"  # the image follows the question (the generator's questions)
    for name, records in (("exist", exist), ("mcq", mcq)):
        (root / "test" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_bench(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_checkpoint(root / family, family) for family in ("llava", "qwen2_vl")}


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty datasets cache for lmms-eval's hub tasks (it resolves the folder once per process)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(cache))
    _resolve_hf_datasets_cache_dir.cache_clear()
    yield cache
    monkeypatch.undo()
    _resolve_hf_datasets_cache_dir.cache_clear()


@pytest.fixture(scope="module")
def llava(checkpoints: dict[str, Path]) -> tuple[torch.nn.Module, object]:
    model, _ = load_model(checkpoints["llava"])
    return model, load_processor(checkpoints["llava"])


def _answers(bench: Path) -> dict[str, str]:
    """Question -> reference answer over the whole test split (questions are unique)."""
    lines = [line for path in (bench / "test").glob("*.jsonl") for line in path.read_text().splitlines()]
    records = [json.loads(line) for line in lines]
    return {r["question"]: r["answer"] for r in records}


def _scripted_generate(model: torch.nn.Module, processor, answer_for) -> callable:
    """A stand-in for ``model.generate`` that appends ``answer_for(question)`` to each prompt row.

    It finds each row's question in its decoded prompt, so a wrong prompt, a lost image-free row or
    a batch reordered on the way back would all change the score.
    """
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos

    def generate(input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        assert kwargs["do_sample"] is False
        rows = []
        for prompt in tokenizer.batch_decode(input_ids, skip_special_tokens=True):
            rows.append(tokenizer(answer_for(prompt), add_special_tokens=False)["input_ids"] + [eos])
        width = max(len(r) for r in rows)
        tail = torch.tensor([r + [eos] * (width - len(r)) for r in rows], dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)

    return generate


def test_task_writer_yaml_and_records(bench: Path, tmp_path: Path) -> None:
    ids = write_builtin_tasks(bench, tmp_path)
    assert ids == {"exist": "atvbench_exist", "mcq": "atvbench_mcq"}
    config = load_yaml_config(str(tmp_path / "atvbench_mcq.yaml"), mode="full")
    assert config["task"] == "atvbench_mcq" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "atvbench_mcq.jsonl")
    assert config["generation_kwargs"]["max_new_tokens"] == 8
    assert config["generation_kwargs"]["do_sample"] is False
    assert all(callable(config[key]) for key in ("doc_to_visual", "doc_to_text", "process_results"))
    records = [json.loads(line) for line in (tmp_path / "atvbench_mcq.jsonl").read_text().splitlines()]
    assert Path(records[0]["image"]).is_absolute() and Path(records[0]["image"]).is_file()
    # Choices are listed once: kept when the question already lists them, appended otherwise.
    assert doc_to_text(records[0]) == records[0]["question"]
    assert doc_to_text(records[1]) == "which colour is shape two? A. red B. blue C. green"
    assert doc_to_visual(records[1])[0].getpixel((0, 0)) == COLOURS["blue"]
    assert records[0]["image_position"] == "before" and records[2]["image_position"] == "after"
    assert doc_to_text(records[2]) == "which colour is shape three? A. red B. blue C. green <image>"
    image = doc_to_visual(records[2])
    assert [c["type"] for c in user_content(doc_to_text(records[2]), image)] == ["text", "image"]
    assert [c["type"] for c in user_content(doc_to_text(records[1]), image)] == ["image", "text"]
    text_only = [json.loads(line) for line in (tmp_path / "atvbench_exist.jsonl").read_text().splitlines()][3]
    assert text_only["image"] is None and doc_to_visual(text_only) == [] and text_only["choices"] == []
    assert callable(config["doc_to_messages"])


def test_chat_messages_place_the_image_without_a_marker(bench: Path, tmp_path: Path) -> None:
    write_builtin_tasks(bench, tmp_path)
    mcq = [json.loads(line) for line in (tmp_path / "atvbench_mcq.jsonl").read_text().splitlines()]
    exist = [json.loads(line) for line in (tmp_path / "atvbench_exist.jsonl").read_text().splitlines()]
    for record, kinds in ((mcq[1], ["image", "text"]), (mcq[2], ["text", "image"]), (exist[3], ["text"])):
        (turn,) = doc_to_messages(record)
        assert turn["role"] == "user" and [item["type"] for item in turn["content"]] == kinds
        (text,) = [item["text"] for item in turn["content"] if item["type"] == "text"]
        assert text == doc_to_text(record).removesuffix(" <image>") and "<image>" not in text
    (image,) = [item["url"] for item in doc_to_messages(mcq[2])[0]["content"] if item["type"] == "image"]
    assert image.getpixel((0, 0)) == COLOURS["green"]


def test_an_answer_is_scored_on_its_first_line() -> None:
    doc = {"answer": "yes"}
    assert process_results(doc, ["Yes.\nbecause it is"]) == {"accuracy": 100.0}
    assert process_results(doc, ["no\nyes"]) == {"accuracy": 0.0}


def test_tasks_command_writes_a_folder_the_stock_cli_can_include(bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "atvbench"
    result = CliRunner().invoke(atv_main, ["tasks", "--bench", str(bench), "--tasks", "atvbench_mcq", "--out",
                                           str(out)])
    assert result.exit_code == 0, result.output
    assert "python -m lmms_eval --model llava_hf" in result.output and f"--include_path {out}" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["atvbench_mcq.jsonl", "atvbench_mcq.yaml", "utils.py"]
    config = load_yaml_config(str(out / "atvbench_mcq.yaml"), mode="full")
    assert config["dataset_kwargs"]["data_files"]["test"] == str(out / "atvbench_mcq.jsonl")  # the final folder
    again = CliRunner().invoke(atv_main, ["tasks", "--bench", str(bench), "--out", str(out)])
    assert again.exit_code == 2 and again.output.startswith("error: ") and "--overwrite" in again.output
    unknown = CliRunner().invoke(atv_main, ["tasks", "--bench", str(bench), "--tasks", "nosuch", "--out",
                                            str(tmp_path / "other")])
    assert unknown.exit_code == 2 and unknown.output.startswith("error: no task nosuch in ")
    assert not (tmp_path / "other").exists()


def test_task_writer_rejects_bad_records(bench: Path, tmp_path: Path) -> None:
    broken = tmp_path / "bench"
    (broken / "test").mkdir(parents=True)
    (broken / "test" / "exist.jsonl").write_text(
        json.dumps({"id": "x", "image": "images/missing.png", "question": "q?", "answer": "yes"}) + "\n")
    with pytest.raises(AtvPruneError, match=r"exist.jsonl:1: image images/missing.png not found"):
        write_builtin_tasks(broken, tmp_path / "tasks")
    (broken / "test" / "exist.jsonl").write_text(
        json.dumps({"id": "x", "image": None, "question": "q?", "answer": "E", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(AtvPruneError, match="not one of the letters"):
        write_builtin_tasks(broken, tmp_path / "tasks")
    (broken / "test" / "exist.jsonl").write_text(
        json.dumps({"id": "x", "image": None, "question": "q?", "answer": "no", "image_position": "top"}) + "\n")
    with pytest.raises(AtvPruneError, match="'image_position' must be one of before, after"):
        write_builtin_tasks(broken, tmp_path / "tasks")


def test_user_content_places_images() -> None:
    image = Image.new("RGB", (4, 4))
    assert [c["type"] for c in user_content("what is it?", [image])] == ["image", "text"]
    assert [c["type"] for c in user_content("see <image> and <image>, same?", [image, image])] == [
        "text", "image", "text", "image", "text"]
    assert user_content("no picture here", []) == [{"type": "text", "text": "no picture here"}]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_end_to_end_tiny_checkpoint(family: str, checkpoints: dict[str, Path], bench: Path) -> None:
    model, _ = load_model(checkpoints[family])
    processor = load_processor(checkpoints[family])
    result = evaluate(model, processor, ["exist", "mcq"], bench_dir=bench, batch_size=3)
    assert set(result.scores) == {"atvbench_exist", "atvbench_mcq"}
    assert all(0.0 <= score <= 100.0 for score in result.scores.values())
    assert result.samples == {"atvbench_exist": 4, "atvbench_mcq": 3}
    assert result.versions["lmms-eval"] == LMMS_EVAL_VERSION
    assert result.versions["torch"] == torch.__version__
    json.dumps(result.to_dict())


def test_scores_follow_the_answers(llava, bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = llava
    answers = _answers(bench)

    def correct(prompt: str) -> str:
        return next(answer for question, answer in answers.items() if question in prompt)

    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, correct))
    right = evaluate(model, processor, ["exist", "atvbench_mcq"], bench_dir=bench, batch_size=3)
    assert right.scores == {"atvbench_exist": 100.0, "atvbench_mcq": 100.0} and right.mean == 100.0

    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, lambda prompt: "maybe"))
    wrong = evaluate(model, processor, ["exist", "mcq"], bench_dir=bench, batch_size=2)
    assert wrong.scores == {"atvbench_exist": 0.0, "atvbench_mcq": 0.0}

    def yes(prompt: str) -> str:  # of the first two exist items, one is "yes": 50
        return "Yes."

    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, yes))
    half = evaluate(model, processor, ["exist"], bench_dir=bench, batch_size=8, limit=2)
    assert half.scores == {"atvbench_exist": 50.0} and half.samples == {"atvbench_exist": 2}


def test_generation_error_raises(llava, bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = llava

    def broken(**kwargs):
        raise RuntimeError("shape mismatch in block 3")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(GenerationError, match="shape mismatch in block 3"):
        evaluate(model, processor, ["exist"], bench_dir=bench)


def test_missing_tasks_fail_with_one_line(llava, bench: Path) -> None:
    model, processor = llava
    with pytest.raises(AtvPruneError, match="built-in task 'nosuch' not found") as builtin:
        evaluate(model, processor, ["atvbench_nosuch"], bench_dir=bench)
    with pytest.raises(AtvPruneError, match=r"unknown task 'popee'.*did you mean pope") as unknown:
        evaluate(model, processor, ["exist", "popee"], bench_dir=bench)
    for error in (builtin.value, unknown.value):
        assert "\n" not in str(error)


def test_task_without_local_data_fails_with_one_line(llava, bench: Path, datasets_cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = llava
    # lmms-eval retries a failed dataset load five times, 2 s apart: skip the waiting here.
    monkeypatch.setattr(ConfigurableTask.download.retry, "sleep", lambda seconds: None)
    with pytest.raises(AtvPruneError, match="task 'pope' cannot be loaded offline") as error:
        evaluate(model, processor, ["pope"], bench_dir=bench)
    assert "\n" not in str(error.value) and "lmms-lab-encoder/POPE" in str(error.value)


def _cached_pope(cache: Path) -> dict[str, str]:
    """A three-question POPE-shaped dataset in a datasets cache, as an earlier online run leaves it.

    Returns question -> answer. Offline, ``load_dataset("lmms-lab-encoder/POPE")`` falls back to
    the newest cached ``lmms-lab-encoder___pope`` build.
    """
    import datasets

    answers = {"Is there a red square in the image?": "yes", "Is there a dog in the image?": "no",
               "Is there a car in the image?": "no"}
    rows = [{"question_id": str(i), "question": q, "answer": a, "image_source": "test", "category": "random",
             "image": Image.new("RGB", (40, 40), rgb)}
            for i, ((q, a), rgb) in enumerate(zip(answers.items(), COLOURS.values()))]
    features = datasets.Features({key: datasets.Value("string") for key in rows[0] if key != "image"})
    features["image"] = datasets.Image()
    repo = cache.parent / "repo" / "POPE"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(repo / "data" / "test-00000.parquet"))
    datasets.load_dataset(str(repo), cache_dir=str(cache))
    (cache / "pope").rename(cache / "lmms-lab-encoder___pope")
    return answers


def test_lmms_eval_task_with_cached_data(llava, bench: Path, tmp_path: Path, datasets_cache: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundled lmms-eval task (pope) runs offline from cached data through the same bridge."""
    model, processor = llava
    answers = {**_cached_pope(datasets_cache), **_answers(bench)}
    monkeypatch.chdir(tmp_path)

    def correct(prompt: str) -> str:
        return next(answer for question, answer in answers.items() if question in prompt)

    monkeypatch.setattr(model, "generate", _scripted_generate(model, processor, correct))
    result = evaluate(model, processor, ["pope", "exist"], bench_dir=bench, batch_size=2)
    assert result.scores == {"pope": 100.0, "atvbench_exist": 100.0}
    assert result.samples["pope"] == 3 and result.metrics["pope"]["pope_f1_score,none"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "repo"]  # no submission files left behind


def test_offline_switches_the_read_flags_and_restores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before
    assert "HF_HUB_OFFLINE" not in os.environ


def test_progress_switches_every_bar_and_restores_them(llava, bench: Path, capsys: pytest.CaptureFixture) -> None:
    """``--quiet`` (progress off) silences lmms-eval's and datasets' bars too, not only ours."""
    import datasets
    import lmms_eval.evaluator

    model, processor = llava
    original = lmms_eval.evaluator.tqdm
    capsys.readouterr()
    evaluate(model, processor, ["exist"], bench_dir=bench, batch_size=4, progress=True)
    shown = capsys.readouterr().err
    assert "generate" in shown and "Postprocessing" in shown
    evaluate(model, processor, ["exist"], bench_dir=bench, batch_size=4, progress=False)
    assert "it/s" not in capsys.readouterr().err
    assert lmms_eval.evaluator.tqdm is original and datasets.is_progress_bar_enabled()


def test_other_lmms_eval_versions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.metadata, "version", lambda name: "0.8.0")
    with pytest.raises(AtvPruneError, match="lmms-eval 0.8.0 is installed but .* pinned to 0.7.3"):
        require_lmms_eval()


def _result(scores: dict[str, float], limit: int | None = None) -> EvalResult:
    return EvalResult(scores=scores, mean=sum(scores.values()) / len(scores), samples={}, metrics={},
                      scale={}, versions={}, seconds=0.0, limit=limit)


def test_retention_arithmetic() -> None:
    pruned = _result({"gqa": 45.0, "pope": 30.0, "mme": 80.0})
    kept = retention(pruned, _result({"gqa": 50.0, "pope": 40.0, "mme": 64.0}))
    assert kept["tasks"] == pytest.approx({"gqa": 90.0, "pope": 75.0, "mme": 125.0})
    assert kept["mean"] == pytest.approx((90.0 + 75.0 + 125.0) / 3) and kept["excluded"] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        partial = retention(_result({"a": 10.0, "b": 5.0}), _result({"a": 20.0, "b": 0.0}))
    assert partial == {"tasks": {"a": 50.0}, "mean": 50.0, "excluded": ["b"]}
    assert "dense score is 0 on b" in str(caught[0].message)
    with pytest.raises(AtvPruneError, match="every task"):
        retention(_result({"a": 1.0}), _result({"a": 0.0}))
    with pytest.raises(AtvPruneError, match="same tasks"):
        retention(_result({"a": 1.0}), _result({"b": 1.0}))
    with pytest.raises(AtvPruneError, match="same documents"):
        retention(_result({"a": 1.0}, limit=5), _result({"a": 1.0}))


def test_cli_writes_results_and_retention(checkpoints: dict[str, Path], bench: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--model", str(checkpoints["llava"]), "--tasks", "exist", "mcq", "--bench", str(bench),
            "--batch-size", "4", "--device", "cpu", "--quiet"]
    first = runner.invoke(eval_command, [*args, "--out", str(tmp_path / "dense")])
    assert first.exit_code == 0, first.output
    assert "atvbench_exist" in first.output and "mean" in first.output
    saved = json.loads((tmp_path / "dense" / "eval_results.json").read_text())
    assert saved["result"]["versions"]["lmms-eval"] == LMMS_EVAL_VERSION
    assert set(saved["result"]["scores"]) == {"atvbench_exist", "atvbench_mcq"}

    again = runner.invoke(eval_command, [*args, "--out", str(tmp_path / "dense")])
    assert again.exit_code == 2 and "already exists" in again.output

    # A saved dense result that scores somewhere: retention is computed against it.
    saved["result"]["scores"] = {"atvbench_exist": 50.0, "atvbench_mcq": 25.0}
    (tmp_path / "dense.json").write_text(json.dumps(saved))
    pruned = runner.invoke(eval_command, [*args, "--baseline", str(tmp_path / "dense.json"),
                                          "--out", str(tmp_path / "pruned")])
    assert pruned.exit_code == 0, pruned.output
    record = json.loads((tmp_path / "pruned" / "eval_results.json").read_text())
    scores = record["result"]["scores"]
    assert record["retention"]["tasks"] == pytest.approx(
        {"atvbench_exist": 2 * scores["atvbench_exist"], "atvbench_mcq": 4 * scores["atvbench_mcq"]})


def test_cli_errors_are_one_line(checkpoints: dict[str, Path], bench: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(eval_command, ["--model", str(checkpoints["llava"]), "--tasks", "atvbench_nosuch",
                                           "--bench", str(bench)])
    assert missing.exit_code == 2
    assert missing.output.startswith("error: built-in task 'nosuch' not found")
    assert missing.output.count("\n") == 1
    no_model = runner.invoke(eval_command, ["--model", str(tmp_path / "none"), "--tasks", "exist",
                                            "--bench", str(bench)])
    assert no_model.exit_code == 2 and "no model found" in no_model.output
