"""jobs/ablate.py: the grid, the selection of each trial, and a CI-sized sweep (Ray Tune trials that are Ray
Train runs, on the tiny model) that writes its report, resumes only the missing trials and reproduces a
trial's metrics exactly."""

import json
import math
import shutil

import pytest
from PIL import Image

from calora_ray.ablation import trial_grid, trial_modules
from calora_ray.config import AblateConfig, ConfigError, build_config

from conftest import run_job_main

METRICS = ("alignment_mmd2", "alignment_all_prompts_mmd2", "adherence_mean", "memorisation", "final_loss",
           "lora_params", "num_modules", "param_percent")


def test_the_grid_has_one_trial_per_mode_k_concept_and_seed():
    grid = trial_grid(["none", "all", "normalized", "unnormalized", "random"], [1, 2, 3, 5, 10], 2.0,
                      ["style", "viewpoint"], [0, 1, 2])
    ids = [t["trial"] for t in grid]
    assert len(ids) == len(set(ids)) == 3 * (2 + 2 * (5 + 1 + 1))  # none, all once; 5 k + 2 modes per concept
    assert "normalized-k10-viewpoint-s2" in ids and "random-k2-style-s0" in ids and "all-s1" in ids
    assert not any(t.startswith(("random-k1", "unnormalized-k5")) for t in ids)  # those run at main_k only
    with pytest.raises(ValueError, match="unknown selection mode"):
        trial_grid(["lora"], [2], 2, ["style"], [0])
    with pytest.raises(ConfigError, match="--modes"):
        build_config(AblateConfig, {"modes": ["full"]})


def test_each_mode_selects_its_projections():
    names = [f"m{i}" for i in range(100)]
    report = {"scores_normalized": {n: float(i) for i, n in enumerate(names)},
              "scores_unnormalized": {n: float(-i) for i, n in enumerate(names)},
              "param_counts": {n: 1 for n in names}}

    def modules(mode, k=2.0, seed=0):
        return trial_modules({"mode": mode, "k": None if mode in ("none", "all") else k, "seed": seed}, report)

    assert modules("none") is None and modules("all") == names
    assert modules("normalized") == ["m99", "m98"] and modules("unnormalized") == ["m0", "m1"]
    assert len(modules("normalized", 10.0)) == 10
    assert len(modules("random")) == 2 and modules("random", seed=1) != modules("random", seed=0)


def test_a_small_sweep_reports_resumes_and_reproduces(tmp_path, monkeypatch):
    """The CI-sized sweep of the documented one: two trials (pretrained, CA-LoRA 2 % on style), one seed.
    Relative output paths, as a user types them: Tune runs each trial in a directory of its own."""
    import ray

    monkeypatch.chdir(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--model", "tiny", "--modes", "none", "normalized", "--ks", "2", "--concepts", "style", "--seeds", "0",
            "--steps", "4", "--batch-size", "2", "--sample-images", "2", "--sample-steps", "2", "--score-samples", "2",
            "--score-x0-steps", "2", "--reference-images", "8", "--controlnet", "none", "--work-dir", "work",
            "--output", "out", "--address", "local"]
    try:
        code, text = run_job_main("ablate", *args)
        assert code == 0, text
        assert "2 trials, 0 finished before, 2 to run" in text and "report: out/report.md" in text
        records = {p.stem: json.loads(p.read_text()) for p in (out / "trials").glob("*.json")}
        assert set(records) == {"none-s0", "normalized-k2-style-s0"}
        none, ca = records["none-s0"], records["normalized-k2-style-s0"]
        assert none["num_modules"] == 0 and none["lora_params"] == 0 and none["steps"] is None
        assert ca["num_modules"] == 2 and ca["num_candidates"] == 56 and ca["steps"] == 4 and ca["lora_params"] > 0
        assert 0 < ca["param_percent"] < 1
        for record in records.values():
            assert all(math.isfinite(record[k]) for k in ("alignment_mmd2", "memorisation", "adherence_mean"))
            assert set(record["adherence"]) == {"night", "foggy", "rainy", "snowy"}
            assert record["label_fidelity"] is None and record["miou_delta"] is None  # not measured, and said so
            assert Image.open(out / "grids" / f"{record['trial']}.png").size[0] >= 256
        report = (out / "report.md").read_text()
        assert "python jobs/ablate.py --model tiny" in report and "trials finished: 2 of 2" in report
        assert "| CA-LoRA (normalized, top 2 %) | style | 2 |" in report and "What was left out" in report
        assert "Label fidelity: no --controlnet" in report
        assert Image.open(out / "fig6.png").format == "PNG"
        assert len(json.loads((out / "results.json").read_text())["rows"]) == 2

        # killed before the CA-LoRA trial finished: its record is missing (records are written whole, at the
        # end) and, here, its fine-tuning run too; the rerun runs that trial alone and gets the same numbers
        kept = (out / "trials" / "none-s0.json").read_bytes()
        (out / "trials" / "normalized-k2-style-s0.json").unlink()
        shutil.rmtree(work / "runs" / "normalized-k2-style-s0")
        code, text = run_job_main("ablate", *args)
        assert code == 0, text
        assert "2 trials, 1 finished before, 1 to run" in text
        assert (out / "trials" / "none-s0.json").read_bytes() == kept
        again = json.loads((out / "trials" / "normalized-k2-style-s0.json").read_text())
        assert {k: again[k] for k in METRICS} == {k: ca[k] for k in METRICS}
        assert again["adherence"] == ca["adherence"]

        code, text = run_job_main("ablate", *args)  # nothing left: no Ray work, the report again
        assert code == 0 and "2 trials, 2 finished before, 0 to run" in text, text
        # other settings in the same output would mix incomparable numbers: refused, naming the setting
        other = [("5" if a == "4" and args[i - 1] == "--steps" else a) for i, a in enumerate(args)]
        code, text = run_job_main("ablate", *other)
        assert code == 2 and "was made with steps=4, this run has 5" in text, text
    finally:
        ray.shutdown()
