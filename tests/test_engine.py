"""The layer-wise engine on tiny random models of every supported family."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from atv_prune import Pool, PruneConfig, RunSettings, prune, register_pool
from atv_prune.errors import CalibrationError, NumericalError
from atv_prune.model.calibration import CalibrationSample, CalibrationSet
from atv_prune.model.capture import capture_sample, non_block_modules_on, run_block
from atv_prune.model.layout import resolve
from atv_prune.model.walk import ResidentBlocks
from tiny_models import FAMILY_NAMES, assert_replay_matches_forward, build_tiny_model, make_inputs

N_SAMPLES = 4
QUIET = RunSettings(progress=False)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build_tiny_model(request.param, seed=0)


def _calibration(model: nn.Module, name: str, n: int = N_SAMPLES, with_image: bool = True) -> CalibrationSet:
    samples = [CalibrationSample(make_inputs(model, name, seed=i, n_text=10 + 3 * i, with_image=with_image),
                                 f"tiny:{i}") for i in range(n)]
    return CalibrationSet(samples, "in-memory", n, 0)


def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    blocks = resolve(model).blocks(model)
    return {f"{i}.{name}": m.weight.detach().clone()
            for i, block in enumerate(blocks) for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _pruned(model: nn.Module, calibration: CalibrationSet | None, **config) -> tuple[nn.Module, object]:
    copy_ = copy.deepcopy(model)
    report = prune(copy_, None, calibration, PruneConfig(**config), settings=QUIET)
    return copy_, report


@torch.no_grad()
def test_replay_equals_the_models_own_hidden_states(family_model: tuple[str, nn.Module]) -> None:
    name, model = family_model
    layout = resolve(model)
    for with_image in (True, False):
        inputs = layout.prepare_inputs(make_inputs(model, name, seed=3, with_image=with_image))
        sample = assert_replay_matches_forward(model, inputs, f"{name} image={with_image}")
        assert bool(sample.visual.any()) == with_image


@pytest.mark.parametrize("method,target", [("wanda", {"sparsity": 0.5}), ("atv", {"sparsity": 0.6}),
                                           ("atv", {"sparsity": None, "pattern": (2, 4)}),
                                           ("magnitude", {"sparsity": None, "pattern": (4, 8)})])
def test_exact_sparsity_and_untouched_modules(family_model, method: str, target: dict) -> None:
    name, model = family_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = _calibration(model, name) if method != "magnitude" else None
    pruned, report = _pruned(model, calibration, method=method, **target)
    linear_names = set()
    for block_index, block in enumerate(resolve(pruned).blocks(pruned)):
        for lname, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            linear_names.add(f"{block_index}.{lname}")
            zeros = module.weight == 0
            if target.get("pattern"):
                n, m = target["pattern"]
                assert (zeros.reshape(zeros.shape[0], -1, m).sum(-1) == n).all()
            else:
                assert (zeros.sum(1) == int(target["sparsity"] * module.in_features)).all()
    assert len(report.sparsity["per_linear"]) == len(linear_names) > 0
    block_prefix = resolve(model).block_path + "."
    for key, value in pruned.state_dict().items():
        if not key.startswith(block_prefix):
            assert torch.equal(value, before[key]), f"{key} changed outside the decoder blocks"


def _reference_block0_stats(model: nn.Module, calibration: CalibrationSet, pool: str,
                            alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Plain Wanda statistics of block 0 from the model's own forward (no engine code); for ``atv``,
    METHOD.md's pool: all text tokens plus, per sample, the K_j visual tokens of largest drift."""
    layout = resolve(model)
    block0 = layout.blocks(model)[0]
    current: dict[str, torch.Tensor] = {}
    per_sample = []

    def keep(name):
        return lambda m, args: current.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]).double())

    hooks = [mod.register_forward_pre_hook(keep(n)) for n, mod in block0.named_modules() if isinstance(mod, nn.Linear)]
    block_io = []
    hooks.append(block0.register_forward_hook(lambda m, args, kwargs, out: block_io.append((args[0][0], out[0])),
                                              with_kwargs=True))
    with torch.no_grad():
        for sample in calibration.samples:
            inputs = layout.prepare_inputs(sample.inputs)
            current.clear()
            block_io.clear()
            model(**inputs, use_cache=False)
            visual = torch.isin(inputs["input_ids"][0], torch.tensor(layout.visual_token_ids))
            h_in, h_out = block_io[0]
            drift = 1 - torch.nn.functional.cosine_similarity(h_in[visual].double(), h_out[visual].double(), dim=-1)
            per_sample.append((dict(current), visual, drift))
    for hook in hooks:
        hook.remove()
    mean_drift = float(torch.cat([d for _, _, d in per_sample]).mean())
    sums: dict[str, torch.Tensor] = {}
    for inputs, visual, drift in per_sample:
        if pool == "atv":
            n_text, n_vis = int((~visual).sum()), int(visual.sum())
            k = min(n_vis, round(min(1.0, alpha * mean_drift) * n_text))
            top = visual.nonzero().squeeze(1)[torch.argsort(drift, descending=True, stable=True)[:k]]
            keep_rows = ~visual
            keep_rows[top] = True
        else:
            keep_rows = {"mixed": torch.ones_like(visual), "text": ~visual, "visual": visual}[pool]
        for n, rows in inputs.items():
            sums[n] = sums.get(n, 0) + (rows[keep_rows] ** 2).sum(0)
    return {n: s / len(calibration.samples) for n, s in sums.items()}


