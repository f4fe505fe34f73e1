"""Out-of-core pruning: the streamed path (decoder blocks read from the checkpoint one at a time,
written out and freed) gives the in-memory path's pruned weights bit for bit, for every family,
method and target; it never holds more than one block; bad checkpoints are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from atv_prune import CalibrationSample, CalibrationSet, PruneConfig, RunSettings, prune_checkpoint
from atv_prune.errors import AtvPruneError
from atv_prune.model import streaming
from atv_prune.model.streaming import check_block_weights
from tiny_models import FAMILY_NAMES, build_tiny_model, make_inputs

#: (method, pool) covering every method; each runs at 50% and 2:4.
METHODS = (("magnitude", None), ("wanda", "mixed"), ("atv", "atv"), ("sparsegpt", "mixed"), ("tamp", "amia"))
TARGETS = ({"sparsity": 0.5, "pattern": None}, {"sparsity": None, "pattern": (2, 4)})


def _config(method: str, pool: str | None, target: dict) -> PruneConfig:
    allocation = "uniform" if method == "tamp" and target["pattern"] is not None else None
    return PruneConfig(method=method, pool=pool, allocation=allocation, **target)


def _settings(load: str, **extra) -> RunSettings:
    return RunSettings(load=load, progress=False, **extra)


def _checkpoint(root: Path, family: str) -> tuple[Path, CalibrationSet]:
    """A bf16 checkpoint in several shards (written by save_pretrained, so with the older key names
    transformers converts while loading) and calibration samples for it."""
    model = build_tiny_model(family, seed=0)
    folder = root / family
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    samples = [CalibrationSample(make_inputs(model, family, seed=i, n_text=10 + 3 * i), f"tiny:{i}") for i in range(3)]
    return folder, CalibrationSet(samples, "in-memory", 3, 0)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_streamed_and_in_memory_paths_give_the_same_weights(family: str, tmp_path: Path) -> None:
    checkpoint, calibration = _checkpoint(tmp_path, family)
    for method, pool in METHODS:
        for target in TARGETS:
            config = _config(method, pool, target)
            label = f"{method}-{config.target_label.replace(':', '-').replace('%', '')}"
            whole = prune_checkpoint(checkpoint, tmp_path / f"{label}-memory", calibration, config,
                                     settings=_settings("memory"))
            streamed = prune_checkpoint(checkpoint, tmp_path / f"{label}-stream", calibration, config,
                                        settings=_settings("stream"))
            assert (whole.settings["load"], streamed.settings["load"]) == ("memory", "stream")
            a, b = _weights(tmp_path / f"{label}-memory"), _weights(tmp_path / f"{label}-stream")
            assert a.keys() == b.keys(), label
            assert all(a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a), label
            assert whole.sparsity == streamed.sparsity and whole.blocks == streamed.blocks, label
            # each path reports the time of its own block traffic, inside the run's total
            assert "move_blocks" in whole.seconds and "read_blocks" not in whole.seconds, label
            assert {"read_blocks", "write_blocks"} <= set(streamed.seconds), label
            assert "move_blocks" not in streamed.seconds, label
            assert streamed.seconds["read_blocks"] + streamed.seconds["write_blocks"] <= streamed.seconds["total"]
            leftovers = [p.name for p in (tmp_path / f"{label}-stream").iterdir() if p.name.startswith(".")]
            assert leftovers == [], label


def test_the_streamed_output_loads_like_the_in_memory_one(tmp_path: Path) -> None:
    checkpoint, calibration = _checkpoint(tmp_path, "qwen2_vl")
    config = PruneConfig(method="atv", sparsity=0.5)
    prune_checkpoint(checkpoint, tmp_path / "memory", calibration, config, settings=_settings("memory"))
    report = prune_checkpoint(checkpoint, tmp_path / "stream", calibration, config, settings=_settings("stream"))
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded every two blocks' worth of weights
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == json.loads(
        (tmp_path / "memory" / "config.json").read_text())
    whole = AutoModelForImageTextToText.from_pretrained(tmp_path / "memory").state_dict()
    streamed = AutoModelForImageTextToText.from_pretrained(tmp_path / "stream").state_dict()
    assert whole.keys() == streamed.keys() and all(torch.equal(whole[k], streamed[k]) for k in whole)
    assert report.memory["block_bytes_read"] > 0 and report.seconds["save"] >= 0


def test_only_one_block_is_ever_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint, calibration = _checkpoint(tmp_path, "gemma3")  # 4 decoder blocks
    real_blocks: list[int] = []
    enter = streaming.StreamedBlocks.enter

    def counting_enter(self, index, block, device):
        enter(self, index, block, device)
        blocks = block_list[0]
        real_blocks.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))

    block_list: list = []
    load = streaming.load_streamed

    def keep_blocks(*args, **kwargs):
        streamed = load(*args, **kwargs)
        block_list.append(streamed.layout.blocks(streamed.model))
        assert all(p.device.type == "meta" for p in block_list[0].parameters())
        return streamed

    monkeypatch.setattr(streaming.StreamedBlocks, "enter", counting_enter)
    monkeypatch.setattr("atv_prune.runs.checkpoint.load_streamed", keep_blocks)
    prune_checkpoint(checkpoint, tmp_path / "out", calibration, PruneConfig(method="wanda", sparsity=0.5),
                     settings=_settings("stream"))
    assert real_blocks == [1, 1, 1, 1]


def test_activations_beyond_the_budget_spill_to_disk_with_the_same_result(tmp_path: Path) -> None:
    checkpoint, calibration = _checkpoint(tmp_path, "llava")
    config = PruneConfig(method="atv", sparsity=0.5)
    kept = prune_checkpoint(checkpoint, tmp_path / "kept", calibration, config, settings=_settings("stream"))
    (tmp_path / "spill").mkdir()
    spilled = prune_checkpoint(checkpoint, tmp_path / "spilled", calibration, config,
                               settings=_settings("stream", activation_memory="3KB",
                                                  spill_dir=str(tmp_path / "spill")))
    in_output = prune_checkpoint(checkpoint, tmp_path / "in-output", calibration, config,
                                 settings=_settings("memory", activation_memory="3KB"))
    assert kept.memory["activations_spilled_bytes"] == 0
    for report in (spilled, in_output):
        assert report.memory["activations_spilled_bytes"] > 0 and report.memory["activations_kept_bytes"] <= 3000
    a = _weights(tmp_path / "kept")
    assert all(torch.equal(a[k], _weights(tmp_path / name)[k]) for name in ("spilled", "in-output") for k in a)
    assert list((tmp_path / "spill").iterdir()) == []  # the spill files are removed, the folder given kept
    assert [p.name for p in (tmp_path / "in-output").iterdir() if p.name.startswith(".")] == []


def test_auto_streams_when_the_model_would_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint, calibration = _checkpoint(tmp_path, "llava")
    config = PruneConfig(method="magnitude", sparsity=0.5)
    monkeypatch.setattr("atv_prune.runs.checkpoint.available_memory", lambda: 10**4)
    report = prune_checkpoint(checkpoint, tmp_path / "small", calibration, config, settings=_settings("auto"))
    assert report.settings["load"] == "stream" and report.settings["load_reason"]["available_bytes"] == 10**4
    monkeypatch.setattr("atv_prune.runs.checkpoint.available_memory", lambda: 10**12)
    report = prune_checkpoint(checkpoint, tmp_path / "large", calibration, config, settings=_settings("auto"))
    assert report.settings["load"] == "memory"


def _damaged(tmp_path: Path, change, in_index: bool = True) -> Path:
    """The tiny LLaVA checkpoint with ``change`` applied to its shards; ``in_index``: the index
    still lists every weight (else it follows the change)."""
    checkpoint, _ = _checkpoint(tmp_path, "llava")
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for file in checkpoint.glob("*.safetensors"):
        tensors = load_file(file)
        if change(tensors):
            save_file(tensors, file, metadata={"format": "pt"})
            if not in_index:
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file.name or k in tensors}
    index_path.write_text(json.dumps(index))
    return checkpoint


def _drop_up_proj(tensors: dict) -> bool:
    key = next((k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight")), None)
    return key is not None and tensors.pop(key) is not None


@pytest.mark.parametrize("in_index,message", [
    (False, r"1 weights the model needs are missing \(.*layers\.1\.mlp\.up_proj\.weight"),
    (True, r"places .*layers\.1\.mlp\.up_proj\.weight in shard .*which does not hold it"),
])
def test_a_missing_block_weight_is_one_line_and_leaves_nothing(tmp_path: Path, in_index: bool, message: str) -> None:
    checkpoint = _damaged(tmp_path, _drop_up_proj, in_index)
    with pytest.raises(AtvPruneError, match=message) as caught:
        prune_checkpoint(checkpoint, tmp_path / "out", None, PruneConfig(method="magnitude", sparsity=0.5),
                         settings=_settings("stream"))
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "llava"]


def test_non_finite_weights_of_a_streamed_block_stop_the_run_and_leave_nothing(tmp_path: Path) -> None:
    def poison(tensors: dict) -> bool:
        key = next((k for k in tensors if k.endswith("layers.1.self_attn.o_proj.weight")), None)
        if key is not None:
            tensors[key][0, 0] = float("inf")
        return key is not None

    checkpoint = _damaged(tmp_path, poison)
    with pytest.raises(AtvPruneError, match="non-finite weights.*o_proj"):
        prune_checkpoint(checkpoint, tmp_path / "out", None, PruneConfig(method="magnitude", sparsity=0.5),
                         settings=_settings("stream"))
    assert list(tmp_path.iterdir()) == [tmp_path / "llava"]


def test_block_weights_are_compared_by_name_and_shape() -> None:
    expected = {"m.layers.0.w": (4, 4), "m.layers.0.b": (4,)}
    check_block_weights(expected, dict(expected), Path("ckpt"))
    with pytest.raises(AtvPruneError, match="does not have .*m.layers.0.extra"):
        check_block_weights(expected, {**expected, "m.layers.0.extra": (1,)}, Path("ckpt"))
    with pytest.raises(AtvPruneError, match=r"m.layers.0.w has shape \[4, 5\] in the checkpoint but the model needs "
                                            r"\[4, 4\]"):
        check_block_weights(expected, {**expected, "m.layers.0.w": (4, 5)}, Path("ckpt"))


def test_bad_sizes_are_one_line() -> None:
    from atv_prune.errors import ConfigError

    with pytest.raises(ConfigError, match="--activation-memory 'lots' is not a size"):
        RunSettings(activation_memory="lots")
    with pytest.raises(ConfigError, match="--max-shard-size '0GB' is not a size"):
        RunSettings(max_shard_size="0GB")
    with pytest.raises(ConfigError, match="load"):
        RunSettings(load="disk")


def test_the_command_line_streams_a_checkpoint_with_its_processor(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from atv_prune.cli import main
    from tiny_checkpoints import make_calibration_files, make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "llava", "llava")
    calib = make_calibration_files(tmp_path / "calib")["json"]
    outputs = {}
    for load in ("memory", "stream"):
        result = CliRunner().invoke(main, ["prune", "--quiet", "--model", str(checkpoint), "--calib", str(calib),
                                           "--method", "atv", "--samples", "4", "--sparsity", "0.5", "--load", load,
                                           "--max-shard-size", "100KB", "--out", str(tmp_path / load)])
        assert result.exit_code == 0, result.output
        assert f"atv, pool atv, 50%, {load})" in result.output
        outputs[load] = _weights(tmp_path / load)
        report = json.loads((tmp_path / load / "pruning_report.json").read_text())
        assert report["settings"]["load"] == load and report["settings"]["max_shard_size"] == "100KB"
        assert (tmp_path / load / "tokenizer.json").exists() and len(list((tmp_path / load).glob("*.safetensors"))) > 1
    assert all(torch.equal(outputs["memory"][k], outputs["stream"][k]) for k in outputs["memory"])
    result = CliRunner().invoke(main, ["prune", "--model", str(checkpoint), "--method", "magnitude", "--sparsity",
                                       "0.5", "--activation-memory", "lots", "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and result.output.startswith("error: --activation-memory 'lots' is not a size")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_paths_run_on_the_cpu(dtype: torch.dtype, tmp_path: Path) -> None:
    """What a GPU run computes in (bf16/fp16), streamed, on the CPU: exact sparsity, finite weights,
    masks close to the fp32 path's."""
    checkpoint, calibration = _checkpoint(tmp_path, "qwen2_vl")
    config = PruneConfig(method="atv", sparsity=0.5)
    name = str(dtype).removeprefix("torch.")
    half = prune_checkpoint(checkpoint, tmp_path / "half", calibration, config, settings=_settings("stream"),
                            dtype=name)
    prune_checkpoint(checkpoint, tmp_path / "fp32", calibration, config, settings=_settings("stream"),
                     dtype="float32")
    assert half.sparsity["overall"] == 0.5
    a, b = _weights(tmp_path / "half"), _weights(tmp_path / "fp32")
    linears = [k for k in a if ".layers." in k and k.endswith("proj.weight") and "visual" not in k]
    assert linears and all(torch.isfinite(a[k].float()).all() for k in a)
    agree = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in linears) / sum(a[k].numel() for k in linears)
    assert agree > 0.97


def test_activation_store_keeps_within_the_budget_and_spills_the_rest(tmp_path: Path) -> None:
    from atv_prune.model.capture import ActivationStore, SpilledTensor, to_compute

    store = ActivationStore("cpu", budget=100, folder=tmp_path)
    small, large = torch.randn(1, 5, 4), torch.randn(1, 30, 4)  # 80 and 480 bytes
    kept, spilled = store.keep(small), store.keep(large)
    assert isinstance(kept, torch.Tensor) and isinstance(spilled, SpilledTensor)
    assert torch.equal(spilled.read(), large) and (store.kept_bytes, store.spilled_bytes) == (80, 480)
    spilled.write(large * 2)
    assert torch.equal(spilled.read(), large * 2)
    assert to_compute(kept, torch.device("cpu")) is kept  # no copy, nothing asynchronous on the CPU
    store.close()
    assert list(tmp_path.iterdir()) == []
