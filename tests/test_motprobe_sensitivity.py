"""motprobe sensitivity: the Table-1 grid on the probe, its recipe, and atv-prune prune --recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atv_prune.cli import main as atv_main
from atv_prune.eval.run import EvalResult
from atv_prune.runs.cells import CellRunner
from motprobe.cli import main
from motprobe.sensitivity import derive_recipe, with_measured_alpha
from tiny_checkpoints import make_llava_workspace


def _record(pathway: str, pool: str, target: str, mean: float) -> dict:
    return {"label": f"{pathway}:{pool} {target}", "extra": {"pathway": pathway}, "config": {"pool": pool},
            "retention": {"mean": mean, "tasks": {"t": mean}}}


def test_recipe_follows_the_papers_asymmetry() -> None:
    table_1 = {("text", "text"): 84.65, ("text", "visual"): 50.92, ("text", "mixed"): 64.97,
               ("visual", "text"): 100.05, ("visual", "visual"): 99.25, ("visual", "mixed"): 99.57}
    records = [_record(p, c, "60%", v) for (p, c), v in table_1.items()]
    recipe = derive_recipe(records, "60%")
    assert (recipe.method, recipe.pool, recipe.alpha) == ("atv", "atv", 1.0)
    assert recipe.evidence["sensitive_pathway"] == "text" and recipe.evidence["alpha"] == "not measured"
    assert recipe.evidence["best_pool"] == {"text": "text", "visual": "text"}
    assert "the visual pathway is indifferent to its pool (spread 0.8 points" in recipe.rationale
    assert "alpha 1 (the paper's default, not measured here" in recipe.rationale


def test_recipe_rationale_says_what_the_numbers_say() -> None:
    prefers_visual = [_record("text", "text", "50%", 90), _record("text", "mixed", "50%", 85),
                      _record("visual", "text", "50%", 80), _record("visual", "visual", "50%", 95)]
    recipe = derive_recipe(prefers_visual, "50%")
    assert (recipe.method, recipe.alpha) == ("atv", 1.0)  # no unmeasured alpha
    assert "the visual pathway is best protected by visual calibration (visual 95.0, text 80.0)" in recipe.rationale
    prefers_text = [_record("text", "text", "50%", 90), _record("text", "mixed", "50%", 85),
                    _record("visual", "text", "50%", 95), _record("visual", "visual", "50%", 80)]
    rationale = derive_recipe(prefers_text, "50%").rationale
    assert "the visual pathway is best protected by text calibration (text 95.0, visual 80.0)" in rationale
    assert "indifferent" not in rationale
    text_prefers_mixed = [_record("text", "text", "50%", 80), _record("text", "mixed", "50%", 85),
                          _record("visual", "text", "50%", 99), _record("visual", "visual", "50%", 99)]
    recipe = derive_recipe(text_prefers_mixed, "50%")
    assert (recipe.method, recipe.pool) == ("wanda", "mixed")
    assert recipe.rationale.startswith("at 50%, the text pathway is best protected by mixed calibration "
                                       "(mixed 85.0, text 80.0)")


def test_the_measured_alpha_is_the_best_of_the_sweep() -> None:
    recipe = derive_recipe([_record("text", "text", "70%", 90), _record("text", "mixed", "70%", 85),
                            _record("visual", "text", "70%", 95), _record("visual", "visual", "70%", 95)], "70%")
    sweep = [{"label": f"recipe alpha={a:g} 70%", "config": {"alpha": a}, "visual_tokens_per_sample": a,
              "retention": {"mean": mean}} for a, mean in ((0.5, 70.0), (1.0, 71.0), (2.0, 72.5), (4.0, 72.5))]
    measured = with_measured_alpha(recipe, sweep)
    assert measured.alpha == 2.0  # ties (2 and 4) go to the alpha nearest 1
    assert measured.evidence["alpha"] == "measured: 2"
    assert measured.evidence["alpha_sweep"]["alphas"]["4"] == {"mean_retention": 72.5, "visual_tokens_per_sample": 4.0}
    assert measured.rationale.endswith("alpha 2, which kept the most mean retention on the original model at 70% "
                                       "(alpha 0.5 70.0, alpha 1 71.0, alpha 2 72.5, alpha 4 72.5)")
    assert "not measured" not in measured.rationale


def _scripted_evaluate(self: CellRunner, model: torch.nn.Module, processor) -> dict:
    """Score = 100 x the kept fraction of the text-pathway weights (visual copies count a tenth):
    the text pathway is the sensitive one, as in the paper."""
    kept, total = 0.0, 0.0
    for name, param in model.state_dict().items():
        if ".layers." in name and name.endswith("weight") and param.dim() == 2 and "language_model" in name:
            weight = 0.1 if ".visual." in name else 1.0
            kept += weight * float((param != 0).sum())
            total += weight * param.numel()
    score = 100.0 * kept / total
    return EvalResult(scores={"exist": score}, mean=score, samples={"exist": 4}, metrics={}, scale={}, versions={},
                      seconds=0.0, limit=self.settings.limit).to_dict()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llava_workspace(tmp_path_factory.mktemp("sensitivity"))


def test_sensitivity_grid_writes_table_heatmap_recipe_and_resumes(workspace, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(CellRunner, "_evaluate", lambda s, m, p: calls.append(1) or _scripted_evaluate(s, m, p))
    out = workspace["root"] / "study"
    args = ["sensitivity", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", "exist",
            "--sparsity", "0.5", "0.6", "--samples", "4", "--out", out]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 + 2 * 3 * 2
    rows = list(json.loads((out / "results.json").read_text())["table"])
    assert [(r["pathway"], r["calibration"]) for r in rows] == [
        (p, c) for p in ("text", "visual") for c in ("text", "visual", "mixed")]
    text_rows = [r for r in rows if r["pathway"] == "text"]
    visual_rows = [r for r in rows if r["pathway"] == "visual"]
    assert max(r["60% mean"] for r in text_rows) < min(r["60% mean"] for r in visual_rows)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["format"] == "atv-prune-recipe/1" and recipe["evidence"]["sensitive_pathway"] == "text"
    assert (out / "heatmap.png").stat().st_size and (out / "results.csv").read_text().startswith("pathway,")
    calls.clear()
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 0 and calls == []
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--recipe-alphas", "1", "2"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 2  # the probe cells resume; one original-model cell per alpha
    assert "recipe alpha=2 60%: mean retention" in result.output
    swept = json.loads((out / "recipe.json").read_text())
    assert swept["alpha"] == 1.0 and set(swept["evidence"]["alpha_sweep"]["alphas"]) == {"1", "2"}
    assert [c["config"]["alpha"] for c in json.loads((out / "results.json").read_text())["recipe_alphas"]] == [1, 2]

    pruned = workspace["root"] / "from-recipe"
    result = CliRunner().invoke(atv_main, ["prune", "--quiet", "--model", str(workspace["model"]), "--calib",
                                           str(workspace["calib"]), "--recipe", str(out / "recipe.json"),
                                           "--samples", "4", "--sparsity", "0.5", "--alpha", "2",
                                           "--out", str(pruned)])
    assert result.exit_code == 0, result.output
    report = json.loads((pruned / "pruning_report.json").read_text())
    assert report["config"]["method"] == recipe["method"] and report["config"]["pool"] == recipe["pool"]
    assert report["config"]["alpha"] == 2.0  # given explicitly: wins over the recipe
    assert report["extra"]["recipe"].endswith("recipe.json")


def test_a_bad_recipe_is_one_line(workspace, tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text('{"method": "atv"}')
    result = CliRunner().invoke(atv_main, ["prune", "--model", str(workspace["model"]), "--recipe",
                                           str(tmp_path / "r.json"), "--sparsity", "0.5", "--out",
                                           str(tmp_path / "o")])
    assert result.exit_code == 2 and "is not a valid recipe: pool: Field required" in result.output


def test_a_magnitude_study_has_one_uncalibrated_row_per_pathway_and_no_recipe(workspace, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(CellRunner, "_evaluate", lambda s, m, p: calls.append(1) or _scripted_evaluate(s, m, p))
    out = workspace["root"] / "magnitude-study"
    args = ["sensitivity", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", "exist",
            "--sparsity", "0.5", "--method", "magnitude", "--out", out]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 + 2
    results = json.loads((out / "results.json").read_text())
    assert [(r["pathway"], r["calibration"]) for r in results["table"]] == [("text", "none"), ("visual", "none")]
    assert results["recipe"] is None and not (out / "recipe.json").exists()
