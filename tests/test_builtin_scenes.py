"""The built-in scene benchmark, tokenizer and processor: determinism, disjoint splits, exact answers,
and agreement between the processor, the trainer's fast encoder and the model's visual tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from atv_prune.builtin import CHECKPOINT_DIR, scenes
from atv_prune.builtin.tokenizer import build_processor, build_tokenizer
from atv_prune.builtin.train import Encoder, ModelShape, VisualWordAlignment, build_model, cell_labels
from atv_prune.eval.answers import answer_matches
from atv_prune.model.calibration import load_calibration

SIZES = {"n_train": 60, "n_val": 6, "n_test": 12, "n_calib": 6}
SMALL_SHAPE = ModelShape(patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                         text_layers=1, text_heads=2, text_intermediate=64)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=scenes.GENERATIONS, ids=lambda g: f"generation{g}")
def bench(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small benchmark of each generation."""
    out = tmp_path_factory.mktemp(f"bench{request.param}")
    scenes.generate_benchmark(out, seed=3, **SIZES, generation=request.param)
    return out


def _generation(bench: Path) -> int:
    return scenes.data_generation(json.loads((bench / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def processor():
    return build_processor(SMALL_SHAPE.patch_size)


@pytest.fixture(scope="module")
def bench_processor(bench: Path):
    """The small model's processor for the images of ``bench``'s generation."""
    return build_processor(SMALL_SHAPE.patch_size, scenes.image_size(_generation(bench)))


def _items(bench: Path, split: str) -> list[dict]:
    return [item for task in scenes.TASKS for item in scenes.read_jsonl(bench / split / f"{task}.jsonl")]


def test_generator_is_deterministic(bench: Path, tmp_path: Path) -> None:
    generation = _generation(bench)
    scenes.generate_benchmark(tmp_path / "same", seed=3, **SIZES, generation=generation)
    assert _digest(tmp_path / "same") == _digest(bench)
    scenes.generate_benchmark(tmp_path / "other", seed=4, **SIZES, generation=generation)
    other = _digest(tmp_path / "other")
    assert other["test/count.jsonl"] != _digest(bench)["test/count.jsonl"]


def test_generator_reproduces_the_shipped_benchmark(tmp_path: Path) -> None:
    """The shipped benchmark (test items, calibration captions, manifest) is what the documented
    ``SHIPPED_BENCHMARK_ARGS`` call writes: a change of any family's random draws (which would
    silently change the benchmark) fails here."""
    from atv_prune.builtin import BENCHMARK_DIR, SHIPPED_BENCHMARK_ARGS

    scenes.generate_benchmark(tmp_path, **SHIPPED_BENCHMARK_ARGS)
    names = ["manifest.json", "calib.json"] + [f"test/{task}.jsonl" for task in scenes.TASKS]
    for name in names:
        assert (tmp_path / name).read_text() == (BENCHMARK_DIR / name).read_text(), name


def test_test_items_do_not_depend_on_other_split_sizes(bench: Path, tmp_path: Path) -> None:
    scenes.generate_benchmark(tmp_path, seed=3, n_train=5, n_val=2, n_test=4, n_calib=1, generation=_generation(bench))
    for task in scenes.TASKS:
        small = scenes.read_jsonl(tmp_path / "test" / f"{task}.jsonl")
        assert small == scenes.read_jsonl(bench / "test" / f"{task}.jsonl")[:4]


def test_splits_are_disjoint_by_scene(bench: Path) -> None:
    test = {i["scene_hash"] for i in _items(bench, "test") if i["scene"]}
    val = {i["scene_hash"] for i in _items(bench, "val") if i["scene"]}
    train = {scenes.scene_hash(r["scene"]) for r in scenes.read_jsonl(bench / "train.jsonl") if r["scene"]}
    calib = {Path(r["image"]).stem for r in json.loads((bench / "calib.json").read_text())}
    assert test and val and train and calib
    assert not test & val and not test & train and not test & calib and not val & train and not calib & train


def _objects(scene: dict, color: str | None = None, shape: str | None = None) -> list[dict]:
    return [o for o in scene["objects"] if (color is None or o["color"] == color)
            and (shape is None or o["shape"] == shape)]


def _check(item: dict) -> None:
    """Recompute the answer of an item from its scene metadata."""
    scene, q, a = item["scene"], item["question"], item["answer"]
    if item["task"] == "textonly":
        m = re.fullmatch(r"what is (\d) plus (\d)\?", q)
        expected = int(m[1]) + int(m[2]) if m else int(re.fullmatch(r"what number comes after (\d)\?", q)[1]) + 1
        assert a == str(expected)
    elif item["task"] == "exist":
        color, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", q).groups()
        assert a == ("yes" if _objects(scene, color, shape) else "no")
        assert item["negative"] in scenes.NEGATIVES
    elif item["task"] == "count":
        if q == "how many shapes are there?":
            expected = len(scene["objects"])
        else:
            word = re.fullmatch(r"how many (\w+)(?: shapes)? are there\?", q)[1]
            expected = len(_objects(scene, color=word) if word in scenes.COLORS else _objects(scene, shape=word[:-1]))
        assert a == str(expected)
    elif item["task"] == "reading":
        assert a == scene["word"]["text"]
    elif item["task"] == "spatial":
        c1, s1, rel, c2, s2 = re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?",
                                           q).groups()
        (o1,), (o2,) = _objects(scene, c1, s1), _objects(scene, c2, s2)
        axis, sign = scenes.RELATIONS[rel]
        key = "row" if axis == 0 else "col"
        assert a == ("yes" if (o1[key] - o2[key]) * sign > 0 else "no")
    elif item["task"] == "mcq":
        assert item["choices"][scenes.LETTERS.index(a)] in {o["color"] for o in scene["objects"]} | {
            o["shape"] for o in scene["objects"]} | {str(len(scene["objects"]))} | {str(i) for i in range(6)}
    elif item["task"] == "attribute":
        m = re.fullmatch(r"what color is the (\w+)\?", q)
        if m:
            (obj,) = _objects(scene, shape=m[1])
            assert a == obj["color"]
        else:
            assert a in scenes.SHAPES or a in scenes.SIZES
    else:
        assert item["task"] == "rule"
        rule = re.search(r"when (.+)\. is this", q)[1]
        colors = {o["color"] for o in scene["objects"]}
        if m := re.fullmatch(r"it has a (\w+) (\w+)", rule):
            holds = bool(_objects(scene, m[1], m[2]))
        elif m := re.fullmatch(r"it has more than (\d) shapes", rule):
            holds = len(scene["objects"]) > int(m[1])
        elif m := re.fullmatch(r"every (\w+) in it is (\w+)", rule):
            holds = all(o["color"] == m[2] for o in _objects(scene, shape=m[1]))
        elif m := re.fullmatch(r"it has no (\w+) shapes", rule):
            holds = m[1] not in colors
        else:
            holds = scene["word"]["text"] == re.fullmatch(r"the word (\w+) is written in it", rule)[1]
        assert a == ("yes" if holds else "no")


def test_every_task_present_and_answers_follow_the_scene(bench: Path) -> None:
    for split, n in (("test", SIZES["n_test"]), ("val", SIZES["n_val"])):
        items = _items(bench, split)
        assert sorted({i["task"] for i in items}) == sorted(scenes.TASKS)
        assert len(items) == n * len(scenes.TASKS)
        for item in items:
            assert set(item) >= {"id", "task", "image", "question", "answer", "chance"}
            assert 0 < item["chance"] < 1
            assert (item["image"] is None) == (item["task"] == "textonly")
            _check(item)
    item = next(i for i in _items(bench, "test") if i["image"])
    saved = np.asarray(Image.open(bench / item["image"]).convert("RGB"))
    assert np.array_equal(saved, np.asarray(scenes.render(item["scene"])))


def test_grounding_tasks_follow_the_scene_and_tokenize() -> None:
    """The training-only lookups: "where is X?" names X's cell; "what is at P?" names what P holds."""
    rng = random.Random(5)
    tok = build_tokenizer()
    names = {scenes.position_name(r, c): (r, c) for r in range(scenes.GRID) for c in range(scenes.GRID)}
    seen = set()
    for _ in range(200):
        scene = scenes.sample_scene(rng)
        where = scenes.make_item("locate", scene, rng)
        color, shape = re.fullmatch(r"where is the (\w+) (\w+)\?", where["question"]).groups()
        (obj,) = _objects(scene, color, shape)
        assert names[where["answer"]] == (obj["row"], obj["col"])
        what = scenes.make_item("describe", scene, rng)
        cell = names[re.fullmatch(r"what is at the (.+)\?", what["question"])[1]]
        held = [f"{o['size']} {o['color']} {o['shape']}" for o in scene["objects"] if (o["row"], o["col"]) == cell]
        word = scene["word"]
        if word is not None and (word["row"], word["col"]) == cell:
            held = [f"the word {word['text']}"]
        assert what["answer"] == (held[0] if held else "nothing")
        seen.add(what["answer"].split()[0])
        for text in (where["question"], where["answer"], what["question"], what["answer"]):
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
    assert {"nothing", "the", "big", "small"} <= seen
    records = [scenes.train_record(scenes.sample_scene(rng), rng, {"locate": 1.0, "describe": 1.0}, 1)
               for _ in range(20)]
    assert {t["task"] for r in records for t in r} == {"locate", "describe"}


def test_rule_skips_an_every_rule_that_cannot_be_false() -> None:
    """A scene holding one shape in all five colours has no false "every <shape> is <colour>" rule:
    the generator declines (None) instead of failing, and every rule it does state is answered right."""
    objects = [{"color": c, "shape": "circle", "size": "big", "row": i // 3, "col": i % 3, "dx": 0, "dy": 0}
               for i, c in enumerate(scenes.COLORS)]
    scene = {"background": 90, "objects": objects, "word": None}
    outcomes = [scenes.make_item("rule", scene, random.Random(seed)) for seed in range(300)]
    assert any(item is None for item in outcomes)
    for item in filter(None, outcomes):
        if "every circle in it is" in item["question"]:
            assert item["answer"] == "no"  # five colours: no single colour covers every circle


def test_option_lookup_names_the_matching_letter() -> None:
    """The training-only copy step of multiple choice: four distinct options of one kind, the
    answer is the letter of the option that equals the asked value; letters are balanced."""
    rng = random.Random(3)
    tok = build_tokenizer()
    letters = []
    for _ in range(400):
        item = scenes.make_item("option", None, rng)
        target, listed = re.fullmatch(r"what is (\w+)\? (.+)", item["question"]).groups()
        options = dict(re.findall(r"([ABCD])\. (\w+)", listed))
        assert list(options) == list(scenes.LETTERS) and len(set(options.values())) == 4
        assert options[item["answer"]] == target
        assert tok.unk_token_id not in tok(item["question"], add_special_tokens=False)["input_ids"]
        letters.append(item["answer"])
    assert all(80 <= letters.count(letter) <= 120 for letter in scenes.LETTERS)


def test_answer_matches() -> None:
    assert answer_matches("Yes.", "yes")
    assert answer_matches(" a ", "A")
    assert answer_matches("three", "3")
    assert not answer_matches("no", "yes")
    assert not answer_matches("red circle", "red")


def test_tokenizer_round_trip_and_closed_vocabulary(bench: Path) -> None:
    tok = build_tokenizer()
    texts = [t[k] for r in scenes.read_jsonl(bench / "train.jsonl") for t in r["turns"] for k in ("question", "answer")]
    texts += [i["question"] for i in _items(bench, "test")]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids).split() == re.findall(r"\w+|[^\w\s]+", text.lower())


@pytest.mark.skipif(not (CHECKPOINT_DIR / "tokenizer.json").exists(), reason="no built-in checkpoint trained yet")
def test_shipped_tokenizer_is_the_one_the_trainer_builds() -> None:
    """Retraining with the documented command builds the shipped checkpoint's tokenizer."""
    shipped = AutoProcessor.from_pretrained(CHECKPOINT_DIR).tokenizer
    assert shipped.backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()


def test_calibration_file_loads(bench: Path, bench_processor) -> None:
    calib = load_calibration(bench / "calib.json", bench_processor, samples=4)
    assert len(calib.samples) == 4 and not calib.warnings
    image_id = bench_processor.tokenizer.convert_tokens_to_ids("<image>")
    n_visual = (scenes.image_size(_generation(bench)) // SMALL_SHAPE.patch_size) ** 2
    assert all(int((s.inputs["input_ids"] == image_id).sum()) == n_visual for s in calib.samples)


def _bridge_user_content(item: dict, bench: Path) -> list[dict]:
    """The user turn lmms-eval's built-in task path builds for ``item`` (text and image in its order)."""
    from atv_prune.eval.hooks import doc_to_text
    from atv_prune.eval.model import user_content
    from atv_prune.eval.tasks import _record

    doc = _record(item, bench, "test")
    return [{"type": c["type"], **({"text": c["text"]} if c["type"] == "text" else {})}
            for c in user_content(doc_to_text(doc), [Image.open(bench / item["image"])])]


@pytest.mark.parametrize("layout", scenes.IMAGE_POSITIONS)
def test_benchmark_records_follow_the_image_layout(tmp_path: Path, layout: str) -> None:
    """Every image question's record puts the image where the layout says, the manifest names the
    layout, the captions keep the image first, and the items themselves do not change."""
    scenes.generate_benchmark(tmp_path / layout, seed=3, **SIZES, image_layout=layout)
    assert json.loads((tmp_path / layout / "manifest.json").read_text())["image_layout"] == layout
    items = [i for i in _items(tmp_path / layout, "test") if i["image"]]
    assert items and {i["image_position"] for i in items} == {layout}
    assert scenes.image_position(scenes.CAPTION_PROMPT, layout) == "before"
    other = "after" if layout == "before" else "before"
    scenes.generate_benchmark(tmp_path / other, seed=3, **SIZES, image_layout=other)
    strip = [{k: v for k, v in i.items() if k != "image_position"} for i in _items(tmp_path / other, "test")]
    assert strip == [{k: v for k, v in i.items() if k != "image_position"} for i in _items(tmp_path / layout, "test")]


def test_unknown_image_layout_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image layout must be one of before, after, got 'middle'"):
        scenes.generate_benchmark(tmp_path / "b", seed=3, **SIZES, image_layout="middle")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("generation", scenes.GENERATIONS)
@pytest.mark.parametrize("kind", ["before", "after", "caption"])
def test_processor_matches_model_and_trainer_encoder(tmp_path: Path, kind: str, generation: int) -> None:
    """The trainer's token ids equal the processor's for what evaluation (questions, the image where
    the benchmark's layout puts it) and calibration (captions: image first) feed the model."""
    processor = build_processor(SMALL_SHAPE.patch_size, scenes.image_size(generation))
    torch.manual_seed(0)
    model = build_model(SMALL_SHAPE, processor).eval()
    layout = "before" if kind == "caption" else kind
    bench = tmp_path / "bench"
    scenes.generate_benchmark(bench, seed=3, **SIZES, image_layout=layout, generation=generation)
    item = scenes.read_jsonl(bench / "test" / "spatial.jsonl")[0]
    if kind != "caption":
        assert item["image_position"] == layout
        content = _bridge_user_content(item, bench)
        assert [c["type"] for c in content] == (["text", "image"] if layout == "after" else ["image", "text"])
    else:
        item = {**item, "question": scenes.CAPTION_PROMPT, "answer": scenes.caption(item["scene"])}
        content = [{"type": "image"}, {"type": "text", "text": item["question"]}]
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(bench / item["image"])], return_tensors="pt")
    encoder = Encoder(processor, SMALL_SHAPE.patch_size, layout)
    ids, labels = encoder.conversation([item], with_image=True)
    assert inputs["input_ids"][0].tolist() == ids
    assert torch.allclose(inputs["pixel_values"][0], encoder.pixels(item["scene"]), atol=1e-6)
    answer = [t for t in labels if t != -100]
    assert answer_matches(processor.tokenizer.decode(answer, skip_special_tokens=True), item["answer"])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        logits = model(**inputs).logits
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    n_features = sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[1]
    assert n_features == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert logits.shape[:2] == inputs["input_ids"].shape
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    again = reloaded(text=[text], images=[Image.open(bench / item["image"])], return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])


