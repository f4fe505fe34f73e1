"""Video calibration: clips, sampling, the torch-only video processors, and every video family end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional

from atv_prune import PruneConfig, RunSettings, prune
from atv_prune.errors import CalibrationError, ConfigError, ImageError
from atv_prune.model.calibration import check_calibration_file, load_calibration
from atv_prune.model.chat import user_content
from atv_prune.model.families import FAMILIES
from atv_prune.model.layout import resolve
from atv_prune.model.loading import load_model_and_processor
from atv_prune.model.processors import load_processor
from atv_prune.model.video_processors import (
    ClipVideoProcessor,
    OnevisionVideoProcessor,
    Qwen3VideoProcessor,
    QwenVideoProcessor,
)
from atv_prune.model.videos import VideoSampling, frame_files, read_clip
from atv_prune.runs.checkpoint import prune_checkpoint
from atv_prune.runs.preflight import check_run_inputs
from tiny_checkpoints import VIDEO_FAMILIES, make_checkpoint, make_video_calibration_files, write_clip, write_mjpeg_avi
from tiny_models import assert_replay_matches_forward

QUIET = RunSettings(progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_video_calibration_files(tmp_path_factory.mktemp("vcalib"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vckpt")
    return {family: make_checkpoint(root / family, family) for family in (*VIDEO_FAMILIES, "llava")}


def _one_line(error_type: type[Exception], match: str, call, *args, **kwargs) -> str:
    with pytest.raises(error_type, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- the registry --------------------------------------------------------------------------------


def test_the_registry_names_the_video_families() -> None:
    assert {f.name for f in FAMILIES.values() if f.takes_video} == {"llava_onevision", "qwen2_vl", "qwen2_5_vl",
                                                                    "qwen3_vl", "llava_next_video"}


# --- clips and sampling ----------------------------------------------------------------------------


def test_sampling_is_uniform_capped_and_follows_fps() -> None:
    assert VideoSampling(max_frames=4).indices(10, 5.0) == [0, 3, 6, 9]
    assert VideoSampling(max_frames=8).indices(3, 5.0) == [0, 1, 2]
    # 20 frames at 10 fps are 2 s: 1 frame per second gives 2 frames, first and last
    assert VideoSampling(max_frames=8, fps=1.0).indices(20, 10.0) == [0, 19]
    assert VideoSampling(max_frames=3, fps=100.0).indices(20, 10.0) == [0, 10, 19]
    _one_line(ConfigError, "max-frames", VideoSampling, max_frames=1)
    _one_line(ConfigError, "fps", VideoSampling, fps=0.0)
    from atv_prune.cli.options import DEFAULT_MAX_FRAMES  # the command lines' default, kept without numpy

    assert VideoSampling().max_frames == DEFAULT_MAX_FRAMES


def test_frame_folders_are_read_in_natural_order(tmp_path: Path) -> None:
    folder = write_clip(tmp_path / "clip", n_frames=12)
    assert [p.name for p in frame_files(folder)][:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    clip = read_clip(folder, VideoSampling(max_frames=12), fps=4.0)
    expected = np.stack([np.asarray(Image.open(folder / f"frame_{i}.png").convert("RGB")) for i in range(1, 13)])
    assert np.array_equal(clip.frames, expected)
    assert clip.metadata()["duration"] == 3.0 and clip.indices == list(range(12))


def test_animated_images_are_clips(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (24, 16), (40 * i, 0, 0)) for i in range(5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    clip = read_clip(tmp_path / "clip.gif", VideoSampling(max_frames=3))
    assert clip.frames.shape == (3, 16, 24, 3) and clip.fps == 4.0 and clip.indices == [0, 2, 4]
    assert [int(f[0, 0, 0]) for f in clip.frames] == [0, 80, 160]


def _moving_square(n_frames: int, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    frames = []
    for i in range(n_frames):
        frame = Image.new("RGB", size, (120, 120, 120))
        frame.paste((220, 30, 30), (4 * i, 10, 4 * i + 12, 22))
        frames.append(frame)
    return frames


def test_video_files_are_read_with_decord(tmp_path: Path) -> None:
    pytest.importorskip("decord")
    frames = _moving_square(10)
    clip = read_clip(write_mjpeg_avi(tmp_path / "clip.avi", frames, fps=5), VideoSampling(max_frames=8, fps=2.0))
    # 10 frames at 5 fps are 2 s: 2 frames per second draw 4, first to last
    assert clip.fps == 5.0 and clip.total_frames == 10 and clip.indices == [0, 3, 6, 9]
    source = np.stack([np.asarray(frames[i]) for i in clip.indices]).astype(int)
    assert np.abs(clip.frames.astype(int) - source).mean() < 3  # JPEG: close, not equal


def test_bad_clips_are_one_line_errors(tmp_path: Path) -> None:
    mixed = write_clip(tmp_path / "mixed", n_frames=3)
    Image.new("RGB", (20, 20)).save(mixed / "frame_4.png")
    _one_line(ImageError, "differ in size.*frame_1.png is 48x40, frame_4.png is 20x20", read_clip, mixed,
              VideoSampling())
    (tmp_path / "empty").mkdir()
    _one_line(ImageError, "holds no frames", read_clip, tmp_path / "empty", VideoSampling())
    single = write_clip(tmp_path / "single", n_frames=1)
    _one_line(ImageError, "1 frame: a clip needs at least 2", read_clip, single, VideoSampling())
    damaged = write_clip(tmp_path / "damaged", n_frames=3)
    (damaged / "frame_2.png").write_bytes(b"not a png")
    _one_line(ImageError, "cannot read frame .*frame_2.png", read_clip, damaged, VideoSampling())
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    _one_line(ImageError, "(cannot read video|needs decord)", read_clip, tmp_path / "broken.mp4", VideoSampling())
    (tmp_path / "clip.txt").write_text("x")
    _one_line(ImageError, "neither a folder of frames nor a video file", read_clip, tmp_path / "clip.txt",
              VideoSampling())


def test_user_content_places_images_and_videos_at_their_markers() -> None:
    assert user_content("Look <video> then <image> ok", ["I"], ["V"]) == [
        {"type": "text", "text": "Look"}, {"type": "video", "video": "V"}, {"type": "text", "text": "then"},
        {"type": "image", "image": "I"}, {"type": "text", "text": "ok"}]
    assert user_content("no markers", [None], [None]) == [
        {"type": "image"}, {"type": "video"}, {"type": "text", "text": "no markers"}]
    assert user_content("a <video> b", [], []) == [{"type": "text", "text": "a  b"}]


# --- the torch-only video processors ----------------------------------------------------------------

_CASES = [(4, 40, 50), (5, 37, 61), (2, 64, 64), (3, 100, 30)]
_QWEN = dict(patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 256, "longest_edge": 1024})


def _clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", _CASES)
def test_qwen_video_patches_equal_a_plain_reference(shape: tuple[int, int, int]) -> None:
    """Each row of pixel_values_videos is one patch: channels x time x rows x columns of the
    normalised, resized frames, rows ordered frame pair, then 2x2 merge window, then patch in window."""
    video = _clip(*shape)
    ours = QwenVideoProcessor(_QWEN)
    out = ours(videos=[video])
    grid_t, grid_h, grid_w = out["video_grid_thw"][0].tolist()
    height, width = grid_h * 4, grid_w * 4
    assert 256 <= height * width <= 1024 and height % 8 == 0 and width % 8 == 0
    frames = torch.from_numpy(video).permute(0, 3, 1, 2)
    resized = functional.interpolate(frames, size=[height, width], mode="bicubic", align_corners=False,
                                     antialias=True)
    mean = torch.tensor(ours.image_mean).view(-1, 1, 1) * 255
    std = torch.tensor(ours.image_std).view(-1, 1, 1) * 255
    pixels = (resized.float() - mean) / std
    if len(pixels) % 2:
        pixels = torch.cat([pixels, pixels[-1:]])
    rows = []
    for t in range(grid_t):
        for bh in range(grid_h // 2):
            for bw in range(grid_w // 2):
                for mh in range(2):
                    for mw in range(2):
                        h, w = (bh * 2 + mh) * 4, (bw * 2 + mw) * 4
                        rows.append(pixels[2 * t:2 * t + 2, :, h:h + 4, w:w + 4].permute(1, 0, 2, 3).reshape(-1))
    assert torch.allclose(out["pixel_values_videos"], torch.stack(rows), atol=1e-6)


def test_onevision_video_equals_a_plain_reference() -> None:
    video = _clip(3, 40, 50)
    out = OnevisionVideoProcessor({"size": {"height": 24, "width": 24}})(videos=[video])["pixel_values_videos"]
    frames = functional.interpolate(torch.from_numpy(video).permute(0, 3, 1, 2), size=[24, 24], mode="bicubic",
                                    align_corners=False, antialias=True).float() / 255
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (frames - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    assert out.shape == (1, 3, 3, 24, 24) and torch.allclose(out[0], expected, atol=1e-5)


def _transformers_video_processors():
    """transformers' own video processors (they need torchvision: skipped where it is missing)."""
    pytest.importorskip("torchvision")
    import transformers

    return [(QwenVideoProcessor, transformers.Qwen2VLVideoProcessor, _QWEN),
            (Qwen3VideoProcessor, transformers.Qwen3VLVideoProcessor, {**_QWEN, "size": {"shortest_edge": 256,
                                                                                          "longest_edge": 4096}}),
            (OnevisionVideoProcessor, transformers.LlavaOnevisionVideoProcessor, {"size": {"height": 24, "width": 24}}),
            (ClipVideoProcessor, transformers.LlavaNextVideoVideoProcessor,
             {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 40}})]


