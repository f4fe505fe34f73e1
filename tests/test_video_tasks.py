"""The built-in video tasks (generated clips) through the lmms-eval bridge, and studies on video:
compare, sweep and motprobe sensitivity with video calibration and video tasks, on tiny video models."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from atv_prune.builtin import SHIPPED_VIDEO_BENCHMARK_ARGS, VIDEO_BENCHMARK_DIR
from atv_prune.builtin.clips import DIRECTIONS, FRAMES, VIDEO_TASKS, generate_video_benchmark, make_clip, render_clip
from atv_prune.cli import main
from atv_prune.errors import AtvPruneError
from atv_prune.eval.run import EvalResult, evaluate
from atv_prune.model.loading import load_model_and_processor
from atv_prune.model.videos import VideoSampling, read_clip
from atv_prune.runs.cells import CellRunner
from motprobe.cli import main as motprobe_main
from tiny_checkpoints import make_checkpoint

CALIB = VIDEO_BENCHMARK_DIR / "calib.json"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vtasks")
    return {family: make_checkpoint(root / family, family) for family in ("qwen2_vl", "llava_onevision", "llava")}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_shipped_video_benchmark_is_what_the_generator_writes(tmp_path: Path) -> None:
    manifest = generate_video_benchmark(tmp_path, **SHIPPED_VIDEO_BENCHMARK_ARGS)
    assert manifest == json.loads((VIDEO_BENCHMARK_DIR / "manifest.json").read_text())
    for name in [f"test/{task}.jsonl" for task in VIDEO_TASKS] + ["calib.json"]:
        assert (tmp_path / name).read_text() == (VIDEO_BENCHMARK_DIR / name).read_text(), name
    shipped = sorted(p.name for p in (VIDEO_BENCHMARK_DIR / "videos").iterdir())
    assert shipped == sorted(p.name for p in (tmp_path / "videos").iterdir())


@pytest.mark.parametrize("task", VIDEO_TASKS)
def test_clips_read_back_exactly_and_answers_follow_the_tracks(task: str) -> None:
    for record in _read_jsonl(VIDEO_BENCHMARK_DIR / "test" / f"{task}.jsonl")[:10]:
        clip = record["clip"]
        read = read_clip(VIDEO_BENCHMARK_DIR / record["video"], VideoSampling(max_frames=FRAMES))
        assert read.fps == 2.0 and np.array_equal(read.frames, np.stack([np.asarray(f) for f in render_clip(clip)]))
        tracks = clip["tracks"]
        starts = [next(i for i, s in enumerate(t["frames"]) if s is not None) for t in tracks]
        if task == "motion":
            moving = next(t for t in tracks if t["frames"][0] != t["frames"][-1])
            dx = moving["frames"][-1]["x"] - moving["frames"][0]["x"]
            dy = moving["frames"][-1]["y"] - moving["frames"][0]["y"]
            expected = ("right" if dx > 0 else "left") if dx else ("down" if dy > 0 else "up")
            assert record["answer"] == expected and expected in DIRECTIONS
        elif task == "order":
            assert record["answer"] == tracks[starts.index(min(starts))]["shape"] and len(set(starts)) == 2
        elif task == "appear":
            assert record["answer"] == str(sum(start > 0 for start in starts))
        else:
            changed = [t for t in tracks if t["frames"][0]["color"] != t["frames"][-1]["color"]]
            assert len(changed) == 1 and record["answer"] == changed[0]["frames"][-1]["color"]


def test_no_single_frame_answers_a_motion_question() -> None:
    """The first and the last frame differ only where the moving shape was and went."""
    clip, _ = make_clip("motion", random.Random(1))
    frames = render_clip(clip)
    assert frames[0].tobytes() != frames[-1].tobytes() and len(frames) == FRAMES


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_video_tasks_run_through_lmms_eval(family: str, checkpoints) -> None:
    loaded = load_model_and_processor(checkpoints[family])
    result = evaluate(loaded.model, loaded.processor, ["motion", "order"], bench_dir=VIDEO_BENCHMARK_DIR, limit=3,
                      batch_size=2, video=VideoSampling(max_frames=4))
    assert result.samples == {"atvbench_motion": 3, "atvbench_order": 3}
    assert all(0.0 <= score <= 100.0 for score in result.scores.values())


def test_image_and_video_documents_share_a_batch(checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built-in tasks share generation settings, so one batch can hold image and video documents."""
    import shutil

    from atv_prune.builtin import BENCHMARK_DIR
    from atv_prune.eval.model import InMemoryVLM

    batches = []
    encode = InMemoryVLM._encode_with_videos

    def spy(self, conversations, clips):
        kinds = [item["type"] for turn in conversations for item in turn[0]["content"]]
        batches.append((kinds.count("image"), kinds.count("video")))
        return encode(self, conversations, clips)

    monkeypatch.setattr(InMemoryVLM, "_encode_with_videos", spy)

    bench = tmp_path / "bench"
    (bench / "test").mkdir(parents=True)
    image_docs = _read_jsonl(BENCHMARK_DIR / "test" / "exist.jsonl")[:2]
    video_docs = _read_jsonl(VIDEO_BENCHMARK_DIR / "test" / "change.jsonl")[:2]
    for doc, root in [(d, BENCHMARK_DIR) for d in image_docs] + [(d, VIDEO_BENCHMARK_DIR) for d in video_docs]:
        visual = doc.get("image") or doc["video"]
        (bench / visual).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / visual, bench / visual)
    (bench / "test" / "exist.jsonl").write_text("".join(json.dumps(d) + "\n" for d in image_docs))
    (bench / "test" / "change.jsonl").write_text("".join(json.dumps(d) + "\n" for d in video_docs))
    loaded = load_model_and_processor(checkpoints["qwen2_vl"])
    result = evaluate(loaded.model, loaded.processor, ["exist", "change"], bench_dir=bench, batch_size=4,
                      video=VideoSampling(max_frames=4))
    assert result.samples == {"atvbench_exist": 2, "atvbench_change": 2}
    assert batches == [(2, 2)]


