"""The tiny model zoo: every family builds, runs with and without an image, generates and round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from packaging import version
from torch import nn

from tiny_models import (
    FAMILY_NAMES,
    TEXT_ID_RANGE,
    build_tiny_model,
    make_inputs,
    token_type_input,
    visual_token_ids,
)

#: Decoder-block path, block count and image placeholder count per family.
EXPECTED: dict[str, tuple[str, int, int]] = {
    "llava": ("model.language_model.layers", 2, 16),
    "llava_next": ("model.language_model.layers", 2, 30),
    "llava_onevision": ("model.language_model.layers", 2, 30),
    "qwen2_vl": ("model.language_model.layers", 2, 24),
    "qwen2_5_vl": ("model.language_model.layers", 2, 24),
    "qwen3_vl": ("model.language_model.layers", 3, 24),
    "gemma3": ("model.language_model.layers", 4, 16),
    "idefics3": ("model.text_model.layers", 2, 27),
    "smolvlm": ("model.text_model.layers", 2, 27),
}

Family = tuple[str, transformers.PreTrainedModel]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> Family:
    return request.param, build_tiny_model(request.param)


def _logits(model: transformers.PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _n_image_tokens(model: transformers.PreTrainedModel, inputs: dict[str, torch.Tensor]) -> int:
    return int(torch.isin(inputs["input_ids"], torch.tensor(visual_token_ids(model))).sum())


def test_model_is_tiny_and_of_the_family(family: Family) -> None:
    name, model = family
    assert model.config.model_type == name
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert not model.training and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


@pytest.mark.parametrize("with_image", [True, False])
def test_forward_gives_finite_logits(family: Family, with_image: bool) -> None:
    name, model = family
    inputs = make_inputs(model, name, with_image=with_image)
    logits = _logits(model, inputs)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()


def test_placeholder_count_matches_what_the_forward_consumes(family: Family) -> None:
    name, model = family
    inputs = make_inputs(model, name)
    assert _n_image_tokens(model, inputs) == EXPECTED[name][2] > 0
    _logits(model, inputs)  # the forward raises when placeholders and image features disagree

    if name in ("idefics3", "smolvlm") and version.parse(transformers.__version__) < version.parse("5.23"):
        return  # older releases of these two do not check the placeholder count
    # one placeholder fewer than the image yields: the forward must refuse
    last = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[-1])
    short = dict(inputs)
    for key in ("input_ids", "attention_mask", token_type_input(model)):
        if key is not None:
            short[key] = torch.cat([inputs[key][:, :last], inputs[key][:, last + 1 :]], dim=1)
    with pytest.raises(ValueError):
        _logits(model, short)


def test_text_ids_are_never_special(family: Family) -> None:
    name, model = family
    text_ids = make_inputs(model, name, seed=3, n_text=64, with_image=False)["input_ids"]
    assert ((text_ids >= TEXT_ID_RANGE[0]) & (text_ids < TEXT_ID_RANGE[1])).all()
    assert not torch.isin(text_ids, torch.tensor(visual_token_ids(model))).any()


def test_token_types_mark_the_image_tokens(family: Family) -> None:
    name, model = family
    if token_type_input(model) is None:
        pytest.skip("this family's forward takes no token-type input")
    inputs = make_inputs(model, name)
    types = inputs[token_type_input(model)]
    assert torch.equal(types == 1, inputs["input_ids"] == model.config.image_token_id)
    assert set(types.unique().tolist()) == {0, 1}


def test_image_changes_the_logits(family: Family) -> None:
    name, model = family
    inputs = make_inputs(model, name)
    other = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    assert not torch.allclose(_logits(model, inputs)[0, -1], _logits(model, other)[0, -1])


def test_generate_runs(family: Family) -> None:
    name, model = family
    inputs = make_inputs(model, name)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_save_and_reload_gives_identical_logits(family: Family, tmp_path: Path) -> None:
    name, model = family
    inputs = make_inputs(model, name)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(model, inputs), _logits(reloaded, inputs))


def test_decoder_blocks_sit_at_the_expected_path(family: Family) -> None:
    name, model = family
    path, n_blocks, _ = EXPECTED[name]
    blocks = model.get_submodule(path)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == n_blocks


def test_gemma3_alternates_sliding_and_full_attention() -> None:
    model = build_tiny_model("gemma3")
    text = model.config.text_config
    assert {"sliding_attention", "full_attention"} <= set(text.layer_types)
    assert text.sliding_window < make_inputs(model, "gemma3")["input_ids"].shape[1]


def test_qwen3_vl_has_deepstack() -> None:
    model = build_tiny_model("qwen3_vl")
    assert len(model.config.vision_config.deepstack_visual_indexes) > 0
    assert len(model.model.visual.deepstack_merger_list) > 0
