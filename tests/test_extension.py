"""Extending the registries from outside the package: a family, a pool and a method, each one
registration, then used by the Python API, the probe and the command line like built-in ones."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from click.testing import CliRunner
from torch import nn

from atv_prune import (
    CalibrationSample,
    CalibrationSet,
    Family,
    Method,
    Pool,
    PruneConfig,
    RunSettings,
    prune,
    register_family,
    register_method,
    register_pool,
)
from atv_prune.algorithms.pools import PoolChoice, SampleView, text_pool
from atv_prune.algorithms.specs import METHODS, POOLS
from atv_prune.cli import main as atv_main
from atv_prune.model.families import FAMILIES
from atv_prune.model.layout import resolve
from motprobe import make_probe, probe_linears
from tiny_models import build_tiny_model, make_inputs

QUIET = RunSettings(progress=False)


def _calibration(model: nn.Module, name: str, n: int = 3) -> CalibrationSet:
    samples = [CalibrationSample(make_inputs(model, name, seed=i, n_text=12 + i), f"tiny:{i}") for i in range(n)]
    return CalibrationSet(samples, "in-memory", n, 0)


def _decoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    layout = resolve(model)
    return {f"{i}.{n}": m.weight.detach() for i, block in enumerate(layout.blocks(model))
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


# --- a pool ----------------------------------------------------------------------------------


def _last_text_tokens(view: SampleView) -> PoolChoice:
    """Text tokens, plus the visual tokens ranked by their input norm (an adaptive budget)."""
    choice = text_pool(view)
    norms = view.hidden_in[view.visual].float().norm(dim=-1)
    ranked = view.visual.nonzero().squeeze(1)[torch.argsort(norms, descending=True, stable=True)]
    return PoolChoice(choice.fixed, choice.n_text, choice.n_visual, ranked=ranked,
                      saliency_sum=0.5 * choice.n_visual)  # block mean 0.5: half the text length


@pytest.fixture
def norm_pools():
    register_pool("norm", Pool(_last_text_tokens, "adaptive", saliency="norm", summary="by input norm"))
    register_pool("norm-fixed", Pool(_last_text_tokens, "fixed", saliency="norm"))
    yield
    POOLS.unregister("norm")
    POOLS.unregister("norm-fixed")


def test_a_registered_pool_prunes_and_appears_on_the_command_line(norm_pools) -> None:
    model = build_tiny_model("llava")
    calibration = _calibration(model, "llava")
    pruned = copy.deepcopy(model)
    report = prune(pruned, None, calibration, PruneConfig(method="atv", pool="norm"), settings=QUIET)
    assert report.config["pool"] == "norm" and report.sparsity["overall"] == pytest.approx(0.5)
    assert all(block["visual_tokens_per_sample"] > 0 for block in report.blocks)
    help_text = CliRunner().invoke(atv_main, ["prune", "--help"]).output
    assert "norm-fixed" in help_text
    sweep = CliRunner().invoke(atv_main, ["sweep", "--help"]).output
    assert "norm" in sweep.split("--saliency", 1)[1].split("\n")[0]


def test_an_unregistered_pool_is_refused_by_name() -> None:
    with pytest.raises(Exception, match="unknown pool 'norm'"):
        PruneConfig(method="wanda", pool="norm")


# --- a method --------------------------------------------------------------------------------


class AbsoluteInputs:
    """An L1 variant of Wanda's statistic: mean over samples of sum |x| per input feature."""

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.total = torch.zeros(features, device=device)

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self.total += rows.float().abs().sum(0)

    def finish(self, samples: int) -> torch.Tensor:
        return self.total / samples


def _l1_prune(weight: torch.Tensor, statistic: torch.Tensor, sparsity: float | None, pattern) -> torch.Tensor:
    scores = weight.abs().float() * statistic.unsqueeze(0)
    count = int(sparsity * weight.shape[1])
    lowest = torch.sort(scores, dim=1, stable=True).indices[:, :count]
    return weight.scatter(1, lowest, 0.0)