@pytest.mark.parametrize("tokens, foreground", [(False, False), (True, False), (True, True)],
                         ids=["cell-mean", "every-token", "foreground"])
@pytest.mark.parametrize("positions", [False, True])
def test_visual_word_alignment_matches_a_plain_reference(bench: Path, bench_processor, positions: bool,
                                                         tokens: bool, foreground: bool) -> None:
    """The alignment loss equals an explicit per-cell computation (the mean of the cell's patch
    tokens -- 2 x 2 of them on generation 1's images, 3 x 3 on generation 2's --, or with ``tokens``
    each of them, dot products with the candidate words' embeddings, cross-entropy) and trains the
    projector; with ``positions`` each cell also names its row and column word; with
    ``foreground`` a token whose patch shows no pixel of the foreground mask names "nothing"."""
    processor = bench_processor
    torch.manual_seed(0)
    model = build_model(SMALL_SHAPE, processor)
    encoder = Encoder(processor, SMALL_SHAPE.patch_size, scenes.DEFAULT_IMAGE_POSITION)
    alignment = VisualWordAlignment(model, encoder, positions=positions, tokens=tokens, foreground=foreground)
    scene_list = [r["scene"] for r in scenes.read_jsonl(bench / "train.jsonl") if r["scene"]][:3]
    model.model.get_image_features(pixel_values=torch.stack([Encoder.pixels(sc) for sc in scene_list]))
    loss = alignment.loss(scene_list)

    side = scenes.image_size(_generation(bench)) // SMALL_SHAPE.patch_size
    per = side // scenes.GRID
    assert per == {1: 2, 2: 3}[_generation(bench)]
    features = alignment.features.reshape(len(scene_list), side, side, -1)
    embed = model.get_input_embeddings().weight
    groups = (list(scenes.COLORS), list(scenes.SHAPES), list(scenes.SIZES), list(scenes.WORDS))
    terms, background_units = [], 0
    for b, scene in enumerate(scene_list):
        labels = cell_labels(scene)
        pixels, patch = scenes.foreground_mask(scene).load(), SMALL_SHAPE.patch_size
        shown = [[any(pixels[x, y] for y in range(i * patch, (i + 1) * patch) for x in range(j * patch, (j + 1) * patch))
                  for j in range(side)] for i in range(side)]
        for r in range(scenes.GRID):
            for c in range(scenes.GRID):
                block = features[b, r * per:(r + 1) * per, c * per:(c + 1) * per]
                if tokens:
                    units = [(block[i, j], shown[r * per + i][c * per + j] or not foreground)
                             for i in range(per) for j in range(per)]
                else:
                    units = [(block.mean((0, 1)), True)]
                for unit, named in units:
                    background_units += int(not named and bool(labels[r * scenes.GRID + c].any()))
                    for g, words in enumerate(groups):
                        ids = [encoder.words(w)[0] for w in ["nothing", *words]]
                        logits = torch.stack([unit @ embed[i] for i in ids])
                        truth = labels[r * scenes.GRID + c, g] if named else 0
                        terms.append((g, -torch.log_softmax(logits, 0)[truth]))
                    if positions:
                        for g, (names, truth) in enumerate(((scenes.ROW_NAMES, r), (scenes.COL_NAMES, c)), start=4):
                            logits = torch.stack([unit @ embed[encoder.words(w)[0]] for w in names])
                            terms.append((g, -torch.log_softmax(logits, 0)[truth]))
    n_groups = 6 if positions else 4
    reference = sum(torch.stack([t for g2, t in terms if g2 == g]).mean() for g in range(n_groups)) / n_groups
    assert torch.allclose(loss, reference, atol=1e-5)
    # foreground alignment relabels tokens of occupied cells where objects are small against the patch
    # grid (generation 2); generation 1's centred objects touch every patch of their cell
    assert (background_units > 0) == (foreground and _generation(bench) == 2)
    if foreground:
        with pytest.raises(ValueError, match="give it with tokens=True"):
            VisualWordAlignment(model, encoder, foreground=True)  # a cell's mean has no patch to test
    loss.backward()
    assert model.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="no built-in checkpoint trained yet")
