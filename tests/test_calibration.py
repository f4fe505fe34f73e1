"""Calibration loading and processor loading on tiny local checkpoints (no hub, no torchvision)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText, Qwen2VLProcessor

from atv_prune.errors import CalibrationError
from atv_prune.model import processors
from atv_prune.model.calibration import CalibrationSet, load_calibration
from atv_prune.model.processors import load_processor
from atv_prune.model.video_processors import QwenVideoProcessor
from tiny_checkpoints import FAMILIES, make_calibration_files, make_checkpoint


class _Checkpoints(dict):
    """Tiny checkpoints built on first use; a family whose processor this transformers release
    cannot build without torchvision (Idefics3's PIL image processor in 5.15-5.17) is skipped."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        try:
            self[family] = make_checkpoint(self.root / family, family)
        except ImportError as error:
            if "torchvision" not in str(error).lower():
                raise
            pytest.skip(f"transformers {transformers.__version__} cannot build the {family} processor "
                        "without torchvision")
        return self[family]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _Checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_calibration_files(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def llava(checkpoints: dict[str, Path]):
    return load_processor(checkpoints["llava"])


@pytest.fixture(scope="module")
def qwen(checkpoints: dict[str, Path]):
    return load_processor(checkpoints["qwen2_vl"])


def _image_tokens(calib: CalibrationSet, token_id: int) -> list[int]:
    return [int((s.inputs["input_ids"] == token_id).sum()) for s in calib.samples]


def _one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(CalibrationError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


# --- processors -------------------------------------------------------------------------------


def test_qwen2_vl_processor_loads_without_torchvision(checkpoints, monkeypatch, tmp_path):
    monkeypatch.setattr(processors, "torchvision_usable", lambda: False)
    proc = load_processor(checkpoints["qwen2_vl"])
    assert isinstance(proc, Qwen2VLProcessor)
    assert "video_processor" not in type(proc).get_attributes()
    assert type(proc).__name__ == "Qwen2VLProcessor"
    assert proc.image_token == "<|image_pad|>" and proc.chat_template
    proc.save_pretrained(tmp_path)  # the saved processor keeps its original class name
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"


def test_auto_processor_failure_falls_back_to_video_free_class(checkpoints, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("Can't load video processor")

    monkeypatch.setattr(processors, "torchvision_usable", lambda: True)
    monkeypatch.setattr(processors.AutoProcessor, "from_pretrained", broken)
    proc = load_processor(checkpoints["qwen2_vl"])
    assert isinstance(proc, Qwen2VLProcessor) and proc.image_processor is not None


@pytest.mark.parametrize("where", ["processor_config.json", "video_preprocessor_config.json"])
def test_checkpoint_declaring_a_video_processor_loads(checkpoints, monkeypatch, tmp_path, where):
    """Real Qwen2-VL checkpoints also save a video processor config (inside processor_config.json,
    or in video_preprocessor_config.json): without torchvision its settings go to the torch-only twin."""
    folder = tmp_path / "qwen"
    shutil.copytree(checkpoints["qwen2_vl"], folder)
    config = json.loads((folder / "processor_config.json").read_text())
    video = {**config["image_processor"], "video_processor_type": "Qwen2VLVideoProcessor",
             "size": {"shortest_edge": 64, "longest_edge": 4096}}
    config.pop("video_processor", None)
    if where == "processor_config.json":
        config["video_processor"] = video
    else:
        (folder / where).write_text(json.dumps(video))
    (folder / "processor_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(processors, "torchvision_usable", lambda: False)
    proc = load_processor(folder)
    assert isinstance(proc, Qwen2VLProcessor) and isinstance(proc.video_processor, QwenVideoProcessor)
    assert proc.video_processor.size == {"shortest_edge": 64, "longest_edge": 4096}


def test_image_processor_falls_back_to_pil(checkpoints, monkeypatch):
    calls = []

    def runs_after_first(image_processor) -> bool:
        calls.append(image_processor)
        return len(calls) > 1

    monkeypatch.setattr(processors, "_image_processor_runs", runs_after_first)
    proc = load_processor(checkpoints["llava"])
    assert proc.image_processor is calls[1] and type(calls[1]).__name__.endswith("Pil")
    monkeypatch.setattr(processors, "_image_processor_runs", lambda _: False)
    _one_line_error("cannot run here", load_processor, checkpoints["llava"])


def test_load_processor_errors(tmp_path, checkpoints):
    _one_line_error("no model folder", load_processor, tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    message = _one_line_error("no processor found", load_processor, tmp_path)
    assert str(tmp_path) in message


# --- tiny checkpoints accept calibration samples -----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_model_forward_accepts_samples(family, checkpoints, files):
    proc = load_processor(checkpoints[family])
    model = AutoModelForImageTextToText.from_pretrained(checkpoints[family]).eval()
    calib = load_calibration(files["json"], proc, samples=2, seed=1)
    token_id = model.config.image_token_id
    assert all(n > 0 for n in _image_tokens(calib, token_id))
    for sample in calib.samples:
        inputs = dict(sample.inputs)
        if family == "qwen2_vl" and "mm_token_type_ids" not in inputs:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == token_id).long()
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


# --- calibration files ------------------------------------------------------------------------


def test_both_formats_load(files, llava):
    for key, records in (("json", 6), ("jsonl", 6)):
        calib = load_calibration(files[key], llava, samples=4)
        assert len(calib.samples) == 4 and calib.records_in_file == records and not calib.warnings
        assert all(s.source.startswith(files[key].name + ":") for s in calib.samples)
        assert all(s.inputs["input_ids"].shape[0] == 1 and "pixel_values" in s.inputs for s in calib.samples)
        assert _image_tokens(calib, llava.image_token_id) == [16] * 4


def test_rendering_follows_records(files, llava):
    calib = load_calibration(files["json"], llava, samples=6)
    texts = {s.source: llava.tokenizer.decode(s.inputs["input_ids"][0]) for s in calib.samples}
    multi_turn, marker_last = texts["calib.json:2"], texts["calib.json:3"]
    assert multi_turn.count("ASSISTANT:") == 2 and "Red and blue." in multi_turn
    assert marker_last.index("Count the objects.") < marker_last.index("<image>")
    assert texts["calib.json:1"].startswith("USER: <image>")
    assert texts["calib.json:1"].endswith("A red square and a blue circle.</s>")


def test_seeded_draw(files, llava):
    def sources(seed: int) -> list[str]:
        return [s.source for s in load_calibration(files["jsonl"], llava, samples=3, seed=seed).samples]

    assert sources(0) == sources(0)
    assert sources(0) != sources(1)


def test_fewer_records_than_samples_warns(files, llava):
    calib = load_calibration(files["json"], llava, samples=100)
    assert len(calib.samples) == 6 and len(calib.warnings) == 1 and "6 records" in calib.warnings[0]


def test_image_root_and_text_only_records(tmp_path, files, llava):
    lines = [{"image": "img0.png", "text": "An image."}, {"text": "No image.", "prompt": "Say something."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    calib = load_calibration(path, llava, image_root=files["root"] / "images", samples=2)
    by_source = {s.source: s for s in calib.samples}
    assert _image_tokens(CalibrationSet([by_source["pairs.jsonl:1"]], "", 1, 0), llava.image_token_id) == [16]
    assert "pixel_values" not in by_source["pairs.jsonl:2"].inputs
    assert by_source["pairs.jsonl:2"].image is None


def test_max_pixels_reduces_qwen_visual_tokens(files, qwen):
    full = _image_tokens(load_calibration(files["json"], qwen, samples=6), qwen.image_token_id)
    size_before = dict(qwen.image_processor.size)
    capped_set = load_calibration(files["json"], qwen, samples=6, max_pixels=300)
    capped = _image_tokens(capped_set, qwen.image_token_id)
    assert all(0 < c < f <= 16 for c, f in zip(capped, full))
    assert all(c * 4 * 16 <= 300 for c in capped)  # 4 x 4 px patches, 2 x 2 merged per token
    assert dict(qwen.image_processor.size) == size_before


def test_without_chat_template_renders_plain_text(checkpoints, files):
    proc = load_processor(checkpoints["llava"])
    proc.chat_template = None
    proc.tokenizer.chat_template = None
    calib = load_calibration(files["jsonl"], proc, samples=2)
    assert any("chat template" in w for w in calib.warnings)
    assert _image_tokens(calib, proc.image_token_id) == [16, 16]
    assert proc.tokenizer.decode(calib.samples[0].inputs["input_ids"][0]).startswith("USER: <image>")


# --- errors: one line, naming the problem ------------------------------------------------------


def _write(path: Path, text: str | bytes) -> Path:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def test_error_missing_file_and_bad_counts(tmp_path, files, llava):
    _one_line_error("not found", load_calibration, tmp_path / "nope.json", llava)
    _one_line_error("samples must be at least 1", load_calibration, files["json"], llava, samples=0)


def test_error_empty_file(tmp_path, llava):
    _one_line_error("is empty", load_calibration, _write(tmp_path / "empty.json", "  \n"), llava)
    _one_line_error("no records", load_calibration, _write(tmp_path / "list.json", "[]"), llava)


def test_error_malformed_json(tmp_path, llava):
    bad = _write(tmp_path / "bad.json", '[\n {"image": "a.png",\n  "conversations": [}\n]')
    message = _one_line_error("malformed JSON", load_calibration, bad, llava)
    assert "line 3" in message and "column" in message


def test_error_malformed_jsonl(tmp_path, llava):
    good = json.dumps({"image": "a.png", "text": "x"})
    bad = _write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{not json\n")
    assert "line 3" in _one_line_error("malformed JSONL", load_calibration, bad, llava)


def test_error_missing_conversations(tmp_path, llava):
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}, {"image": "b.png"}]
    path = _write(tmp_path / "conv.json", json.dumps(records))
    assert "record 2" in _one_line_error("conversations", load_calibration, path, llava)
    records[1] = {"image": "b.png", "conversations": [{"from": "robot", "value": "hi"}]}
    _write(path, json.dumps(records))
    assert "record 2" in _one_line_error("turn 1", load_calibration, path, llava)


def test_error_missing_image(tmp_path, files, llava):
    path = _write(tmp_path / "calib.json", files["json"].read_text())
    message = _one_line_error("image not found", load_calibration, path, llava, samples=1)
    assert str(tmp_path) in message and "--image-root" in message and "images/img" in message


def test_only_drawn_images_are_opened(tmp_path, files, llava):
    lines = [{"image": "missing.png", "text": "x"}, {"image": str(files["images"][0]), "text": "y"}]
    path = _write(tmp_path / "mixed.jsonl", "\n".join(json.dumps(x) for x in lines))
    seed = next(s for s in range(100) if random.Random(s).sample(range(2), 1) == [1])
    calib = load_calibration(path, llava, samples=1, seed=seed)  # absolute image path, missing one not drawn
    assert [s.source for s in calib.samples] == ["mixed.jsonl:2"]


def test_error_corrupt_image(tmp_path, llava):
    _write(tmp_path / "broken.png", b"\x89PNG garbage bytes, not an image")
    path = _write(tmp_path / "c.jsonl", json.dumps({"image": "broken.png", "text": "x"}) + "\n")
    assert "broken.png" in _one_line_error("cannot read image", load_calibration, path, llava)


def test_a_template_that_writes_bos_gets_no_second_bos(checkpoints, files):
    from tokenizers.processors import TemplateProcessing

    proc = load_processor(checkpoints["llava"])
    bos = proc.tokenizer.bos_token
    bos_id = proc.tokenizer.convert_tokens_to_ids(bos)
    proc.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A",
                                                                         special_tokens=[(bos, bos_id)])
    assert proc.tokenizer("x")["input_ids"][0] == bos_id  # this tokenizer adds BOS itself, like Llama-3's
    proc.chat_template = bos + proc.chat_template
    calib = load_calibration(files["json"], proc, samples=2, seed=0)
    for sample in calib.samples:
        ids = sample.inputs["input_ids"][0].tolist()
        assert ids[0] == bos_id and ids[1] != bos_id
