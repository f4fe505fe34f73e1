"""The deprecation paths of the 0.3.0 layering: old module paths and run settings in PruneConfig."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

from atv_prune import MOVED_MODULES, CalibrationSample, CalibrationSet, PruneConfig, RunSettings, prune
from tiny_models import build_tiny_model, make_inputs


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_imports_its_replacement_with_a_warning(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED_MODULES[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED_MODULES[old])


def test_run_settings_given_to_prune_config_still_apply() -> None:
    with pytest.warns(DeprecationWarning, match="RunSettings"):
        legacy = PruneConfig(method="wanda", sparsity=0.5, device="cpu", progress=False)
    assert legacy.to_dict() == PruneConfig(method="wanda", sparsity=0.5).to_dict()
    assert legacy.legacy_settings == RunSettings(device="cpu", progress=False)
    assert "device" not in legacy.to_dict() and "progress" not in legacy.to_dict()
    model = build_tiny_model("llava")
    calibration = CalibrationSet([CalibrationSample(make_inputs(model, "llava", seed=i), f"s{i}") for i in range(2)],
                                 "in-memory", 2, 0)
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(first, None, calibration, legacy)
    prune(second, None, calibration, PruneConfig(method="wanda", sparsity=0.5), settings=RunSettings(device="cpu"))
    assert report.settings["device"] == "cpu"
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