@pytest.mark.parametrize("shape", _CASES)
def test_torch_video_processors_equal_transformers_own(shape: tuple[int, int, int]) -> None:
    """Bit-identical to transformers' video processors (run where torchvision is installed)."""
    video = _clip(*shape)
    for ours, theirs, settings in _transformers_video_processors():
        for cap in ((False, True) if issubclass(ours, QwenVideoProcessor) else (None,)):
            extra = {} if cap is None else {"cap_pixels_per_frame": cap, "max_video_tokens": 8}
            reference = theirs(**settings, **extra)
            expected = reference(videos=[video], return_tensors="pt", do_sample_frames=False)
            got = ours(reference.to_dict())(videos=[video])
            for key in expected:
                assert torch.equal(got[key], expected[key]), (ours.__name__, cap, key)


# --- calibration on every video family ---------------------------------------------------------------


def _video_token_count(sample, layout) -> int:
    return int(torch.isin(sample.inputs["input_ids"][0], torch.tensor(layout.video_token_ids)).sum())


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_mixed_image_and_video_calibration_counts_video_tokens_as_visual(family, checkpoints, files) -> None:
    loaded = load_model_and_processor(checkpoints[family])
    layout = resolve(loaded.model)
    assert layout.video_token_ids and not set(layout.video_token_ids) & set(layout.image_token_ids)
    calib = load_calibration(files["mixed"], loaded.processor, samples=100, seed=0,
                             video=VideoSampling(max_frames=4))
    videos = [s for s in calib.samples if s.video]
    assert len(videos) == 3 and len(calib.samples) == 6
    for sample in videos:
        count = _video_token_count(sample, layout)
        assert count > 0 and int(layout.visual_mask(sample.inputs["input_ids"]).sum()) == count
        if "video_grid_thw" in sample.inputs:  # Qwen: one token per 2x2 merged patch of every frame pair
            assert count == int(sample.inputs["video_grid_thw"].prod()) // 4
        elif family == "llava_onevision":  # 4 frames x 2x2 pooled patches + one newline
            assert count == 4 * 4 + 1
        else:  # LLaVA-NeXT-Video: 4 frames x 2x2 pooled patches
            assert count == 4 * 4


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@torch.no_grad()
def test_video_replay_equals_the_models_own_hidden_states(family, checkpoints, files) -> None:
    loaded = load_model_and_processor(checkpoints[family])
    model, layout = loaded.model, resolve(loaded.model)
    calib = load_calibration(files["videos_jsonl"], loaded.processor, samples=1, seed=0)
    inputs = layout.prepare_inputs(calib.samples[0].inputs)
    sample = assert_replay_matches_forward(model, inputs, family)
    assert int(sample.visual.sum()) == _video_token_count(calib.samples[0], layout) > 0


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_calibration_prunes_saves_reloads_and_generates(family, checkpoints, files, tmp_path) -> None:
    """Pruned in memory, and by prune_checkpoint with the blocks streamed: the same weights; the saved
    model reloads with its video processor and generates from a clip."""
    loaded = load_model_and_processor(checkpoints[family])
    calib = load_calibration(files["mixed"], loaded.processor, samples=100, seed=0, video=VideoSampling(max_frames=4))
    report = prune(loaded.model, None, calib, PruneConfig(method="atv", sparsity=0.5), settings=QUIET).to_dict()
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert report["model"]["video_token_ids"] == list(resolve(loaded.model).video_token_ids)
    assert report["calibration"]["samples_with_video"] == 3
    assert (report["calibration"]["max_frames"], report["calibration"]["fps"]) == (4, None)
    assert all(block["mean_drift"] is not None and block["visual_tokens_per_sample"] > 0 for block in report["blocks"])
    out = tmp_path / "pruned"  # what atv-prune prune runs, its blocks streamed from the checkpoint
    prune_checkpoint(checkpoints[family], out, files["mixed"], PruneConfig(method="atv", sparsity=0.5),
                     settings=RunSettings(progress=False, load="stream"), video=VideoSampling(max_frames=4))
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["video_processor"]["video_processor_type"].endswith("VideoProcessor")
    again = load_model_and_processor(out)
    assert type(again.processor.video_processor) is type(loaded.processor.video_processor)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    clip = read_clip(files["clips"][0], VideoSampling(max_frames=4), fps=2.0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    text = again.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = again.processor(text=[text], videos=[clip.frames], return_tensors="pt",
                             videos_kwargs={"video_metadata": [clip.metadata()], "do_sample_frames": False})
    inputs = resolve(again.model).prepare_inputs({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    generated = again.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_video_file_record_calibrates(checkpoints, tmp_path) -> None:
    pytest.importorskip("decord")
    write_mjpeg_avi(tmp_path / "clip.avi", _moving_square(6), fps=3)
    (tmp_path / "calib.jsonl").write_text(json.dumps({"video": "clip.avi", "prompt": "What moves?",
                                                      "text": "A red square moves right."}) + "\n")
    calib = load_calibration(tmp_path / "calib.jsonl", load_processor(checkpoints["qwen2_vl"]), samples=1)
    assert calib.samples[0].video.endswith("clip.avi") and int(calib.samples[0].inputs["video_grid_thw"][0, 0]) == 3


def test_a_video_record_for_a_model_without_video_is_refused_before_loading(checkpoints, files) -> None:
    message = _one_line(CalibrationError, "has a video, but model type 'llava' takes no video", check_run_inputs,
                        checkpoints["llava"], [PruneConfig(method="atv", samples=100)], calib_path=files["mixed"])
    assert "record 4 of mixed.json" in message or "record" in message
    check_run_inputs(checkpoints["qwen2_vl"], [PruneConfig(method="atv", samples=100)], calib_path=files["mixed"])
    _one_line(CalibrationError, "has a video, but the LlavaProcessor takes no video", load_calibration,
              files["videos_jsonl"], load_processor(checkpoints["llava"]), samples=1)


def test_motprobe_tsne_refuses_a_video_record_for_a_model_without_video(checkpoints, files, tmp_path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import motprobe.cli

    monkeypatch.setattr(motprobe.cli, "_load", lambda *a: pytest.fail("refused only after loading the model"))
    result = CliRunner().invoke(motprobe.cli.main, ["tsne", "--model", str(checkpoints["llava"]), "--calib",
                                                str(files["mixed"]), "--samples", "100", "--blocks", "0",
                                                "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "takes no video" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_bad_video_records_are_one_line_errors(files, tmp_path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(files["root"], root)
    records = json.loads((root / "mixed.json").read_text())
    video = next(r for r in records if "video" in r)

    def check(record: dict, match: str) -> None:
        (root / "bad.json").write_text(json.dumps([record]))
        _one_line(CalibrationError, match, check_calibration_file, root / "bad.json", samples=1)

    check({**video, "video": "videos/missing"}, "video not found for record 1 of bad.json")
    check({**video, "video": ["a", "b"]}, 'invalid "video"')
    check({**video, "fps": -1}, 'invalid "fps"')
    write_mjpeg_avi(root / "clip.avi", _moving_square(4))
    check({**video, "video": "clip.avi", "fps": 3}, 'gives an "fps" for the video file')
    Image.new("RGB", (20, 20)).save(root / video["video"] / "frame_9.png")
    check(video, "record 1 of bad.json: the frames of video .* differ in size")
    check({**video, "video": "images/img0.png", "fps": None}, "1 frame: a clip needs at least 2")
