"""The second generation of the built-in benchmark: frozen generators, the visual-token regime it is
for (at least 64 visual tokens per image, visual tokens at least 3x the text tokens, objects on a
minority of the patches), a background that cannot be mistaken for what the questions ask about,
and the trainer on it."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from atv_prune.builtin import BENCHMARK_ARGS, regime, scenes
from atv_prune.builtin.tokenizer import build_processor

#: sha256 over the names and bytes of manifest.json, calib.json and test/<task>.jsonl that each
#: generation's ``BENCHMARK_ARGS`` write, and over the pixels of the first three test images of every
#: image task: any change to a generator's draws, captions or drawing fails here.
FROZEN = {
    1: ("d628e0998d16fc8b1081dd444535ca8d77f2a6bd95ee6ea5b0062c9629763a25",
        "0f9cf2464ccbb109c87b71409943386809b07700fb6e82744cd299c6510c15f0"),
    2: ("234bef3f33d27aa24620417c0accae73a73b0984878fe7260768dc279e061de8",
        "1338f97876d9c8b41473f522f5a74c268b4e6066197b10a7de5ada798ab8cdd1"),
}
PATCH = 12  # the generation-2 model's patch: 12 x 12 = 144 visual tokens per 144 px image


def _frozen_digests(folder: Path) -> tuple[str, str]:
    files = hashlib.sha256()
    for name in ["manifest.json", "calib.json"] + [f"test/{task}.jsonl" for task in scenes.TASKS]:
        files.update(name.encode())
        files.update((folder / name).read_bytes())
    pixels = hashlib.sha256()
    for task in scenes.TASKS:
        for record in scenes.read_jsonl(folder / "test" / f"{task}.jsonl")[:3]:
            if record["image"]:
                pixels.update(np.asarray(scenes.render(record["scene"])).tobytes())
    return files.hexdigest(), pixels.hexdigest()


@pytest.mark.parametrize("generation", scenes.GENERATIONS)
def test_each_generations_benchmark_is_frozen(tmp_path: Path, generation: int) -> None:
    scenes.generate_benchmark(tmp_path, **BENCHMARK_ARGS[generation])
    assert _frozen_digests(tmp_path) == FROZEN[generation]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert scenes.data_generation(manifest) == generation and ("generation" in manifest) == (generation != 1)


def test_unknown_generation_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="benchmark generation must be one of 1, 2, got 3"):
        scenes.generate_benchmark(tmp_path / "b", n_train=0, n_val=0, n_test=1, n_calib=0, generation=3)
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def bench2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench2")
    scenes.generate_benchmark(out, seed=5, n_train=0, n_val=0, n_test=10, n_calib=64, generation=2)
    return out


def test_visual_tokens_outnumber_text_tokens_at_least_3x(bench2: Path) -> None:
    """Measured with the real processor and tokenizer on whole conversations: every image carries
    144 visual tokens, and the average calibration sample and test question has at least 3x as many
    visual as text tokens (chat template, question or caption request, answer or caption)."""
    measured = regime.measure(bench2, build_processor(PATCH, scenes.image_size(2)), samples=64)
    assert measured["generation"] == 2 and measured["image_size"] == 144
    for pool in ("calibration", "test_image_questions", "test_all_questions"):
        assert measured[pool]["ratio"] >= 3, pool
    for pool in ("calibration", "test_image_questions"):
        assert measured[pool]["visual"] == 144 >= 64
    assert measured["test_per_task"]["textonly"]["visual"] == 0
    assert measured["object_patch_share"]["mean"] < 0.25 and measured["object_patch_share"]["max"] < 0.5


def test_token_counts_follow_the_processor(bench2: Path) -> None:
    processor = build_processor(PATCH, scenes.image_size(2))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert regime.token_counts(torch.tensor([[1, image_id, image_id, 5]]), image_id) == (2, 2)
    counts = regime.question_counts(bench2, processor, per_task=2)
    record = scenes.read_jsonl(bench2 / "test" / "exist.jsonl")[0]
    # <s> <|user|> question words <image>*144 <|assistant|> answer <|end|>
    words = len(processor.tokenizer(record["question"], add_special_tokens=False)["input_ids"])
    assert counts["exist"][0] == (144, words + 5)


def test_regime_command_measures_with_a_patch_size(bench2: Path, capsys) -> None:
    result = regime.main(["--bench", str(bench2), "--patch-size", "16", "--samples", "8", "--items", "2"])
    assert result["calibration"]["visual"] == 81 and json.loads(capsys.readouterr().out) == result
    with pytest.raises(SystemExit):
        regime.main(["--bench", str(bench2), "--patch-size", "10"])
    assert "--patch-size 10 does not divide the benchmark's 144 px images" in capsys.readouterr().err


def _scenes2(n: int, seed: int = 0) -> list[scenes.Scene]:
    rng = random.Random(seed)
    return [scenes.sample_scene(rng, 2) for _ in range(n)]


def test_objects_cover_a_minority_of_the_patches() -> None:
    shares = [regime.patch_coverage(scene, PATCH)[0] for scene in _scenes2(300)]
    assert max(shares) < 0.5 and sum(shares) / len(shares) < 0.25
    empty = {"generation": 2, "background": {"tone": [90, 90, 90], "texture": "plain", "marks": 0, "seed": 0},
            "objects": [], "word": None}
    assert regime.patch_coverage(empty, PATCH) == (0.0, 0.0)


def test_background_cannot_pass_for_an_object() -> None:
    """Every pixel outside the objects and the word plate is muted (its channels within 70 levels of
    each other), while each object colour spans at least 150: textures and clutter marks never
    carry a colour the questions ask about. Objects keep their colour where they are drawn."""
    spread = min(max(c) - min(c) for c in scenes.COLORS.values())
    assert spread >= 150
    textures = set()
    for scene in _scenes2(120, seed=1):
        textures.add(scene["background"]["texture"])
        pixels = np.asarray(scenes.render(scene)).astype(int)
        foreground = np.asarray(scenes.foreground_mask(scene)) > 0
        background = pixels[~foreground]
        assert (background.max(-1) - background.min(-1)).max() <= 70
        for obj in scene["objects"]:
            cell = scenes.CANVASES[2].cell
            cx, cy = obj["col"] * cell + cell // 2 + obj["dx"], obj["row"] * cell + cell // 2 + obj["dy"]
            assert tuple(pixels[cy, cx]) == scenes.COLORS[obj["color"]]
    assert textures == set(scenes.TEXTURES)


def test_objects_and_plates_stay_inside_their_cells() -> None:
    """Each object and the word plate, drawn alone, lies inside its grid cell (so cell labels, the
    alignment loss and the position words stay exact) and anywhere in it."""
    canvas = scenes.CANVASES[2]
    offsets = set()
    for scene in _scenes2(200, seed=2):
        things = [{**scene, "objects": [o], "word": None} for o in scene["objects"]]
        if scene["word"] is not None:
            things.append({**scene, "objects": [], "word": scene["word"]})
        for thing in things:
            (where,) = thing["objects"] or [thing["word"]]
            ys, xs = np.nonzero(np.asarray(scenes.foreground_mask(thing)))
            assert xs.min() >= where["col"] * canvas.cell and xs.max() < (where["col"] + 1) * canvas.cell
            assert ys.min() >= where["row"] * canvas.cell and ys.max() < (where["row"] + 1) * canvas.cell
            offsets.add(where["dx"])
    assert max(offsets) >= 10 and min(offsets) <= -10


def test_rendering_is_deterministic_and_backgrounds_vary() -> None:
    scene = _scenes2(1, seed=3)[0]
    assert np.array_equal(np.asarray(scenes.render(scene)), np.asarray(scenes.render(json.loads(json.dumps(scene)))))
    assert scenes.render(scene).size == (144, 144) and scenes.scene_generation(scene) == 2
    plain = [np.asarray(scenes.render({**sc, "objects": [], "word": None})) for sc in _scenes2(20, seed=4)]
    assert len({p.tobytes() for p in plain}) == 20


def test_generation_2_caption_is_short_and_complete() -> None:
    scene = {"generation": 2, "background": {"tone": [90, 90, 90], "texture": "plain", "marks": 0, "seed": 0},
             "objects": [{"color": "red", "shape": "circle", "size": "big", "row": 0, "col": 0, "dx": 0, "dy": 0},
                         {"color": "blue", "shape": "square", "size": "small", "row": 1, "col": 1, "dx": 3, "dy": -4}],
             "word": {"text": "cat", "row": 2, "col": 1, "dx": 0, "dy": 0}}
    assert scenes.caption(scene) == ("2 shapes: big red circle at top left, small blue square at center. "
                                     "the word cat at bottom.")


# Generation 2 on the tiny recipe of test_builtin_scenes.TINY_TRAINING: patch 16 gives 9 x 9 tokens.
TINY_2 = ["--n-train", "48", "--n-val", "2", "--n-test", "2", "--n-calib", "2", "--steps", "2", "--vision-steps", "1",
          "--vision-batch-size", "4", "--batch-size", "4", "--align-weight", "1", "--align-positions",
          "--standardize-projector", "--threads", "1", "--text-hidden", "32", "--text-intermediate", "64",
          "--text-heads", "2", "--text-layers", "1", "--vision-hidden", "32", "--vision-heads", "2",
          "--vision-layers", "1", "--eval-every", "2", "--eval-items", "2", "--patch-size", "16", "--generation", "2"]


def test_trainer_trains_on_generation_2(tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from atv_prune.builtin.train import main

    threads = torch.get_num_threads()
    try:
        result = main(["--out", str(tmp_path / "run"), *TINY_2])
    finally:
        torch.set_num_threads(threads)
    assert scenes.data_generation(result["data"]) == 2 and "--generation 2" in result["command"]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run")
    processor = AutoProcessor.from_pretrained(tmp_path / "run")
    assert model.config.vision_config.image_size == 144 and model.config.image_seq_length == 81
    assert processor.image_processor.crop_size["height"] == 144
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert "144 px images, 81 visual tokens" in card and "generation=2)" in card


@pytest.mark.parametrize("argv, message", [
    (["--patch-size", "10"], "--patch-size 10 does not divide the 144 px images of generation 2"),
    (["--generation", "3"], "argument --generation: invalid choice: 3"),
])
def test_trainer_refuses_a_patch_or_generation_that_does_not_fit(tmp_path: Path, capsys, argv: list[str],
                                                                 message: str) -> None:
    from atv_prune.builtin.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--generation", "2", *argv])
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_trainer_refuses_data_of_another_generation(bench2: Path, tmp_path: Path, capsys) -> None:
    from atv_prune.builtin.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--data", str(bench2), "--patch-size", "12"])
    assert f"{bench2} is of generation 2 but --generation is 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
