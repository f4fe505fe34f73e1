"""The MoT probe: surgery (routing, storage sharing, generate) and pathway pruning through atv_prune's
engine, on tiny random models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from atv_prune import PruneConfig, prune
from atv_prune.model.calibration import CalibrationSample, CalibrationSet
from atv_prune.model.capture import current_visual_mask, visual_mask_context
from atv_prune.model.layout import resolve
from motprobe import ModalityRoutedLinear, ProbeError, make_probe, probe_linears, prune_pathway
from tiny_models import FAMILY_NAMES, build_tiny_model, make_inputs

ROUTED = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}


def _inputs(model: nn.Module, name: str, with_image: bool = True, seed: int = 3) -> dict[str, torch.Tensor]:
    return resolve(model).prepare_inputs(make_inputs(model, name, seed=seed, with_image=with_image))


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


def _calibration(model: nn.Module, name: str, n: int = 3) -> CalibrationSet:
    samples = [CalibrationSample(make_inputs(model, name, seed=i, n_text=10 + 3 * i), f"tiny:{i}")
               for i in range(n)]
    return CalibrationSet(samples, "in-memory", n, 0)


def _config(**kwargs) -> PruneConfig:
    return PruneConfig(**{"sparsity": 0.5, **kwargs})


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain ``nn.Linear`` of the decoder blocks (a probe's copies included), by path."""
    prefix = resolve(model).block_path
    return {name: m for name, m in model.named_modules() if name.startswith(prefix) and type(m) is nn.Linear}


# --- surgery ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_unpruned_probe_equals_the_original_model(name: str) -> None:
    model = build_tiny_model(name)
    probe = copy.deepcopy(model)
    make_probe(probe)
    assert {n.rpartition(".")[2] for n in probe_linears(probe)} == ROUTED
    for with_image in (True, False):
        inputs = _inputs(model, name, with_image)
        assert (_logits(probe, inputs) - _logits(model, inputs)).abs().max().item() <= 1e-5
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(probe.generate(**inputs, max_new_tokens=4, do_sample=False), expected)


@pytest.mark.parametrize("name", ["llava", "qwen3_vl", "gemma3"])
def test_generate_steps_route_by_their_own_tokens(name: str) -> None:
    probe = build_tiny_model(name)
    make_probe(probe)
    inputs = _inputs(probe, name)
    seen: list[torch.Tensor] = []
    q_proj = next(m for n, m in probe_linears(probe).items() if n.endswith("0.self_attn.q_proj"))
    q_proj.register_forward_pre_hook(lambda m, args: seen.append(current_visual_mask().clone()))
    probe.generate(**inputs, max_new_tokens=4, do_sample=False)
    prefill, *steps = seen
    assert torch.equal(prefill, resolve(probe).visual_mask(inputs["input_ids"]))
    assert len(steps) == 3 and all(s.shape == (1, 1) and not s.any() for s in steps)
    assert current_visual_mask() is None


