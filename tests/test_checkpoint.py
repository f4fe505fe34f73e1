"""Strict loading: a damaged or incomplete checkpoint is refused in one line, never filled with
random weights; the header check agrees with transformers' own loading info on every family."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from atv_prune.cli import main as atv_main
from atv_prune.errors import CheckpointError
from atv_prune.model import checkpoint
from atv_prune.model.checkpoint import (
    expected_weights,
    loading_problems,
    read_headers,
    stored_weights,
    weight_problems,
)
from atv_prune.model.loading import load_model, model_skeleton
from tiny_checkpoints import make_llava_workspace
from tiny_models import FAMILY_NAMES, build_tiny_model

Edit = Callable[[dict[str, torch.Tensor]], None]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llava_workspace(tmp_path_factory.mktemp("strict"))


def _variant(source: Path, dest: Path, edit_weights: Edit | None = None,
             edit_config: Callable[[dict], None] | None = None) -> Path:
    """A copy of checkpoint ``source`` with its weights and/or config.json edited."""
    shutil.copytree(source, dest)
    if edit_weights is not None:
        weights = load_file(dest / "model.safetensors")
        edit_weights(weights)
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dest / "config.json").read_text())
        edit_config(config)
        (dest / "config.json").write_text(json.dumps(config))
    return dest


def _first(weights: dict[str, torch.Tensor], block: int) -> str:
    return next(name for name in sorted(weights) if f"layers.{block}." in name and name.endswith("proj.weight")
                and "vision" not in name and "visual" not in name)


def _damage(weights: dict[str, torch.Tensor]) -> None:
    """Drop one decoder weight, add one no module takes, and widen another by a row."""
    del weights[_first(weights, 1)]
    weights["extra.unused"] = torch.zeros(2)
    name = _first(weights, 0)
    weights[name] = torch.zeros(weights[name].shape[0] + 1, *weights[name].shape[1:])


def _header_problems(folder: Path) -> checkpoint.WeightProblems:
    skeleton = model_skeleton(folder)
    return weight_problems(expected_weights(skeleton), stored_weights(skeleton, read_headers(folder)))


def _loading_problems(folder: Path) -> checkpoint.WeightProblems:
    _, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True,
                                                          ignore_mismatched_sizes=True)
    return loading_problems(info)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_header_check_agrees_with_transformers_loading_info(family: str, tmp_path: Path) -> None:
    intact = tmp_path / "intact"
    build_tiny_model(family).save_pretrained(intact)
    assert not _header_problems(intact) and not _loading_problems(intact)
    damaged = _variant(intact, tmp_path / "damaged", _damage)
    found = _header_problems(damaged)
    assert found == _loading_problems(damaged)
    assert len(found.missing) == 1 and found.unexpected == ["extra.unused"] and len(found.mismatched) == 1
    assert "layers.1." in found.missing[0] and "layers.0." in found.mismatched[0][0]


def test_tied_weights_are_present_when_either_side_is_stored(tmp_path: Path) -> None:
    model = build_tiny_model("gemma3")
    assert model.all_tied_weights_keys  # lm_head is tied to the embeddings
    intact = tmp_path / "intact"
    model.save_pretrained(intact)
    assert not any("lm_head" in name for name in read_headers(intact))
    embeddings = next(name for name in read_headers(intact) if name.endswith("embed_tokens.weight")
                      and "vision" not in name)

    def only_the_head(weights: dict[str, torch.Tensor]) -> None:
        weights["lm_head.weight"] = weights.pop(embeddings)

    swapped = _variant(intact, tmp_path / "swapped", only_the_head)
    assert not _header_problems(swapped) and not _loading_problems(swapped)
    neither = _variant(swapped, tmp_path / "neither", lambda weights: weights.pop("lm_head.weight"))
    assert _header_problems(neither) == _loading_problems(neither)
    assert _header_problems(neither).missing


@pytest.mark.parametrize("case", ["missing tensor", "more layers", "unexpected tensor", "wrong shape",
                                  "config shapes"])
def test_an_incomplete_checkpoint_is_refused_naming_its_keys(workspace, tmp_path: Path, case: str) -> None:
    source = workspace["model"]
    if case == "missing tensor":
        folder = _variant(source, tmp_path / "m", lambda w: w.pop("language_model.model.layers.1.mlp.up_proj.weight"))
        message = "1 weights the model needs are missing (model.language_model.layers.1.mlp.up_proj.weight)"
    elif case == "more layers":
        folder = _variant(source, tmp_path / "m", edit_config=lambda c: c["text_config"].update(num_hidden_layers=3))
        message = "9 weights the model needs are missing (model.language_model.layers.2."
    elif case == "unexpected tensor":
        folder = _variant(source, tmp_path / "m", lambda w: w.update({"stray.weight": torch.ones(3)}))
        message = "1 stored weights belong to no part of the model (stray.weight)"
    elif case == "wrong shape":
        folder = _variant(source, tmp_path / "m",
                          lambda w: w.update({"language_model.model.norm.weight": torch.ones(33)}))
        message = "model.language_model.norm.weight [33] where the config needs [32]"
    else:
        folder = _variant(source, tmp_path / "m", edit_config=lambda c: c["text_config"].update(intermediate_size=48))
        message = "6 have the wrong shape (model.language_model.layers.0.mlp.down_proj.weight [32, 64] where the config"
    with pytest.raises(CheckpointError, match="does not match its config.json") as raised:
        load_model(folder)
    assert message in str(raised.value) and "random values" in str(raised.value)
    out = tmp_path / "out"
    result = CliRunner().invoke(atv_main, ["prune", "--quiet", "--model", str(folder), "--method", "magnitude",
                                           "--sparsity", "0.5", "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_the_load_itself_refuses_what_the_header_check_cannot_see(workspace, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter that splits or merges tensors hides names from the header check: the loading
    info still refuses a missing weight."""
    folder = _variant(workspace["model"], tmp_path / "m",
                      lambda w: w.pop("language_model.model.layers.0.self_attn.q_proj.weight"))
    monkeypatch.setattr(checkpoint, "stored_weights", lambda skeleton, stored: None)
    with pytest.raises(CheckpointError, match=r"missing \(model.language_model.layers.0.self_attn.q_proj.weight\)"):
        load_model(folder)


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / "model.safetensors").write_bytes(data)


