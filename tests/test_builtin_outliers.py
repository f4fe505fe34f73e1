"""Outlier features of the built-in model: the rescaling is exact, leaves activation-aware masks
unchanged, makes magnitude pruning drop the outlier columns, and ranks channels like a plain reference."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from atv_prune import PruneConfig, prune
from atv_prune.builtin import CHECKPOINT_DIR, scenes
from atv_prune.builtin.outliers import (
    NORM_READERS,
    amplify_outlier_features,
    check_scale,
    largest_channels,
    residual_rms,
)
from atv_prune.builtin.tokenizer import build_processor
from atv_prune.builtin.train import Encoder, ModelShape, add_outlier_features, build_model
from atv_prune.model.calibration import load_calibration
from atv_prune.model.layout import resolve

SHAPE = ModelShape(patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                   text_layers=2, text_heads=2, text_intermediate=64)
CHANNELS = [3, 17, 30]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    scenes.generate_benchmark(out, seed=5, n_train=24, n_val=0, n_test=0, n_calib=8)
    return out


@pytest.fixture(scope="module")
def processor():
    return build_processor(SHAPE.patch_size)


def _model(processor, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(SHAPE, processor).eval()
    with torch.no_grad():  # trained gains are not all 1: make the rescaled gains differ per channel
        for block in resolve(model).blocks(model):
            for norm in NORM_READERS:
                block.get_submodule(norm).weight.uniform_(0.5, 1.5)
    return model


def _decoder_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "language_model.layers" in k}


def test_amplified_model_computes_bit_identical_logits(bench: Path, processor) -> None:
    model = _model(processor)
    encoder = Encoder(processor, SHAPE.patch_size, scenes.DEFAULT_IMAGE_POSITION)
    batch = encoder.batch(scenes.read_jsonl(bench / "train.jsonl")[:8])
    batch.pop("labels")
    with torch.no_grad():
        before = model(**batch).logits
        dense = _decoder_weights(model)
        amplify_outlier_features(model, CHANNELS, 16.0)
        after = model(**batch).logits
    assert torch.equal(before, after)
    weights = _decoder_weights(model)
    for name, value in weights.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            assert torch.equal(value[CHANNELS], 16 * dense[name][CHANNELS])
        elif any(name.endswith(f"{reader}.weight") for readers in NORM_READERS.values() for reader in readers):
            assert torch.equal(value[:, CHANNELS], dense[name][:, CHANNELS] / 16)
        else:  # o_proj, down_proj
            assert torch.equal(value, dense[name]), name
    others = [c for c in range(SHAPE.text_hidden) if c not in CHANNELS]
    assert all(torch.equal(weights[k][..., others], dense[k][..., others]) for k in weights)


@pytest.mark.parametrize("method, same_masks", [("wanda", True), ("atv", True), ("magnitude", False)])
def test_activation_aware_masks_are_invariant_and_magnitude_drops_the_outliers(
        bench: Path, processor, method: str, same_masks: bool) -> None:
    calibration = load_calibration(bench / "calib.json", processor, samples=4)
    config = PruneConfig(method=method, sparsity=0.6)
    plain, amplified = _model(processor), _model(processor)
    amplify_outlier_features(amplified, CHANNELS, 16.0)
    prune(plain, processor, calibration, config)
    prune(amplified, processor, calibration, config)
    masks_plain = {k: v != 0 for k, v in _decoder_weights(plain).items() if v.dim() == 2}
    masks_amplified = {k: v != 0 for k, v in _decoder_weights(amplified).items() if v.dim() == 2}
    assert all(torch.equal(masks_plain[k], masks_amplified[k]) for k in masks_plain) == same_masks
    if not same_masks:  # every weight reading an outlier channel is now among the smallest of its row
        readers = [k for k in masks_amplified
                   if any(k.endswith(f"{r}.weight") for rs in NORM_READERS.values() for r in rs)]
        assert readers and all(not masks_amplified[k][:, CHANNELS].any() for k in readers)


def test_residual_rms_matches_the_hidden_states_reference(bench: Path, processor) -> None:
    model = _model(processor)
    encoder = Encoder(processor, SHAPE.patch_size, scenes.DEFAULT_IMAGE_POSITION)
    records = scenes.read_jsonl(bench / "train.jsonl")[:12]
    batches = [encoder.batch(records[i: i + 5]) for i in range(0, 12, 5)]  # uneven, padded batches
    rms = residual_rms(model, batches)
    squares, count = torch.zeros(SHAPE.text_hidden), 0
    with torch.no_grad():
        for batch in batches:
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
            keep = batch["attention_mask"].bool()
            for hidden in out.hidden_states[: SHAPE.text_layers]:  # the input of each block
                squares += hidden[keep].pow(2).sum(0)
                count += int(keep.sum())
    torch.testing.assert_close(rms, (squares / count).sqrt())
    assert largest_channels(rms, 3) == sorted(rms.topk(3).indices.tolist())


def test_add_outlier_features_records_the_largest_channels(bench: Path, processor) -> None:
    model = _model(processor)
    encoder = Encoder(processor, SHAPE.patch_size, scenes.DEFAULT_IMAGE_POSITION)
    records = scenes.read_jsonl(bench / "train.jsonl")[:8]
    reference = copy.deepcopy(model)
    rms = residual_rms(reference, [encoder.batch(records)])
    record = add_outlier_features(model, encoder, records, 4, 8.0, batch_size=3)
    assert record["channels"] == largest_channels(rms, 4) and record["scale"] == 8.0
    assert record["conversations"] == 8 and len(record["residual_rms"]) == 4
    amplify_outlier_features(reference, record["channels"], 8.0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.5, -2.0])
def test_scale_must_be_a_power_of_two_above_one(scale: float) -> None:
    with pytest.raises(ValueError, match="power of two above 1"):
        check_scale(scale)


@pytest.mark.parametrize("channels", [[3, 32], [-1], [5, 5]])
def test_bad_channels_are_refused_before_any_weight_changes(processor, channels: list[int]) -> None:
    model = _model(processor)
    before = _decoder_weights(model)
    with pytest.raises(ValueError, match=r"outlier channels must be distinct and in \[0, 32\)"):
        amplify_outlier_features(model, channels, 16.0)
    assert all(torch.equal(v, before[k]) for k, v in _decoder_weights(model).items())


def test_residual_rms_refuses_no_tokens(processor) -> None:
    with pytest.raises(ValueError, match="at least one batch with a non-padding token"):
        residual_rms(_model(processor), [])


def test_cannot_pick_more_channels_than_there_are() -> None:
    with pytest.raises(ValueError, match="cannot pick 5 outlier channels of 4"):
        largest_channels(torch.ones(4), 5)
    assert largest_channels(torch.ones(4), 0) == []


@pytest.mark.skipif(not (CHECKPOINT_DIR / "training.json").exists(), reason="no built-in checkpoint trained yet")
def test_shipped_checkpoint_records_its_outlier_features() -> None:
    """The card and training.json name the channels; the shipped gains on them are the large ones."""
    from safetensors.torch import load_file

    record = json.loads((CHECKPOINT_DIR / "training.json").read_text())["outliers"]
    weights = load_file(CHECKPOINT_DIR / "model.safetensors")
    channels = record["channels"]
    for name, gain in weights.items():
        if name.endswith("layernorm.weight") and "language_model" in name:
            others = [c for c in range(gain.numel()) if c not in channels]
            assert gain[channels].abs().min() > 4 * gain[others].abs().max(), name
    assert f"have their RMSNorm gains x{record['scale']:g}" in (CHECKPOINT_DIR / "MODEL_CARD.md").read_text()