@pytest.mark.parametrize("include_o_proj", [False, True])
def test_copies_share_the_original_weights_until_pruned(include_o_proj: bool) -> None:
    model = build_tiny_model("qwen2_vl")
    n_params = sum(p.numel() for p in model.parameters())
    originals = {name: m.weight for name, m in _block_linears(model).items()}
    handle = make_probe(model, include_o_proj=include_o_proj)
    routed = probe_linears(model)
    assert len(routed) == len(originals) // 7 * (7 if include_o_proj else 6)
    for name, module in routed.items():
        assert module.text.weight is module.visual.weight is originals[name]
        assert module.text.bias is module.visual.bias
        assert module.text.weight.data_ptr() == module.visual.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == n_params
    state = model.state_dict()
    assert all(f"{name}.{pathway}.weight" in state for name in routed for pathway in ("text", "visual"))
    model.to(torch.float64)  # moving or casting keeps the copies shared
    assert all(m.shares_weights and m.text.weight.dtype == torch.float64 for m in routed.values())
    model.to(torch.float32)
    some = next(iter(routed.values()))
    text = some.materialise("text")
    assert text is some.text.weight and text is not some.visual.weight
    assert text.data_ptr() != some.visual.weight.data_ptr() and torch.equal(text, some.visual.weight)
    assert some.materialise("text") is text  # already its own: no second clone
    with pytest.raises(ProbeError, match="cannot be restored"):
        handle.restore()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_routing_sends_each_modality_to_its_copy(name: str) -> None:
    model = build_tiny_model(name)
    make_probe(model)
    image, text_only = _inputs(model, name), _inputs(model, name, with_image=False)
    base_image, base_text = _logits(model, image), _logits(model, text_only)
    first_visual = int(resolve(model).visual_mask(image["input_ids"][0]).nonzero()[0])
    block = resolve(model).blocks(model)[0]
    for pathway in ("visual", "text"):
        perturbed = copy.deepcopy(model)
        for module in resolve(perturbed).blocks(perturbed)[0].modules():
            if isinstance(module, ModalityRoutedLinear):
                module.materialise(pathway).data.add_(torch.randn_like(module.text.weight))
        changed_image, changed_text = _logits(perturbed, image), _logits(perturbed, text_only)
        assert not torch.allclose(changed_image[0, first_visual:], base_image[0, first_visual:], atol=1e-3)
        if pathway == "visual":  # text tokens never see the visual copies
            assert torch.equal(changed_text, base_text)
            assert torch.equal(changed_image[0, :first_visual], base_image[0, :first_visual])
        else:
            assert not torch.allclose(changed_text, base_text, atol=1e-3)
    assert all(m.shares_weights for m in block.modules() if isinstance(m, ModalityRoutedLinear))


def test_routed_linear_needs_a_mask_of_the_tokens_it_sees() -> None:
    model = build_tiny_model("llava")
    handle = make_probe(model)
    routed = next(iter(probe_linears(model).values()))
    x = torch.randn(2, 5, routed.in_features)
    with pytest.raises(ProbeError, match="needs the visual-token mask"):
        routed(x)
    with visual_mask_context(torch.zeros(2, 4, dtype=torch.bool)):
        with pytest.raises(ProbeError, match="covers 8 tokens but this linear sees 10"):
            routed(x)
    routed.materialise("visual").data.mul_(-1.0)
    mask = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    with torch.no_grad(), visual_mask_context(mask):
        out = routed(x)
        expected = torch.where(mask.unsqueeze(-1), routed.visual(x), routed.text(x))
    assert torch.allclose(out, expected, atol=1e-6) and not torch.allclose(out, routed.text(x))
    broken = {**_inputs(model, "llava", with_image=False), "pixel_values": torch.randn(1, 3, 32, 32)}
    with pytest.raises(ValueError):  # a forward that fails still clears the mask its hook set
        _logits(model, broken)
    assert current_visual_mask() is None
    handle.remove()
    with pytest.raises(ProbeError, match="needs the visual-token mask"):
        _logits(model, _inputs(model, "llava"))
    with pytest.raises(ProbeError, match="already a MoT probe"):
        make_probe(model)


def test_restore_puts_the_original_linears_back() -> None:
    model = build_tiny_model("gemma3")
    inputs = _inputs(model, "gemma3")
    expected = _logits(model, inputs)
    originals = _block_linears(model)
    handle = make_probe(model, include_o_proj=True)
    handle.restore()
    assert not probe_linears(model)
    assert all(model.get_submodule(name) is module for name, module in originals.items())
    assert torch.equal(_logits(model, inputs), expected)