def test_checkpoint_reaches_documented_accuracy(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    from atv_prune.builtin.train import data_image_layout, evaluate, load_split

    record = json.loads((CHECKPOINT_DIR / "training.json").read_text())
    n = record["subset_per_task"]
    layout = data_image_layout(record["data"])
    scenes.generate_benchmark(tmp_path, seed=record["seed"], n_train=0, n_val=0, n_test=n, n_calib=0,
                              image_layout=layout, generation=scenes.data_generation(record["data"]))
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR).eval()
    accuracy = evaluate(model, Encoder(processor, record["shape"]["patch_size"], layout), load_split(tmp_path, "test"))
    for task, expected in record["test_subset"].items():
        assert accuracy[task] == pytest.approx(expected, abs=100 / n + 1e-6), task


@pytest.mark.skipif(not (CHECKPOINT_DIR / "training.json").exists(), reason="no built-in checkpoint trained yet")
def test_documented_training_command_is_the_checkpoints() -> None:
    """docs/builtin.md and the model card give the command recorded in training.json, verbatim."""
    command = json.loads((CHECKPOINT_DIR / "training.json").read_text())["command"]
    docs = (Path(__file__).parents[1] / "docs" / "builtin.md").read_text()
    flattened = " ".join(docs.replace("\\\n", " ").replace(".venv/bin/python", "python").split())
    assert command in flattened
    assert command in (CHECKPOINT_DIR / "MODEL_CARD.md").read_text()