@pytest.fixture
def l1_method():
    register_method("l1", Method(_l1_prune, "mixed", AbsoluteInputs, summary="|W| * mean |x|"))
    yield
    METHODS.unregister("l1")


def test_a_registered_method_equals_a_plain_reference(l1_method) -> None:
    name = "llava"
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    pruned = copy.deepcopy(model)
    prune(pruned, None, calibration, PruneConfig(method="l1", sparsity=0.5), settings=QUIET)
    # Reference: the same statistic gathered block by block from the model's own forward, blocks
    # before the current one already pruned (the reference re-runs the whole model each time).
    reference = copy.deepcopy(model)
    layout = resolve(reference)
    for block in layout.blocks(reference):
        sums: dict[nn.Module, torch.Tensor] = {}

        def add(module: nn.Module, args: tuple, sums: dict = sums) -> None:
            sums[module] = sums.get(module, 0) + args[0].reshape(-1, args[0].shape[-1]).abs().sum(0)

        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        hooks = [m.register_forward_pre_hook(add) for m in linears]
        with torch.no_grad():
            for sample in calibration.samples:
                reference(**layout.prepare_inputs(sample.inputs), use_cache=False)
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for linear in linears:
                linear.weight.copy_(_l1_prune(linear.weight, sums[linear] / len(calibration.samples), 0.5, None))
    for (key, ours), theirs in zip(_decoder_weights(pruned).items(), _decoder_weights(reference).values()):
        assert torch.equal(ours == 0, theirs == 0), key
    assert "l1" in CliRunner().invoke(atv_main, ["prune", "--help"]).output


# --- a family --------------------------------------------------------------------------------


class WrappedVLM(nn.Module):
    """A model of an unknown type that keeps a LLaVA one level deeper (blocks at a path no family lists)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = copy.deepcopy(inner.config)
        self.config.model_type = "wrapped_vlm"

    def forward(self, **inputs):
        return self.inner(**inputs)


@pytest.fixture
def wrapped_family():
    family = register_family(Family("wrapped", ("wrapped_vlm",), block_paths=("inner.model.language_model.layers",),
                                    base_model_path="inner.model"))
    yield family
    FAMILIES.unregister("wrapped")


def test_an_unknown_layout_is_refused_until_its_family_is_registered() -> None:
    with pytest.raises(Exception, match="not supported"):
        resolve(WrappedVLM(build_tiny_model("llava")))


def test_a_registered_family_prunes_like_the_model_it_wraps(wrapped_family) -> None:
    plain = build_tiny_model("llava")
    wrapped = WrappedVLM(copy.deepcopy(plain))
    assert resolve(wrapped).family is wrapped_family
    calibration = _calibration(plain, "llava")
    config = PruneConfig(method="atv", sparsity=0.5)
    prune(plain, None, calibration, config, settings=QUIET)
    report = prune(wrapped, None, calibration, config, settings=QUIET)
    assert report.model["family"] == "wrapped"
    for (key, a), b in zip(_decoder_weights(wrapped).items(), _decoder_weights(plain).values()):
        assert torch.equal(a, b), key
    families = CliRunner().invoke(atv_main, ["families"]).output
    assert "wrapped" in families and "wrapped_vlm" in families


def test_a_model_type_already_taken_is_refused() -> None:
    with pytest.raises(ValueError, match="belongs to family 'llava'"):
        register_family(Family("llava-again", ("llava",)))


def test_the_probe_routes_fused_linears_by_their_roles() -> None:
    """A decoder with fused qkv_proj and gate_up_proj (Phi-3 style): the family's linear roles make
    the probe route them whole, and the probe still equals the model."""
    config = transformers.LlavaConfig(
        text_config=dict(model_type="phi3", vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32,
                           hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_token_index=250, image_seq_length=16)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    inputs = make_inputs(model, "llava", seed=1)
    with torch.no_grad():
        expected = model(**inputs).logits
    make_probe(model)
    routed = sorted({name.rpartition(".")[2] for name in probe_linears(model)})
    assert routed == ["down_proj", "gate_up_proj", "qkv_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-5)