# --- pathway pruning ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_text_pathway_pruning_leaves_the_visual_copies_and_o_proj_dense(name: str) -> None:
    model = build_tiny_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_probe(model)
    config = _config(method="wanda", pool="text")
    report = prune_pathway(model, None, _calibration(model, name), config, "text")
    prefix = resolve(model).block_path
    for path, module in probe_linears(model).items():
        zeros = module.text.weight == 0
        assert (zeros.sum(1) == module.in_features // 2).all(), path
        assert torch.equal(module.visual.weight, before[f"{path}.weight"]), path
        if module.text.bias is not None:
            assert module.text.bias is module.visual.bias
    for key, value in model.state_dict().items():
        if ".text." not in key and ".visual." not in key:
            assert torch.equal(value, before[key]), key  # o_proj, norms, vision tower, embeddings, head
    assert report.sparsity["overall"] == 0.5 and report.extra["probe"]["pathway"] == "text"
    assert set(report.sparsity["per_linear"]) == {f"{p}.text" for p in probe_linears(model)}
    assert all(p.startswith(prefix) for p in report.sparsity["per_linear"])


def _pathway_and_plain_weights(name: str, pathway: str, config: PruneConfig) -> list[tuple[int, bool]]:
    """(block index, whether the probe's pathway weight equals the plain model's) per routed linear."""
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    plain = copy.deepcopy(model)
    prune(plain, None, calibration, config)
    make_probe(model, include_o_proj=True)
    prune_pathway(model, None, calibration, config, pathway)
    plain_modules = dict(plain.named_modules())
    prefix = resolve(model).block_path + "."
    return [(int(path.removeprefix(prefix).split(".")[0]),
             torch.equal(module.copy(pathway).weight, plain_modules[path].weight))
            for path, module in probe_linears(model).items()]


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("pathway,config", [
    pytest.param("text", dict(method="wanda", pool="text"), id="text-wanda-text"),
    pytest.param("visual", dict(method="wanda", pool="visual"), id="visual-wanda-visual"),
    pytest.param("text", dict(method="atv", alpha=4.0), id="text-atv"),
    pytest.param("visual", dict(method="sparsegpt", pool="mixed"), id="visual-sparsegpt-mixed"),
    pytest.param("text", dict(method="atv", pool="abs", alpha=4.0), id="text-atv-abs"),
])
def test_first_block_weights_equal_the_plain_models(name: str, pathway: str, config: dict) -> None:
    """Block 0 sees the same inputs as in the plain model, so its pruned weights must match exactly.
    Deeper blocks must not: their inputs come through a network whose other pathway stayed dense
    (were the replay to ignore the routing, they would match the plain model's)."""
    compared = _pathway_and_plain_weights(name, pathway, _config(**config))
    first = [equal for block, equal in compared if block == 0]
    assert len(first) == 7 and all(first)
    assert not all(equal for block, equal in compared if block > 0)


@pytest.mark.parametrize("pathway", ["text", "visual"])
def test_magnitude_masks_equal_the_plain_models_in_every_block(pathway: str) -> None:
    compared = _pathway_and_plain_weights("qwen3_vl", pathway, _config(method="magnitude", sparsity=None,
                                                                      pattern=(4, 8)))
    assert len(compared) == 3 * 7 and all(equal for _, equal in compared)


@pytest.mark.parametrize("pathway,pattern", [("visual", (2, 4)), ("text", (4, 8))])
def test_nm_patterns_prune_one_pathway(pathway: str, pattern: tuple[int, int]) -> None:
    model = build_tiny_model("llava_onevision")
    make_probe(model)
    prune_pathway(model, None, _calibration(model, "llava_onevision"),
                  _config(method="atv", sparsity=None, pattern=pattern), pathway)
    n, m = pattern
    for module in probe_linears(model).values():
        zeros = module.copy(pathway).weight == 0
        assert (zeros.reshape(zeros.shape[0], -1, m).sum(-1) == n).all()
        other = module.copy("text" if pathway == "visual" else "visual").weight
        assert not (other == 0).any()


def test_same_seed_gives_bit_identical_pathway_masks() -> None:
    name = "qwen2_5_vl"
    base = build_tiny_model(name)
    calibration = _calibration(base, name)
    masks = []
    for seed in (7, 7, 8):
        model = copy.deepcopy(base)
        make_probe(model)
        config = _config(method="atv", pool="random", alpha=8.0, seed=seed)
        prune_pathway(model, None, calibration, config, "text")
        masks.append([m.text.weight == 0 for m in probe_linears(model).values()])
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))
    assert any(not torch.equal(a, b) for a, b in zip(masks[0], masks[2]))


def test_pruning_needs_a_probe_and_a_known_pathway() -> None:
    model = build_tiny_model("llava")
    with pytest.raises(ProbeError, match="make_probe"):
        prune_pathway(model, None, None, _config(method="magnitude"), "text")
    make_probe(model)
    with pytest.raises(ProbeError, match="unknown pathway 'audio'"):
        prune_pathway(model, None, None, _config(method="magnitude"), "audio")