def test_video_tasks_on_an_image_model_are_one_line_errors(checkpoints) -> None:
    loaded = load_model_and_processor(checkpoints["llava"])
    with pytest.raises(AtvPruneError, match="takes no video") as info:
        evaluate(loaded.model, loaded.processor, ["change"], bench_dir=VIDEO_BENCHMARK_DIR, limit=1)
    assert "\n" not in str(info.value)


def _scripted_evaluate(self: CellRunner, model, processor) -> dict:
    """Score = 100 x the fraction of non-zero decoder weights (the real evaluation runs above)."""
    weights = [p.detach() for n, p in model.named_parameters() if "language_model.layers" in n and p.dim() == 2]
    kept = float(sum((w != 0).sum() for w in weights) / sum(w.numel() for w in weights))
    scores = {task: 100 * kept for task in self.settings.tasks}
    return EvalResult(scores=scores, mean=100 * kept, samples=dict.fromkeys(self.settings.tasks, 1), metrics={},
                      scale={}, versions={}, seconds=0.0, limit=self.settings.limit).to_dict()


def _invoke(command, *args) -> str:
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_compare_on_video_calibration_and_video_tasks(checkpoints, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The real evaluation of video tasks, frames drawn as --max-frames says; the random tiny model
    scores 0, so each score is lifted by 50 (retention is undefined for a dense score of 0)."""
    from atv_prune.eval import run

    drawn = []

    def lifted(*args, **kwargs) -> EvalResult:
        drawn.append(kwargs["video"])
        result = evaluate(*args, **kwargs)
        scores = {task: score + 50 for task, score in result.scores.items()}
        return dataclasses.replace(result, scores=scores, mean=sum(scores.values()) / len(scores))

    monkeypatch.setattr(run, "evaluate", lifted)
    out = tmp_path / "compare"
    _invoke(main, "compare", "--model", checkpoints["qwen2_vl"], "--calib", CALIB, "--bench", VIDEO_BENCHMARK_DIR,
            "--tasks", "motion", "--limit", "2", "--methods", "wanda", "atv", "--sparsity", "0.5", "--samples", "4",
            "--max-frames", "4", "--quiet", "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert [cell["label"] for cell in results["cells"]] == ["wanda 50%", "atv 50%"]
    assert results["dense"]["evaluation"]["samples"] == {"atvbench_motion": 2}
    study = json.loads((out / "study.json").read_text())
    assert study["identity"]["max_frames"] == 4
    assert drawn == [VideoSampling(max_frames=4)] * 3


def test_sweep_counts_video_tokens(checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    out = tmp_path / "sweep"
    _invoke(main, "sweep", "--model", checkpoints["qwen2_vl"], "--calib", CALIB, "--bench", VIDEO_BENCHMARK_DIR,
            "--tasks", "order", "--alpha", "0", "--ratios", "1.0", "--samples", "2", "--max-frames", "4",
            "--out", out)
    cells = {c["label"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells["alpha=0"]["visual_tokens_per_sample"] == 0
    # 4 frames of 96x96 -> 40x40 (the tiny video processor's 2048-pixel cap, sides multiples of 8):
    # 2 frame pairs x 10x10 patches of 4 px / the 2x2 merge
    assert cells["ratio=1"]["visual_tokens_per_sample"] == 2 * 10 * 10 // 4


def test_motprobe_sensitivity_on_video(checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    out = tmp_path / "sensitivity"
    _invoke(motprobe_main, "sensitivity", "--model", checkpoints["qwen2_vl"], "--calib", CALIB, "--bench",
            VIDEO_BENCHMARK_DIR, "--tasks", "appear", "--sparsity", "0.5", "--pool", "text", "--pool", "visual",
            "--samples", "2", "--max-frames", "4", "--out", out)
    rows = json.loads((out / "results.json").read_text())["table"]
    assert [(r["pathway"], r["calibration"]) for r in rows] == [
        (p, c) for p in ("text", "visual") for c in ("text", "visual")]
    assert (out / "recipe.json").exists()


def test_prune_iou_and_tsne_on_video_calibration(checkpoints, tmp_path: Path) -> None:
    model = checkpoints["qwen2_vl"]
    _invoke(main, "prune", "--quiet", "--model", model, "--calib", CALIB, "--samples", "2", "--max-frames", "4",
            "--fps", "1", "--sparsity", "0.5", "--out", tmp_path / "atv")
    calibration = json.loads((tmp_path / "atv" / "pruning_report.json").read_text())["calibration"]
    assert calibration["samples_with_video"] == 2 and (calibration["max_frames"], calibration["fps"]) == (4, 1.0)
    _invoke(motprobe_main, "iou", "--model", model, "--calib", CALIB, "--samples", "2", "--max-frames", "4",
            "--out", tmp_path / "iou")
    assert json.loads((tmp_path / "iou" / "iou_summary.json").read_text())["linears"] == 14
    _invoke(motprobe_main, "tsne", "--model", model, "--calib", CALIB, "--samples", "2", "--max-frames", "4",
            "--blocks", "1", "--tokens", "10", "--out", tmp_path / "tsne")
    assert (tmp_path / "tsne" / "tsne.csv").read_text().count(",visual\n") > 0