def test_diagnostic_items_are_deterministic_and_labelled_by_axis(bench: Path) -> None:
    from atv_prune.builtin.diagnose import diagnostic_items

    items = diagnostic_items(bench, 6)
    assert items == diagnostic_items(bench, 6)
    counts = {t: sum(i["task"] == t for i in items) for t in scenes.GROUNDING_TASKS}
    pairs = sum(len(r["scene"]["objects"]) >= 2 for r in scenes.read_jsonl(bench / "test" / "exist.jsonl")[:6])
    assert counts == {"locate": 6, "describe": 6, "option": 6, "relate": pairs}
    spatial = [i for i in items if i["task"].startswith("spatial-")]
    assert len(spatial) == 6
    for item in spatial:
        vertical = any(f" {r} " in item["question"] for r in ("above", "below"))
        assert item["task"] == ("spatial-row" if vertical else "spatial-col")


def test_diagnose_rejects_a_folder_without_a_checkpoint(tmp_path: Path, capsys) -> None:
    from atv_prune.builtin.diagnose import main as diagnose

    with pytest.raises(SystemExit):
        diagnose(["--model", str(tmp_path)])
    assert "--model:" in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="no built-in checkpoint trained yet")
def test_diagnose_scores_the_shipped_model(capsys) -> None:
    from atv_prune.builtin.diagnose import main as diagnose

    accuracy = diagnose(["--items", "8", "--prune-parts", "0.6"])
    retention = accuracy.pop("retention")
    assert set(accuracy) == {*scenes.GROUNDING_TASKS, "spatial-row", "spatial-col"}
    assert accuracy["locate"] >= 75 and accuracy["describe"] >= 75  # documented: 99 and 100 on 100 items
    n_blocks = json.loads((CHECKPOINT_DIR / "training.json").read_text())["shape"]["text_layers"]
    assert list(retention) == ["all", "attention", "mlp", *(f"block {i}" for i in range(n_blocks))]
    assert all(set(r["tasks"]) | set(r["excluded"]) == set(scenes.TASKS) for r in retention.values())
    assert retention["all"]["mean"] > 50  # documented: 96.9 on 100 items per task
    assert json.loads(capsys.readouterr().out) == {**accuracy, "retention": retention}