@pytest.mark.parametrize("pool", ["mixed", "text", "visual", "atv"])
def test_block0_wanda_masks_equal_a_plain_reference(pool: str) -> None:
    name = "qwen2_vl"
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    stats = _reference_block0_stats(model, calibration, pool, alpha=3.0)
    original = _linear_weights(model)
    method = "atv" if pool == "atv" else "wanda"
    pruned, _ = _pruned(model, calibration, method=method, pool=pool, sparsity=0.5, alpha=3.0)
    block0 = resolve(pruned).blocks(pruned)[0]
    for lname, module in block0.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = original[f"0.{lname}"].double()
        score = weight.abs() * stats[lname].sqrt()
        k = int(0.5 * weight.shape[1])
        threshold = score.sort(dim=1).values[:, k - 1 : k]
        expected_pruned = score <= threshold
        actual_pruned = module.weight == 0
        # ties at the threshold are measure-zero for random weights
        assert torch.equal(actual_pruned, expected_pruned), f"{lname}"


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3"])
def test_atv_with_alpha_zero_equals_the_text_pool(name: str) -> None:
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    blocks = len(resolve(model).blocks(model))
    with pytest.warns(UserWarning, match=f"the atv pool selected no visual tokens for most samples in {blocks} "
                                         f"of {blocks} blocks: there it equals the text pool"):
        atv, report = _pruned(model, calibration, method="atv", alpha=0.0, sparsity=0.5)
    text, _ = _pruned(model, calibration, method="wanda", pool="text", sparsity=0.5)
    assert all(block["visual_tokens_per_sample"] == 0 for block in report.blocks)
    assert all(block["samples_without_visual"] == N_SAMPLES for block in report.blocks)
    assert report.warnings[-1].startswith("the atv pool selected no visual tokens")
    for (key, a), (_, b) in zip(_linear_weights(atv).items(), _linear_weights(text).items()):
        assert torch.equal(a == 0, b == 0), key


def test_atv_differs_from_text_and_reports_drift_and_budget() -> None:
    name = "llava_next"
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    atv, report = _pruned(model, calibration, method="atv", alpha=4.0, sparsity=0.5)
    text, _ = _pruned(model, calibration, method="wanda", pool="text", sparsity=0.5)
    assert any(not torch.equal(a == 0, b == 0) for a, b in zip(_linear_weights(atv).values(),
                                                               _linear_weights(text).values()))
    for block in report.blocks:
        assert 0 < block["mean_drift"] <= 2
        assert 0 < block["visual_tokens_per_sample"] <= block["text_tokens_per_sample"]
    assert report.calibration["samples_used"] == N_SAMPLES


@pytest.mark.parametrize("pool", ["random", "atv"])
def test_same_seed_gives_bit_identical_masks(pool: str) -> None:
    name = "qwen2_5_vl"
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    masks = []
    for seed in (7, 7, 8):
        pruned, _ = _pruned(model, calibration, method="atv", pool=pool, alpha=8.0, sparsity=0.5, seed=seed)
        masks.append([w == 0 for w in _linear_weights(pruned).values()])
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))
    differs = any(not torch.equal(a, b) for a, b in zip(masks[0], masks[2]))
    assert differs == (pool == "random")


def test_samples_without_image_tokens_are_skipped_and_counted() -> None:
    name = "llava"
    model = build_tiny_model(name)
    with_images = _calibration(model, name, n=3)
    without = _calibration(model, name, n=2, with_image=False)
    mixed = CalibrationSet(with_images.samples + without.samples, "in-memory", 5, 0)
    _, report = _pruned(model, mixed, method="atv", sparsity=0.5)
    assert report.calibration["samples_used"] == 3
    assert report.calibration["skipped_without_image_tokens"] == 2
    with pytest.raises(CalibrationError, match="none of the 2 calibration samples contains image or video tokens"):
        _pruned(model, without, method="atv", sparsity=0.5)