@pytest.mark.parametrize("case", ["empty", "truncated", "bad header", "garbage"])
def test_a_damaged_weight_file_is_named(workspace, tmp_path: Path, case: str) -> None:
    folder = _variant(workspace["model"], tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 2],
               "bad header": (40).to_bytes(8, "little") + b"{" * 40 + data[48:],
               "garbage": bytes(range(256)) * 4}[case]
    (folder / "model.safetensors").write_bytes(damaged)
    reason = {"empty": "the file is empty", "truncated": "truncated", "bad header": "invalid JSON in header",
              "garbage": "header too large"}[case]
    with pytest.raises(CheckpointError, match=f"weight file {folder / 'model.safetensors'} is damaged \\({reason}"):
        load_model(folder)
    result = CliRunner().invoke(atv_main, ["eval", "--model", str(folder), "--tasks", "exist"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and reason in result.output


def _shard(folder: Path) -> None:
    """Split the checkpoint's weights into two shards with an index, as save_pretrained does."""
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoints_are_checked_shard_by_shard(workspace, tmp_path: Path) -> None:
    folder = _variant(workspace["model"], tmp_path / "m")
    _shard(folder)
    load_model(folder)
    second = folder / "model-00002-of-00002.safetensors"
    data = second.read_bytes()
    second.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is damaged"):
        load_model(folder)
    second.unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is not in"):
        load_model(folder)
    second.write_bytes(data)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    moved = next(name for name, shard in index["weight_map"].items() if shard.startswith("model-00002"))
    index["weight_map"][moved] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"places {moved} in shard model-00001-of-00002.safetensors"):
        load_model(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not a readable safetensors index"):
        load_model(folder)


def test_a_checkpoint_without_safetensors_is_named(workspace, tmp_path: Path) -> None:
    folder = _variant(workspace["model"], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json in"):
        load_model(folder)