def test_diagnose_rejects_a_sparsity_outside_the_unit_interval(capsys) -> None:
    from atv_prune.builtin.diagnose import main as diagnose

    with pytest.raises(SystemExit):
        diagnose(["--prune-parts", "1.3"])
    assert "--prune-parts 1.3 is outside (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("part, pruned_blocks, pruned_prefix", [
    ("attention", {0, 1}, "self_attn."), ("mlp", {0, 1}, "mlp."), ("block 1", {1}, ""), ("all", {0, 1}, "")])
def test_magnitude_prune_part_prunes_exactly_the_part(processor, part: str, pruned_blocks: set[int],
                                                     pruned_prefix: str) -> None:
    """Only the selected decoder linears change, each to exactly floor(P * in_features) zeros per
    row at the lowest magnitudes; everything else keeps its weights."""
    from atv_prune.builtin.diagnose import decoder_parts, magnitude_prune_part
    from atv_prune.model.layout import resolve

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(SMALL_SHAPE, text_layers=2), processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = magnitude_prune_part(model, decoder_parts(2)[part], 0.6)
    blocks = resolve(model).blocks(model)
    changed = 0
    for i, block in enumerate(blocks):
        for name, linear in block.named_modules():
            if not isinstance(linear, torch.nn.Linear):
                continue
            original = before[next(k for k, v in model.named_parameters() if v is linear.weight)]
            if i in pruned_blocks and name.startswith(pruned_prefix):
                changed += 1
                zeros = (linear.weight == 0).sum(dim=1)
                assert torch.all(zeros == int(0.6 * linear.in_features)), name
                kept = original.abs().masked_fill(linear.weight == 0, float("inf")).min(dim=1).values
                dropped = original.abs().masked_fill(linear.weight != 0, 0).max(dim=1).values
                assert torch.all(dropped <= kept), name
            else:
                assert torch.equal(linear.weight, original), name
    assert count == changed > 0
    decoder = {id(p) for p in blocks.parameters()}
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters() if id(v) not in decoder)