def test_non_finite_weights_are_refused() -> None:
    model = build_tiny_model("llava")
    block0 = resolve(model).blocks(model)[0]
    next(m for m in block0.modules() if isinstance(m, nn.Linear)).weight.data[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="non-finite weights"):
        _pruned(model, None, method="magnitude", sparsity=0.5)
    with pytest.raises(NumericalError, match="non-finite"):
        _pruned(model, _calibration(model, "llava"), method="wanda", sparsity=0.5)


def test_unregistered_family_with_the_common_layout_works() -> None:
    model = build_tiny_model("llava")
    model.config.model_type = "my_custom_vlm"
    layout = resolve(model)
    assert layout.family.name == "generic" and layout.block_path == "model.language_model.layers"
    pruned, report = _pruned(model, _calibration(model, "llava"), method="atv", sparsity=0.5)
    assert report.model["family"] == "generic" and report.sparsity["overall"] == 0.5


def test_unsupported_layout_names_the_supported_families() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from atv_prune.errors import UnsupportedModelError

    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="supported families: llava"):
        resolve(text_only)


def test_linears_fed_by_one_tensor_share_one_accumulation() -> None:
    from atv_prune.model.engine import _InputRecorder, linear_targets

    model = build_tiny_model("qwen2_vl")
    layout = resolve(model)
    block = layout.blocks(model)[0]
    recorder = _InputRecorder(linear_targets(block, "b"))
    with non_block_modules_on(model, layout.blocks(model), "cpu"):
        sample = capture_sample(model, layout, make_inputs(model, "qwen2_vl"), "s", "cpu", "cpu")
    recorder.start_sample()
    run_block(block, sample, 0, sample.hidden)
    recorder.remove()
    group = recorder.group_of
    assert group["b.self_attn.q_proj"] == group["b.self_attn.k_proj"] == group["b.self_attn.v_proj"]
    assert group["b.mlp.gate_proj"] == group["b.mlp.up_proj"]
    assert len(set(group.values())) == 4 and len(recorder.inputs) == 4


def test_non_finite_activations_are_refused() -> None:
    name = "llava"
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    block0 = resolve(model).blocks(model)[0]
    block0.mlp.down_proj.bias = nn.Parameter(torch.full((block0.mlp.down_proj.out_features,), float("inf")))
    with pytest.raises(NumericalError, match="non-finite activations at block 0"):
        _pruned(model, calibration, method="wanda", sparsity=0.5)


