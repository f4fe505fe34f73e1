"""Structured pruning (whole heads and MLP channels) on tiny models of every family: the math against
plain references, the physical shrink against the original model with the same structures masked,
configs that plain ``from_pretrained`` rebuilds, and the refusals."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from torch import nn

from atv_prune import CalibrationSample, CalibrationSet, PruneConfig, RunSettings, prune
from atv_prune.algorithms.structured import (
    InputMoments,
    fluctuation_columns,
    lowest_units,
    mean_shift,
    removal_count,
    unit_scores,
    wanda_columns,
)
from atv_prune.cli import main as atv_main
from atv_prune.errors import ConfigError, UnsupportedModelError
from atv_prune.eval.run import EvalResult
from atv_prune.model.layout import resolve
from atv_prune.model.shrink import DecoderGeometry, decoder_config
from atv_prune.runs.cells import CellRunner
from motprobe import make_probe, prune_pathway
from motprobe.cli import main as motprobe_main
from motprobe.surgery import probe_linears
from tiny_checkpoints import make_llava_workspace
from tiny_models import FAMILY_NAMES, build_tiny_model, make_inputs

QUIET = RunSettings(progress=False)

#: Decoder configs with two key/value groups, so that heads can be removed: grouped-query attention
#: (2 query heads per group) where head_dim is a config field, plain multi-head attention for
#: Qwen2-VL / Qwen2.5-VL, whose attention derives head_dim from hidden_size / heads.
TWO_GROUPS = {name: {"num_attention_heads": 4, "num_key_value_heads": 2} for name in FAMILY_NAMES} | {
    "qwen2_vl": {"num_key_value_heads": 2}, "qwen2_5_vl": {"num_key_value_heads": 2}}
#: Families whose config cannot describe fewer heads (head_dim derived from hidden_size / heads).
HEADS_REFUSED = ("qwen2_vl", "qwen2_5_vl")
#: Families whose decoder config has both bias flags (attention_bias, mlp_bias): FLAP compensates.
BIAS_FLAGS = ("llava", "llava_next", "idefics3", "smolvlm")


def _calibration(model: nn.Module, name: str, n: int = 3) -> CalibrationSet:
    samples = [CalibrationSample(make_inputs(model, name, seed=i, n_text=10 + 3 * i), f"tiny:{i}") for i in range(n)]
    return CalibrationSet(samples, "in-memory", n, 0)


def _parts(block: nn.Module) -> dict[str, nn.Linear]:
    return {name.rpartition(".")[2]: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


# --- the math --------------------------------------------------------------------------------------------


def test_input_moments_equal_mean_and_variance_over_all_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 6, generator=g) * 3 + 5 for n in (4, 7, 1)]
    moments = InputMoments(6, "cpu")
    for chunk in chunks:
        moments.add(chunk)
    stacked = torch.cat(chunks)
    result = moments.finish(len(chunks))
    torch.testing.assert_close(result[0], stacked.mean(0))
    torch.testing.assert_close(result[1], stacked.var(0, unbiased=False))
    weights = torch.rand(stacked.shape[0], generator=g)
    weighted = InputMoments(6, "cpu")
    weighted.add(stacked, weights)
    mean = (weights[:, None] * stacked).sum(0) / weights.sum()
    torch.testing.assert_close(weighted.finish(1)[0], mean)
    torch.testing.assert_close(weighted.finish(1)[1], (weights[:, None] * (stacked - mean) ** 2).sum(0) / weights.sum())


def test_column_scores_and_bias_shift_equal_plain_loops() -> None:
    g = torch.Generator().manual_seed(1)
    weight, squares = torch.randn(5, 8, generator=g), torch.rand(8, generator=g)
    moments = torch.stack([torch.randn(8, generator=g), torch.rand(8, generator=g)])
    for j in range(8):
        assert wanda_columns(weight, squares)[j] == pytest.approx(
            sum(abs(float(weight[i, j])) * math.sqrt(float(squares[j])) for i in range(5)), rel=1e-5)
        assert fluctuation_columns(weight, moments)[j] == pytest.approx(
            float(moments[1, j]) * sum(float(weight[i, j]) ** 2 for i in range(5)), rel=1e-5)
    removed = torch.tensor([1, 4, 6])
    expected = [sum(float(weight[i, j] * moments[0, j]) for j in (1, 4, 6)) for i in range(5)]
    assert mean_shift(weight, moments, removed).tolist() == pytest.approx(expected, rel=1e-5)


def test_removal_is_the_floor_and_ties_go_to_the_lower_index() -> None:
    assert [removal_count(4, r) for r in (0.1, 0.2, 0.25, 0.3, 0.5, 0.99)] == [0, 0, 1, 1, 2, 3]
    assert removal_count(100, 0.29) == 29  # 0.29 * 100 is 28.999... in floating point
    scores = unit_scores(torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, 0.5]), 2)  # units: 2, 2, 1.5
    assert scores.tolist() == [2.0, 2.0, 1.5]
    assert lowest_units(scores, 2).tolist() == [0, 2]


# --- the configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="flap", sparsity=0.5), "removes heads and channels"),
    (dict(method="wanda", structure="both", ratio=0.2), "prunes single weights"),
    (dict(method="flap", structure="both"), "needs both --structure"),
    (dict(method="flap", structure="rows", ratio=0.2), "unknown structure 'rows'"),
    (dict(method="flap", structure="both", ratio=1.0), r"outside \[0, 1\)"),
    (dict(method="flap", structure="both", ratio=0.2, sparsity=0.5), "not both"),
])
def test_bad_structured_configs_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        PruneConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_an_unstructured_config_records_what_it_did_before() -> None:
    assert "structure" not in PruneConfig(method="wanda").to_dict()
    config = PruneConfig(method="wanda-sp", structure="heads", ratio=0.25)
    assert config.sparsity is None and config.target_label == "heads-25%"
    assert config.to_dict()["bias_compensation"] is False  # Wanda-sp has no bias term
    assert PruneConfig(method="flap", structure="both", ratio=0.2).to_dict()["bias_compensation"] is True


# --- the shrink on every family ----------------------------------------------------------------------------


@torch.no_grad()
def _masked_reference(model: nn.Module, report, biases: list[dict[str, torch.Tensor | None]]) -> nn.Module:
    """The original model with the report's removed key/value groups and channels zeroed in
    o_proj's and down_proj's input columns, and the given output biases (per block, by leaf name)."""
    reference = copy.deepcopy(model)
    geometry = DecoderGeometry.of(model)
    group = geometry.group_size * geometry.head_dim
    for block, record, block_biases in zip(resolve(reference).blocks(reference), report.blocks, biases):
        parts = _parts(block)
        for g in record.get("removed_kv_groups", []):
            parts["o_proj"].weight[:, g * group:(g + 1) * group] = 0
        parts["down_proj"].weight[:, record.get("removed_channels", [])] = 0
        for leaf, bias in block_biases.items():
            if bias is not None:
                parts[leaf].bias = nn.Parameter(bias.detach().clone())
    return reference


def _output_biases(model: nn.Module) -> list[dict[str, torch.Tensor | None]]:
    return [{leaf: _parts(block)[leaf].bias for leaf in ("o_proj", "down_proj")}
            for block in resolve(model).blocks(model)]


@torch.no_grad()
def _block0_reference(model: nn.Module, calibration: CalibrationSet, leaf: str) -> torch.Tensor:
    """Every token's input to block 0's ``leaf`` linear over the calibration samples (the dense model:
    block 0's inputs do not depend on pruning)."""
    layout = resolve(model)
    rows: list[torch.Tensor] = []
    linear = _parts(layout.blocks(model)[0])[leaf]
    hook = linear.register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        for sample in calibration.samples:
            model(**layout.prepare_inputs(sample.inputs), use_cache=False)
    finally:
        hook.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_shrunk_model_equals_the_original_with_the_same_structures_masked(name: str, tmp_path: Path) -> None:
    model = build_tiny_model(name, text_overrides=TWO_GROUPS[name])
    calibration = _calibration(model, name)
    structure = "channels" if name in HEADS_REFUSED else "both"
    compensate = name in BIAS_FLAGS
    config = PruneConfig(method="flap", structure=structure, ratio=0.5, bias_compensation=compensate)
    pruned = copy.deepcopy(model)
    report = prune(pruned, None, calibration, config, settings=QUIET)

    geometry, after = DecoderGeometry.of(model), DecoderGeometry.of(pruned)
    assert after.intermediate == geometry.intermediate // 2 and after.head_dim == geometry.head_dim
    if structure == "both":
        assert (after.heads, after.kv_heads) == (geometry.heads // 2, geometry.kv_heads // 2)
        assert after.group_size == geometry.group_size
    assert report.structure["parameters"]["after"] == sum(p.numel() for p in pruned.parameters())
    # rotary tables (M-RoPE, Gemma3's per-layer ones) do not depend on the number of heads
    buffers = dict(model.named_buffers())
    for key, buffer in pruned.named_buffers():
        assert buffer.shape == buffers[key].shape, key

    # block 0: the structures FLAP removes, and its bias compensation, from a plain reference
    inputs = _block0_reference(model, calibration, "down_proj")
    down = _parts(resolve(model).blocks(model)[0])["down_proj"].weight
    scores = inputs.var(0, unbiased=False) * down.pow(2).sum(0)
    assert report.blocks[0]["removed_channels"] == sorted(torch.argsort(scores)[: geometry.intermediate // 2].tolist())
    shrunk_down = _parts(resolve(pruned).blocks(pruned)[0])["down_proj"]
    if compensate:
        removed = report.blocks[0]["removed_channels"]
        torch.testing.assert_close(shrunk_down.bias, down[:, removed] @ inputs[:, removed].mean(0),
                                   rtol=1e-4, atol=1e-6)
    else:
        assert shrunk_down.bias is None
    if structure == "both":  # a key/value group's score: the sum of its o_proj columns' squared FLAP scores
        inputs = _block0_reference(model, calibration, "o_proj")
        o = _parts(resolve(model).blocks(model)[0])["o_proj"].weight
        per_group = ((inputs.var(0, unbiased=False) * o.pow(2).sum(0)) ** 2).reshape(geometry.kv_heads, -1).sum(1)
        removed = sorted(torch.argsort(per_group)[: geometry.kv_heads // 2].tolist())
        assert report.blocks[0]["removed_kv_groups"] == removed
        if compensate:
            columns = [c for g in removed for c in range(g * o.shape[1] // geometry.kv_heads,
                                                             (g + 1) * o.shape[1] // geometry.kv_heads)]
            torch.testing.assert_close(_parts(resolve(pruned).blocks(pruned)[0])["o_proj"].bias,
                                       o[:, columns] @ inputs[:, columns].mean(0), rtol=1e-4, atol=1e-6)

    reference = _masked_reference(model, report, _output_biases(pruned))
    for seed, with_image in ((7, True), (8, False)):
        sample = resolve(model).prepare_inputs(make_inputs(model, name, seed=seed, with_image=with_image))
        with torch.no_grad():
            torch.testing.assert_close(pruned(**sample).logits, reference(**sample).logits, rtol=1e-4, atol=1e-5)
    sample = resolve(model).prepare_inputs(make_inputs(model, name, seed=9))
    generated = pruned.generate(**sample, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, reference.generate(**sample, max_new_tokens=4, do_sample=False))

    pruned.save_pretrained(tmp_path)  # plain from_pretrained, no remote code, rebuilds it exactly
    reloaded = type(model).from_pretrained(tmp_path).eval()
    text = decoder_config(reloaded.config)
    assert text.intermediate_size == after.intermediate and text.num_attention_heads == after.heads
    assert text.num_key_value_heads == after.kv_heads
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**sample).logits, pruned(**sample).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_ratio_zero_leaves_the_model_as_it_was(name: str) -> None:
    model = build_tiny_model(name, text_overrides=TWO_GROUPS[name])
    pruned = copy.deepcopy(model)
    report = prune(pruned, None, _calibration(model, name, n=2),
                   PruneConfig(method="wanda-sp", structure="both", ratio=0), settings=QUIET)
    assert report.sparsity["overall"] == 0
    assert pruned.config.to_dict() == model.config.to_dict()
    original = model.state_dict()
    assert pruned.state_dict().keys() == original.keys()
    assert all(torch.equal(value, original[key]) for key, value in pruned.state_dict().items())


def test_wanda_sp_removes_the_key_value_groups_of_lowest_summed_score() -> None:
    name = "llava"
    model = build_tiny_model(name, text_overrides={"num_attention_heads": 4, "num_key_value_heads": 4})
    calibration = _calibration(model, name)
    pruned = copy.deepcopy(model)
    report = prune(pruned, None, calibration, PruneConfig(method="wanda-sp", structure="heads", ratio=0.5),
                   settings=QUIET)
    inputs = _block0_reference(model, calibration, "o_proj")
    o = _parts(resolve(model).blocks(model)[0])["o_proj"].weight
    squares = inputs.pow(2).sum(0) / len(calibration.samples)
    per_head = (o.abs().sum(0) * squares.sqrt()).reshape(4, -1).sum(1)
    assert report.blocks[0]["removed_kv_groups"] == sorted(torch.argsort(per_head)[:2].tolist())
    assert "removed_channels" not in report.blocks[0]
    assert report.structure["heads"] | {"head_dim": None} == {
        "before": 4, "after": 2, "key_value_heads_before": 4, "key_value_heads_after": 2,
        "query_heads_per_group": 1, "head_dim": None}


# --- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HEADS_REFUSED)
def test_a_family_whose_config_cannot_say_fewer_heads_is_refused(name: str) -> None:
    model = build_tiny_model(name, text_overrides=TWO_GROUPS[name])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="use --structure channels") as error:
        prune(model, None, _calibration(model, name, n=1), PruneConfig(method="wanda-sp", structure="heads", ratio=0.5),
              settings=QUIET)
    assert "\n" not in str(error.value)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl", "qwen3_vl", "gemma3"])
def test_bias_compensation_is_refused_where_the_config_has_no_flag_for_it(name: str) -> None:
    model = build_tiny_model(name)
    with pytest.raises(UnsupportedModelError, match="--no-bias-compensation"):
        prune(model, None, _calibration(model, name, n=1), PruneConfig(method="flap", structure="channels", ratio=0.5),
              settings=QUIET)


def test_a_ratio_that_removes_no_head_is_refused_and_noted_under_both() -> None:
    model = build_tiny_model("llava", text_overrides={"num_attention_heads": 4, "num_key_value_heads": 4})
    calibration = _calibration(model, "llava", n=1)
    with pytest.raises(ConfigError, match=r"floor\(0.2 × 4 key/value groups of 1 query heads\) = 0: pass --ratio 0.25"):
        prune(copy.deepcopy(model), None, calibration, PruneConfig(method="flap", structure="heads", ratio=0.2),
              settings=QUIET)
    report = prune(model, None, calibration, PruneConfig(method="flap", structure="both", ratio=0.2), settings=QUIET)
    assert report.structure["heads"]["after"] == 4 and report.structure["channels"]["after"] == 52
    assert any("removes no attention head" in warning for warning in report.warnings)


def test_fused_linears_are_refused_with_one_line() -> None:
    config = transformers.LlavaConfig(
        text_config=dict(model_type="phi3", vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32,
                           hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_token_index=250, image_seq_length=16)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with pytest.raises(UnsupportedModelError, match="qkv_proj is a fused linear"):
        prune(model, None, _calibration(model, "llava", n=1),
              PruneConfig(method="wanda-sp", structure="heads", ratio=0.5), settings=QUIET)


# --- the MoT probe: one pathway's structures -------------------------------------------------------------


def test_a_probe_pathways_structures_are_cut_in_its_own_copies() -> None:
    name = "llava"
    model = build_tiny_model(name, text_overrides=TWO_GROUPS[name])
    probe = copy.deepcopy(model)
    make_probe(probe, include_o_proj=True)
    report = prune_pathway(probe, None, _calibration(model, name), PruneConfig(method="flap", structure="both",
                                                                               ratio=0.5, pool="text"), "text")
    assert report.structure["pathway"] == "text" and report.structure["channels"]["after"] == 32
    assert all(len(block["removed_kv_groups"]) == 1 and len(block["removed_channels"]) == 32
               for block in report.blocks)
    originals = dict(model.named_parameters())
    for path, routed in probe_linears(probe).items():
        assert torch.equal(routed.visual.weight, originals[f"{path}.weight"])  # the visual pathway is untouched
    # on text-only input every token takes the text copies: the probe is the masked original
    text_biases = [{leaf: routed.text.bias for path, routed in probe_linears(probe).items()
                    if path.startswith(f"{resolve(probe).block_path}.{index}.") and (leaf := path.rpartition(".")[2])
                    in ("o_proj", "down_proj")} for index in range(len(report.blocks))]
    reference = _masked_reference(model, report, text_biases)
    sample = resolve(model).prepare_inputs(make_inputs(model, name, seed=5, with_image=False))
    with torch.no_grad():
        torch.testing.assert_close(probe(**sample).logits, reference(**sample).logits, rtol=1e-4, atol=1e-5)


# --- the command lines ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaVA checkpoint (Llama decoder: 2 query heads in 1 key/value group, MLP 64) and calibration."""
    return make_llava_workspace(tmp_path_factory.mktemp("structured"))


def _invoke(main, *args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_prune_saves_a_smaller_model_that_plain_from_pretrained_loads(workspace) -> None:
    out = workspace["root"] / "flap-both"
    code, output = _invoke(atv_main, "prune", "--quiet", "--model", workspace["model"], "--calib", workspace["calib"],
                           "--method", "flap", "--structure", "both", "--ratio", "0.5", "--samples", "4", "--out", out)
    assert code == 0, output
    assert "2/2 heads and 32/64 MLP channels" in output and "note: ratio 0.5 removes no attention head" in output
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["config"]["structure"] == "both" and report["config"]["bias_compensation"] is True
    assert report["structure"]["config"] == {"intermediate_size": 32, "mlp_bias": True}
    assert all(len(block["removed_channels"]) == 32 for block in report["blocks"])
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)  # no remote code
    assert sum(p.numel() for p in model.parameters()) == report["structure"]["parameters"]["after"]
    assert model.config.text_config.intermediate_size == 32 and model.config.text_config.mlp_bias
    weights = (out / "model.safetensors").stat().st_size
    assert weights < (workspace["model"] / "model.safetensors").stat().st_size


def test_a_structure_the_model_cannot_lose_is_refused_before_the_weights_load(workspace, monkeypatch) -> None:
    import atv_prune.model.loading as loading

    monkeypatch.setattr(loading, "load_model_and_processor", lambda *a, **k: pytest.fail("weights were loaded"))
    out = workspace["root"] / "heads"
    code, output = _invoke(atv_main, "prune", "--model", workspace["model"], "--calib", workspace["calib"],
                           "--method", "wanda-sp", "--structure", "heads", "--ratio", "0.5", "--out", out)
    assert code == 2 and output.count("\n") == 1 and "use --structure channels" in output
    assert not out.exists()


def _scripted_evaluate(self: CellRunner, model: nn.Module, processor) -> dict:
    """Score = 100 x the decoder's MLP width relative to the tiny checkpoint's 64 channels."""
    width = decoder_config(model.config).intermediate_size
    return EvalResult(scores={"exist": 100 * width / 64}, mean=100 * width / 64, samples={"exist": 4}, metrics={},
                      scale={}, versions={}, seconds=0.0, limit=None).to_dict()


def test_compare_pairs_structured_methods_with_structured_targets(workspace, monkeypatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    out = workspace["root"] / "compare"
    code, output = _invoke(atv_main, "compare", "--model", workspace["model"], "--calib", workspace["calib"],
                           "--tasks", "exist", "--methods", "wanda", "flap:text", "wanda-sp", "--sparsity", "0.25",
                           "--structure", "channels", "--ratio", "0.25", "0.5", "--samples", "4", "--out", out)
    assert code == 0, output
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [cell["label"] for cell in cells] == [
        "wanda 25%", "flap:text channels-25%", "flap:text channels-50%", "wanda-sp channels-25%",
        "wanda-sp channels-50%"]
    assert [cell["retention"]["mean"] for cell in cells] == [100.0, 75.0, 50.0, 75.0, 50.0]
    assert cells[2]["structure"]["channels"] == {"before": 64, "after": 32}
    assert cells[2]["sparsity"] == pytest.approx(3 * 32 * 32 / (3 * 32 * 64 + 2 * 32 * 32 + 2 * 16 * 32))
    code, output = _invoke(atv_main, "compare", "--model", workspace["model"], "--calib", workspace["calib"],
                           "--tasks", "exist", "--methods", "flap", "--sparsity", "0.5", "--out", out / "x")
    assert code == 2 and "--methods flap needs a --structure with --ratio target" in output


def test_sensitivity_measures_a_pathways_structures(workspace, monkeypatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", lambda self, model, processor: _probe_score(model))
    out = workspace["root"] / "sensitivity"
    code, output = _invoke(motprobe_main, "sensitivity", "--model", workspace["model"], "--calib", workspace["calib"],
                           "--tasks", "exist", "--method", "flap", "--structure", "channels", "--ratio", "0.5",
                           "--pool", "text", "mixed", "--samples", "4", "--out", out)
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert [(row["pathway"], row["calibration"]) for row in results["table"]] == [
        ("text", "text"), ("text", "mixed"), ("visual", "text"), ("visual", "mixed")]
    assert {row["channels-50% mean"] for row in results["table"]} == {50.0}
    assert results["recipe"] is None  # a recipe names an unstructured method


def _probe_score(model: nn.Module) -> dict:
    """Score = 100 x the fraction of non-zero columns in the pruned pathway's down_proj copies."""
    copies = [routed.copy(pathway).weight for routed in probe_linears(model).values()
              for pathway in ("text", "visual") if not routed.shares_weights and routed.copy(pathway).weight.dim() == 2
              and routed.in_features == 64]
    pruned = [w for w in copies if bool((w == 0).all(0).any())]
    score = 100.0 * float(sum((w != 0).any(0).float().mean() for w in pruned) / len(pruned)) if pruned else 100.0
    return EvalResult(scores={"exist": score}, mean=score, samples={"exist": 4}, metrics={}, scale={}, versions={},
                      seconds=0.0, limit=None).to_dict()