def test_relate_answers_the_spatial_question_from_the_stated_positions() -> None:
    """The training-only compare step of spatial questions: both objects' cells stated in words,
    then a spatial question about them whose answer follows from those cells alone."""
    rng = random.Random(4)
    tok = build_tokenizer()
    cells = {scenes.position_name(r, c): (r, c) for r in range(scenes.GRID) for c in range(scenes.GRID)}
    answers, orders = [], set()
    for _ in range(400):
        scene = scenes.sample_scene(rng)
        item = scenes.make_item("relate", scene, rng)
        if len(scene["objects"]) < 2:
            assert item is None
            continue
        first, second, asked = re.fullmatch(r"(the \w+ \w+ is at the [\w ]+\.) (the \w+ \w+ is at the [\w ]+\.) (is .+\?)",
                                            item["question"]).groups()
        stated = {" ".join(m[:2]): cells[m[2]] for m in (re.fullmatch(r"the (\w+) (\w+) is at the ([\w ]+)\.", s).groups()
                                                        for s in (first, second))}
        a, relation, b = re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", asked).groups()
        assert set(stated) == {a, b}
        orders.add(next(iter(stated)) == a)
        for name in stated:
            (obj,) = _objects(scene, *name.split())
            assert stated[name] == (obj["row"], obj["col"])
        axis, sign = scenes.RELATIONS[relation]
        assert stated[a][axis] != stated[b][axis]
        assert item["answer"] == ("yes" if (stated[a][axis] - stated[b][axis]) * sign > 0 else "no")
        assert tok.unk_token_id not in tok(item["question"], add_special_tokens=False)["input_ids"]
        answers.append(item["answer"])
    assert 0.3 <= answers.count("yes") / len(answers) <= 0.7
    assert orders == {True, False}  # the asked-about object is stated first or second


def test_text_phase_trains_the_decoder_only(processor) -> None:
    """``pretrain_text`` draws image-free questions of the asked families, changes the decoder
    blocks and leaves the vision tower, the projector, the word embeddings and the LM head
    untouched; the same seed gives the same weights."""
    from atv_prune.builtin.train import pretrain_text, text_items

    items = text_items({"option": 1.0, "relate": 1.0}, 40, random.Random(0))
    assert {i["task"] for i in items} == {"option", "relate"} and all(i["scene"] is None for i in items)
    shape = ModelShape(patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                       text_layers=1, text_heads=2, text_intermediate=64)
    encoder = Encoder(processor, shape.patch_size, scenes.DEFAULT_IMAGE_POSITION)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(shape, processor)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        curve = pretrain_text(model, encoder, {"option": 1.0, "relate": 1.0}, steps=2, batch_size=4, lr=1e-3,
                              warmup=1, weight_decay=0.01, seed=0, log_every=1)
        after = model.state_dict()
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        assert changed and all(k.startswith(("model.language_model.layers.", "model.language_model.norm."))
                               for k in changed)
        assert any("vision_tower" in k for k in after) and any("multi_modal_projector" in k for k in after)
        assert [c["step"] for c in curve] == [1, 2, 2] and {"option", "relate", "mean"} <= set(curve[-1])
        assert all(p.requires_grad for p in model.parameters())  # the frozen parts train again in the mix
        states.append(after)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# A seconds-long training run: the whole recipe (vision pretraining, standardised projector,
# alignment loss, grounding tasks, text-only questions) on a one-block model.
TINY_TRAINING = ["--n-train", "64", "--n-val", "2", "--n-test", "2", "--n-calib", "2", "--steps", "3",
                 "--vision-steps", "2", "--vision-batch-size", "4", "--batch-size", "4", "--align-weight", "1",
                 "--standardize-projector", "--threads", "1", "--text-hidden", "32", "--text-intermediate", "64",
                 "--text-heads", "2", "--text-layers", "1", "--vision-hidden", "32", "--vision-heads", "2",
                 "--vision-layers", "1", "--eval-every", "3", "--eval-items", "2", "--patch-size", "16",
                 "--task-weights", "locate=1,describe=1,relate=1", "--log-every", "1", "--text-steps", "2",
                 "--text-tasks", "option=1,relate=1", "--text-per-batch", "2"]