@pytest.mark.parametrize("pool", ["mixed", "atv"])
def test_sparsegpt_runs_with_any_pool_and_gives_valid_nm_groups(family_model, pool: str) -> None:
    name, model = family_model
    pruned, report = _pruned(model, _calibration(model, name), method="sparsegpt", pool=pool,
                             sparsity=None, pattern=(2, 4))
    for key, weight in _linear_weights(pruned).items():
        assert ((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all(), key
    assert report.config["pool"] == pool


@torch.no_grad()
def test_sparsegpt_reconstructs_block_outputs_better_than_wanda() -> None:
    name = "llava"
    model = build_tiny_model(name)
    calibration = _calibration(model, name, n=6)

    def block0_outputs(candidate: nn.Module) -> list[torch.Tensor]:
        lay = resolve(candidate)
        blocks = lay.blocks(candidate)
        outs = []
        for sample in calibration.samples:
            with non_block_modules_on(candidate, blocks, "cpu"):
                state = capture_sample(candidate, lay, sample.inputs, "s", "cpu", "cpu")
            outs.append(run_block(blocks[0], state, 0, state.hidden))
        return outs

    dense = block0_outputs(model)
    errors = {}
    for method in ("wanda", "sparsegpt"):
        pruned, _ = _pruned(model, calibration, method=method, sparsity=0.5)
        errors[method] = sum(float((a - b).pow(2).sum()) for a, b in zip(block0_outputs(pruned), dense))
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_sparsegpt_factorises_each_input_group_once(monkeypatch) -> None:
    """q/k/v share one input, gate/up another: one Cholesky factor per input group and block."""
    from atv_prune.algorithms import sparsegpt

    calls = []
    original = sparsegpt.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt, "inverse_hessian_factor",
                        lambda h, *a, **k: calls.append(h.shape) or original(h, *a, **k))
    name = "llava"
    model = build_tiny_model(name)
    _, report = _pruned(model, _calibration(model, name), method="sparsegpt", sparsity=0.5)
    n_blocks = len(report.blocks)
    assert len(calls) == 4 * n_blocks  # (q, k, v), o, (gate, up), down
    assert len(report.sparsity["per_linear"]) == 7 * n_blocks


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3"])
@pytest.mark.parametrize("pool", ["random-fixed", "abs", "abs-fixed", "abs-rel", "abs-rel-fixed", "dbs", "dbs-fixed",
                                  "drift-fixed"])
def test_every_visual_subset_pool_prunes_and_reports_its_budget(name: str, pool: str) -> None:
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    pruned, report = _pruned(model, calibration, method="atv", pool=pool, sparsity=0.5, visual_ratio=0.25)
    assert report.sparsity["overall"] == 0.5
    n_visual = [int(torch.isin(s.inputs["input_ids"], torch.tensor(resolve(model).visual_token_ids)).sum())
                for s in calibration.samples]
    for block in report.blocks:
        if pool.endswith("-fixed"):
            assert block["visual_tokens_per_sample"] == sum(round(0.25 * n) for n in n_visual) / len(n_visual)
        else:
            assert 0 <= block["visual_tokens_per_sample"] <= block["text_tokens_per_sample"]


@pytest.mark.parametrize("name", ["llava_onevision", "qwen3_vl"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_amia_pool_runs_through_the_engine(name: str, method: str) -> None:
    model = build_tiny_model(name)
    pruned, report = _pruned(model, _calibration(model, name), method=method, pool="amia", sparsity=None,
                             pattern=(2, 4))
    assert report.config["pool"] == "amia"
    assert all(0 < b["text_tokens_per_sample"] for b in report.blocks)


def test_token_weights_enter_the_statistics() -> None:
    from atv_prune.algorithms import pools
    from atv_prune.algorithms.specs import POOLS

    def text_weighted(view: pools.SampleView) -> pools.PoolChoice:
        everything = pools.mixed_pool(view)
        return pools.PoolChoice(everything.fixed, everything.n_text, everything.n_visual,
                                weights=(~view.visual).float() * 3.0)

    register_pool("text-by-weight", Pool(text_weighted))
    try:
        _token_weights_match_the_text_pool()
    finally:
        POOLS.unregister("text-by-weight")


def _token_weights_match_the_text_pool() -> None:
    name = "qwen2_vl"
    model = build_tiny_model(name)
    calibration = _calibration(model, name)
    weighted, _ = _pruned(model, calibration, method="wanda", pool="text-by-weight", sparsity=0.5)
    text, _ = _pruned(model, calibration, method="wanda", pool="text", sparsity=0.5)
    for (key, a), b in zip(_linear_weights(weighted).items(), _linear_weights(text).values()):
        assert torch.equal(a == 0, b == 0), key


def test_tamp_allocates_sparsity_per_matrix_around_the_target() -> None:
    name = "qwen2_vl"
    model = build_tiny_model(name)
    _, report = _pruned(model, _calibration(model, name), method="tamp", sparsity=0.5)
    per_linear = report.sparsity["per_linear"]
    assert report.config["allocation"] == "das" and report.config["pool"] == "amia"
    assert abs(report.sparsity["overall"] - 0.5) < 0.02  # floor(p * in) per row on 32-64 inputs
    assert all(s <= 0.6 + 1e-9 for s in per_linear.values())
    assert len({round(s, 3) for s in per_linear.values()}) > 2  # not uniform


class _SlowToMove(nn.Linear):
    """A block whose every move between devices takes at least 20 ms."""

    def _apply(self, fn, recurse=True):
        time.sleep(0.02)
        return super()._apply(fn, recurse)


def test_resident_blocks_time_their_moves_into_the_report(monkeypatch) -> None:
    home = ResidentBlocks()
    block = _SlowToMove(4, 4)
    home.enter(0, block, torch.device("cpu"))
    home.leave(0, block, finished=True)
    assert home.seconds["move_blocks"] >= 0.04
    # the engine hands the default home's time to the run's report
    created: list[ResidentBlocks] = []

    class Recorded(ResidentBlocks):
        def __init__(self) -> None:
            super().__init__()
            self.seconds["move_blocks"] = 12.5  # as if every move had taken this long in all
            created.append(self)

        def enter(self, index: int, block: nn.Module, device: torch.device) -> None:
            self._homes[index] = torch.device("cpu")

        def leave(self, index: int, block: nn.Module, finished: bool) -> None:
            self._homes.pop(index)

    monkeypatch.setattr("atv_prune.model.engine.ResidentBlocks", Recorded)
    model = build_tiny_model("llava", seed=0)
    report = prune(model, None, _calibration(model, "llava"), PruneConfig(method="wanda"), settings=QUIET)
    assert len(created) == 1 and report.seconds["move_blocks"] == 12.5