def test_trainer_end_to_end_is_deterministic(tmp_path: Path, capsys, monkeypatch) -> None:
    """The training command (vision pretraining, standardised projector, alignment loss, grounding
    tasks) writes a loadable checkpoint with its card, the same command gives the same weights, and
    the log reports the answer loss and the alignment loss apart."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from atv_prune.builtin.outliers import amplify_outlier_features
    from atv_prune.builtin.train import PINNED_KERNELS, main

    args = TINY_TRAINING
    for name in PINNED_KERNELS:  # the kernels count as not pinned: the trainer says so
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        first = main(["--out", str(tmp_path / "a"), *args])
        main(["--out", str(tmp_path / "b"), *args])
        outlying = main(["--out", str(tmp_path / "c"), *args, "--outlier-channels", "4", "--outlier-scale", "8"])
    finally:
        torch.set_num_threads(threads)  # main() sets the trainer's thread count for the process
    weights_a = load_file(tmp_path / "a" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # --outlier-channels: the same training, then the exact rescaling of the channels it records
    assert first["outliers"] is None and outlying["outliers"]["channels"] == sorted(outlying["outliers"]["channels"])
    assert len(outlying["outliers"]["channels"]) == 4 and outlying["test"] == first["test"]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    amplify_outlier_features(model, outlying["outliers"]["channels"], 8.0)
    weights_c = LlavaForConditionalGeneration.from_pretrained(tmp_path / "c").state_dict()
    assert all(torch.equal(v, weights_c[k]) for k, v in model.state_dict().items())
    assert "have their RMSNorm gains x8 and the q/k/v and gate/up weights reading them /8" in \
        (tmp_path / "c" / "MODEL_CARD.md").read_text()
    assert "Outlier features" not in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert first["steps"] == 3 and set(first["test"]) == {*scenes.TASKS, "mean"}
    assert "--align-weight 1" in first["command"]
    from atv_prune.builtin.train import CHECKPOINT_FILES

    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([*CHECKPOINT_FILES, "data"])
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "alignment loss weight 1.0" in card
    assert not first["stopped_by_minutes"] and "stopped by" not in card
    assert f"image_layout={scenes.DEFAULT_IMAGE_POSITION!r})" in card
    assert "pretrained 2 steps on text-only questions (option=1, relate=1;" in card
    assert "Every batch of the image mix also holds 2 text-only questions (option=1, relate=1)." in card
    assert set(first["text_curve"][-1]) >= {"option", "relate"}
    out = capsys.readouterr().out
    assert out.count("note: CPU kernels not pinned, so these weights are reproducible on this CPU type only") == 3
    assert first["kernels"]["MKL_CBWR"] is None and first["command"].startswith("python -m atv_prune.builtin.train")
    log = [line for line in out.splitlines() if line.startswith("step 3 ")]
    assert len(log) == 3 and all(" answer loss " in line and " align loss " in line for line in log)
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    AutoProcessor.from_pretrained(tmp_path / "a")


def test_trainer_adds_the_text_questions_to_every_mix_batch(tmp_path: Path, monkeypatch) -> None:
    """``--text-per-batch K``: each of the mix's batches holds ``--batch-size`` conversations of the
    training file plus K fresh text-only questions of ``--text-tasks``."""
    from atv_prune.builtin import train

    batches: list[list[dict]] = []
    original = train.Encoder.batch
    monkeypatch.setattr(train.Encoder, "batch", lambda self, records: batches.append(records) or original(self, records))
    argv = list(TINY_TRAINING)
    argv[argv.index("--text-steps") + 1] = "0"
    threads = torch.get_num_threads()
    try:
        train.main(["--out", str(tmp_path / "run"), *argv])
    finally:
        torch.set_num_threads(threads)
    assert len(batches) == 3
    for records in batches:
        assert len(records) == 6 and all("id" in r for r in records[:4])
        assert all(r["scene"] is None and r["task"] in ("option", "relate") for r in records[4:])


def test_trainer_stopped_by_minutes_says_so(tmp_path: Path, capsys) -> None:
    """``--minutes`` stops the loop once pretraining and steps exceed it; training.json and the card say
    where, since the cosine schedule was cut short."""
    from atv_prune.builtin import train

    threads = torch.get_num_threads()
    try:
        results = train.main(["--out", str(tmp_path / "run"), *TINY_TRAINING, "--minutes", "0.000001"])
    finally:
        torch.set_num_threads(threads)
    assert results["steps"] == 0 and results["stopped_by_minutes"]
    assert json.loads((tmp_path / "run" / "training.json").read_text())["stopped_by_minutes"] is True
    assert "stopping at step 0: --minutes 1e-06 reached" in capsys.readouterr().out
    assert "stopped by `--minutes 1e-06` at step 0 of 3, before the schedule's end" in \
        (tmp_path / "run" / "MODEL_CARD.md").read_text()


def test_trainer_failing_at_save_leaves_no_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint files appear together, after the rest: a failure while saving leaves only the data."""
    from atv_prune.builtin import train

    def broken_card(*_args, **_kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(train, "write_card", broken_card)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(OSError, match="disk full"):
            train.main(["--out", str(tmp_path / "run"), *TINY_TRAINING])
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]


def test_write_files_into_replaces_a_checkpoint_marker_last(tmp_path: Path) -> None:
    """Over an earlier checkpoint: new files replace old ones (folders too), other files stay, the
    marker is gone while files move and after a failure, and nothing is staged behind."""
    from atv_prune.errors import AtvPruneError
    from atv_prune.runs.export import write_files_into

    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "weights").write_text("old")
    (out / "training.json").write_text("old")
    (out / "sub").mkdir()
    (out / "sub" / "stale").write_text("old")
    seen_marker = []

    def fill(folder: Path) -> None:
        (folder / "weights").write_text("new")
        (folder / "training.json").write_text("new")
        (folder / "sub").mkdir()
        (folder / "sub" / "fresh").write_text("new")

    real_replace = os.replace

    def watching_replace(src, dst):
        seen_marker.append((Path(dst).name, (out / "training.json").exists()))
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", watching_replace)
        write_files_into(out, fill, last="training.json")
    assert [marker for name, marker in seen_marker if name != "training.json"] == [False, False]
    assert seen_marker[-1] == ("training.json", False)
    assert (out / "weights").read_text() == "new" and (out / "training.json").read_text() == "new"
    assert sorted(p.name for p in (out / "sub").iterdir()) == ["fresh"]
    assert sorted(p.name for p in out.iterdir()) == ["data", "sub", "training.json", "weights"]

    def clashing(folder: Path) -> None:
        (folder / "data").write_text("a file where the data folder is")
        (folder / "training.json").write_text("newer")

    with pytest.raises(AtvPruneError, match="already holds data as a folder where a file goes"):
        write_files_into(out, clashing, last="training.json")
    assert (out / "training.json").read_text() == "new" and (out / "data").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["data", "sub", "training.json", "weights"]


@pytest.mark.parametrize("argv, message", [
    (["--task-weights", "exsit=2"], "unknown task 'exsit' in --task-weights"),
    (["--task-weights", "exist"], "needs task=number pairs, got 'exist'"),
    (["--task-weights", "exist=-1"], "task weight must be >= 0"),
    (["--align-weight", "-0.5"], "--align-weight must be >= 0"),
    (["--align-positions"], "--align-positions extends the alignment loss"),
    (["--align-tokens"], "--align-tokens extends the alignment loss"),
    (["--align-foreground"], "--align-foreground extends the alignment loss"),
    (["--align-weight", "1", "--align-foreground"], "--align-foreground labels single tokens: give it with --align-tokens"),
    (["--text-steps", "-1"], "--text-steps must be >= 0"),
    (["--text-per-batch", "-2"], "--text-per-batch must be >= 0"),
    (["--text-steps", "1", "--text-tasks", "exist=1"],
     "unknown task 'exist' in --text-tasks: use one of option, relate, textonly"),
    (["--text-per-batch", "1", "--text-tasks", "option=0"], "--text-tasks needs at least one task with a positive weight"),
    (["--text-steps", "1", "--text-tasks", ""], "--text-tasks needs at least one task with a positive weight"),
    (["--text-steps", "1", "--text-tasks", "option=x"], "--text-tasks needs task=number pairs, got 'option=x'"),
    (["--text-steps", "1", "--text-tasks", "option=-1"], "--text-tasks: a task weight must be >= 0"),
    (["--outlier-channels", "-1"], "--outlier-channels must be in [0, --text-hidden 256], got -1"),
    (["--outlier-channels", "300"], "--outlier-channels must be in [0, --text-hidden 256], got 300"),
    (["--outlier-channels", "4", "--outlier-scale", "10"], "--outlier-scale: outlier scale must be a power of two"),
    (["--text-tasks", "option=1"], "--text-tasks mixes the text-only questions: give it with --text-steps or"),
])
def test_trainer_rejects_bad_options_before_writing(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    from atv_prune.builtin.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_data_of_another_image_layout_before_writing(bench: Path, tmp_path: Path, capsys) -> None:
    from atv_prune.builtin.train import main

    layout = json.loads((bench / "manifest.json").read_text())["image_layout"]
    other = "after" if layout == "before" else "before"
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "run"), "--data", str(bench), "--image-position", other])
    assert exit_info.value.code == 2
    assert f"{bench} puts the image {layout} each question but --image-position is {other}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_shipped_benchmark_has_the_shipped_models_image_layout() -> None:
    """The shipped test split places images as the shipped model was trained to read them."""
    from atv_prune.builtin import BENCHMARK_DIR
    from atv_prune.builtin.train import data_image_layout

    record = json.loads((CHECKPOINT_DIR / "training.json").read_text())
    layout = data_image_layout(record["data"])
    assert json.loads((BENCHMARK_DIR / "manifest.json").read_text())["image_layout"] == layout
    for task in scenes.TASKS:
        images = [i for i in scenes.read_jsonl(BENCHMARK_DIR / "test" / f"{task}.jsonl") if i["image"]]
        assert all(i["image_position"] == layout for i in images), task


def test_trainer_refuses_a_folder_in_the_way_of_a_checkpoint_file_before_training(tmp_path: Path, capsys) -> None:
    from atv_prune.builtin.train import main

    (tmp_path / "run" / "config.json").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "run"), *TINY_TRAINING])
    assert exit_info.value.code == 2
    assert "holds config.json as a folder where the checkpoint writes a file" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]


def test_task_weight_overrides_keep_their_order() -> None:
    from atv_prune.builtin.train import task_weights

    weights = task_weights("exist=2,locate=1.5,describe=1")
    assert list(weights)[-2:] == ["locate", "describe"] and weights["exist"] == 2.0
    assert list(task_weights("describe=1,locate=1"))[-2:] == ["describe", "locate"]


def test_recorded_command_puts_the_pinned_kernel_variables_first(monkeypatch) -> None:
    """training.json's command reproduces the run: the kernel pins that were set lead it, quoted arguments follow."""
    from atv_prune.builtin.train import PINNED_KERNELS, command_line, kernel_settings

    for name, value in PINNED_KERNELS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MKL_CBWR")
    kernels = kernel_settings()
    assert kernels["MKL_CBWR"] is None and kernels["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert command_line(["--out", "OUT", "--task-weights", "a=1 b"], kernels) == (
        "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m atv_prune.builtin.train "
        "--out OUT --task-weights 'a=1 b'")


def test_token_cells_maps_every_patch_token_to_its_grid_cell() -> None:
    from atv_prune.builtin.train import token_cells

    assert token_cells(9).tolist() == list(range(9))  # one token per cell: the cells themselves
    cells = token_cells(144).reshape(12, 12)  # generation 2 with patch 12: 4 x 4 tokens per cell
    assert cells[0, :4].tolist() == [0] * 4 and cells[3, 4].item() == 1 and cells[11, 11].item() == 8
    assert [int((cells == c).sum()) for c in range(9)] == [16] * 9
