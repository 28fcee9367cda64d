"""jobs/ablate.py: the grid, the selection of each trial, and a CI-sized sweep (Ray Tune trials that are Ray
Train runs, on the tiny model) that writes its report, resumes only the missing trials and reproduces a
trial's metrics exactly."""

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from calora_ray.ablation import in_table3, ranking_rows, trial_grid, trial_modules, trial_twins
from calora_ray.config import AblateConfig, ConfigError, build_config
from calora_ray.selection import spearman, top_k_overlap

from conftest import run_job_main

METRICS = ("alignment_mmd2", "alignment_all_prompts_mmd2", "adherence_mean", "memorisation", "final_loss",
           "lora_params", "num_modules", "param_percent", "label_fidelity")


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


def test_scoring_timesteps_add_ca_lora_trials_at_the_main_k():
    grid = trial_grid(["none", "normalized", "random"], [1, 2], 2.0, ["style", "viewpoint"], [0, 1],
                      timesteps=[1, 81, 201, 1], main_timestep=81)
    ids = [t["trial"] for t in grid]
    extra = [t for t in grid if t["timestep"] is not None]
    assert len(ids) == len(set(ids)) == 2 * (1 + 2 * (2 + 2 + 1))  # per seed: none; per concept 2 k, 2 t, random
    assert sorted(t["trial"] for t in extra if t["seed"] == 0) == [
        "normalized-k2-style-t1-s0", "normalized-k2-style-t201-s0",
        "normalized-k2-viewpoint-t1-s0", "normalized-k2-viewpoint-t201-s0"]
    assert all(t["mode"] == "normalized" and t["k"] == 2.0 for t in extra)
    assert not any("-t81-" in i for i in ids)  # the main timestep is the plain normalized trial
    # none; per concept normalized k1, k2, t1, t201; random per concept: the t trials are Table 5's
    assert [in_table3(t, 2.0) for t in grid if t["seed"] == 0] == [
        True, False, True, False, False, False, True, False, False, True, True]
    assert trial_grid(["normalized"], [2], 2.0, ["style"], [0]) == trial_grid(
        ["normalized"], [2], 2.0, ["style"], [0], timesteps=[81], main_timestep=81)


def test_trials_that_tune_the_same_projections_with_one_seed_are_twins():
    grid = trial_grid(["none", "all", "normalized", "random"], [2, 3], 2.0, ["style", "viewpoint"], [0, 1],
                      timesteps=[1, 81], main_timestep=81)
    names = [f"m{i}" for i in range(56)]
    selections = {"style": ["m1", "m2"], "viewpoint": ["m3", "m1"], "style-t1": ["m2", "m1"], "viewpoint-t1": ["m9", "m8"]}

    def modules(t):
        if t["mode"] in ("none", "all"):
            return None if t["mode"] == "none" else names
        if t["mode"] == "random":
            return ["m7", "m5"] if t["seed"] == 0 else ["m6", "m5"]  # random: the seed's, whatever the concept
        return selections[t["concept"] + ("-t1" if t["timestep"] == 1 else "")]

    twins = trial_twins(grid, {t["trial"]: modules(t) for t in grid})
    for seed in (0, 1):
        assert {k: v for k, v in twins.items() if k.endswith(f"-s{seed}")} == {
            f"normalized-k3-style-s{seed}": f"normalized-k2-style-s{seed}",      # 3 % of 56 = 2 % of 56
            f"normalized-k2-style-t1-s{seed}": f"normalized-k2-style-s{seed}",   # same set, other order
            f"normalized-k3-viewpoint-s{seed}": f"normalized-k2-viewpoint-s{seed}",
            f"random-k2-viewpoint-s{seed}": f"random-k2-style-s{seed}"}          # random ignores the concept
    assert "none-s1" not in twins and "all-s1" not in twins  # another seed is never a twin


def test_ranking_agreement_of_two_scoring_runs():
    a = {"p": 4.0, "q": 3.0, "r": 2.0, "s": 1.0}
    assert spearman(a, a) == 1.0 and spearman(a, {n: -v for n, v in a.items()}) == -1.0
    swapped = {"p": 3.0, "q": 4.0, "r": 2.0, "s": 1.0}  # one swap of neighbours: 1 - 6*2 / (4*15) = 0.8
    assert spearman(a, swapped) == pytest.approx(0.8)
    assert spearman(a, {"p": 1.0, "q": 1.0, "r": 0.0, "s": 0.0}) == pytest.approx(2 / math.sqrt(5))  # ties: mean rank
    assert top_k_overlap(a, swapped, 50) == 1.0 and top_k_overlap(a, swapped, 25) == 0.0
    with pytest.raises(ValueError, match="different modules"):
        spearman(a, {"p": 1.0})

    def report(t, n, seed, scores):
        return {"timestep": t, "num_samples": n, "seed": seed, "scores_normalized": scores}

    main, t1 = report(81, 16, 0, a), report(1, 16, 0, swapped)
    small, reference = report(81, 4, 0, {"p": 1.0, "q": 2.0, "r": 3.0, "s": 4.0}), report(81, 64, 1, a)
    rows = ranking_rows("style", main, {1: t1, 81: main}, {4: small, 16: main}, reference, [25.0, 50.0], 25.0)
    assert [(r["study"], r["timestep"], r["samples"]) for r in rows] == [
        ("timestep", 1, 16), ("samples", 81, 4), ("samples", 81, 16)]
    assert rows[0]["spearman"] == pytest.approx(0.8) and rows[0]["overlap"] == {"25": 0.0, "50": 1.0}
    assert rows[0]["selected"] == ["q"] and rows[0]["against"] == {"timestep": 81, "samples": 16, "seed": 0}
    assert rows[1]["spearman"] == -1.0 and rows[1]["overlap"] == {"25": 0.0, "50": 0.0}
    assert rows[2]["spearman"] == 1.0 and rows[2]["against"] == {"timestep": 81, "samples": 64, "seed": 1}


def test_ablation_config_checks_the_new_settings():
    with pytest.raises(ConfigError, match="--eval-pairs needs --controlnet"):
        build_config(AblateConfig, {"eval_pairs": 10, "controlnet": "none"})
    with pytest.raises(ConfigError, match="--stability-samples"):
        build_config(AblateConfig, {"stability_samples": [4, 0]})
    with pytest.raises(ConfigError, match="--stage downstream needs --eval-pairs"):
        build_config(AblateConfig, {"stage": "downstream"})
    with pytest.raises(ConfigError, match="--timesteps"):
        build_config(AblateConfig, {"timesteps": [1, 1000]})
    assert build_config(AblateConfig, {"stability_samples": []}).stability_samples == []


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


def test_a_small_sweep_reports_resumes_and_reproduces(tmp_path, monkeypatch, controlnet_dir):
    """The CI-sized sweep of the documented one: pretrained and CA-LoRA 2 % on style, the latter also scored at
    a second timestep (Table 5), the ranking-stability runs, and the downstream mIoU of Table 3's two trials;
    one seed. Relative output paths, as a user types them: Tune runs each trial in a directory of its own."""
    import ray

    monkeypatch.chdir(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--model", "tiny", "--modes", "none", "normalized", "--ks", "2", "--concepts", "style", "--seeds", "0",
            "--steps", "4", "--batch-size", "2", "--sample-images", "2", "--sample-steps", "2", "--score-samples", "2",
            "--score-x0-steps", "2", "--timesteps", "81", "1", "--stability-samples", "1", "--reference-images", "8",
            "--controlnet", str(controlnet_dir), "--fidelity-masks", "2", "--eval-pairs", "4", "--eval-iters", "4",
            "--work-dir", "work", "--output", "out", "--address", "local"]
    try:
        code, text = run_job_main("ablate", *args)
        assert code == 0, text
        assert "3 trials, 0 finished before, 3 to run" in text and "report: out/report.md" in text
        records = {p.stem: json.loads(p.read_text()) for p in (out / "trials").glob("*.json")}
        assert set(records) == {"none-s0", "normalized-k2-style-s0", "normalized-k2-style-t1-s0"}
        none, ca = records["none-s0"], records["normalized-k2-style-s0"]
        t1 = records["normalized-k2-style-t1-s0"]
        assert none["num_modules"] == 0 and none["lora_params"] == 0 and none["steps"] is None
        assert ca["num_modules"] == 2 and ca["num_candidates"] == 56 and ca["steps"] == 4 and ca["lora_params"] > 0
        assert 0 < ca["param_percent"] < 1
        for record in records.values():
            assert all(math.isfinite(record[k]) for k in ("alignment_mmd2", "memorisation", "adherence_mean"))
            assert set(record["adherence"]) == {"night", "foggy", "rainy", "snowy"}
            assert 0 <= record["label_fidelity"] <= 1
            assert Image.open(out / "grids" / f"{record['trial']}.png").size[0] >= 256

        # the scoring study: each run kept in work/scores, compared in out/scoring.json
        study = json.loads((out / "scoring.json").read_text())
        assert sorted(p.name for p in (work / "scores").iterdir()) == [
            "style-t1-n2-s0", "style-t81-n1-s0", "style-t81-n2-s0", "style-t81-n8-s1"]
        assert study["reference"] == {"samples": 8, "seed": 1, "timestep": 81}
        assert [(r["study"], r["timestep"], r["samples"]) for r in study["rows"]] == [
            ("timestep", 1, 2), ("samples", 81, 1), ("samples", 81, 2)]
        for row in study["rows"]:
            assert -1 <= row["spearman"] <= 1 and all(0 <= v <= 1 for v in row["overlap"].values())
        # the Table 5 trials tune what their timestep's scoring selected: on the tiny model t=1 selects what
        # t=81 does, so that trial is t=81's record (not trained again). (A Table 5 trial that trains, e.g.
        # t=501, runs the same trial function on another selection; left out to keep this test short.)
        assert ca["timestep"] is None and "same_as" not in ca and ca["modules"] == json.loads(
            (work / "scores" / "style-t81-n2-s0" / "sensitivity.json").read_text())["selected"]
        assert t1["timestep"] == 1 and t1["modules"] == study["rows"][0]["selected"]
        assert set(t1["modules"]) == set(ca["modules"]) and t1["same_as"] == ca["trial"]
        assert {k: t1[k] for k in METRICS} == {k: ca[k] for k in METRICS} and t1["elapsed_s"] == 0
        assert not (work / "runs" / t1["trial"]).exists() and (work / "runs" / ca["trial"]).is_dir()

        # downstream mIoU of Table 3's trials: one shared real-only segmenter, one per trial's generated set
        for record in (none, ca):
            assert 0 <= record["miou_real"] <= 100 and 0 <= record["miou_real_synth"] <= 100
            assert record["miou_delta"] == pytest.approx(record["miou_real_synth"] - record["miou_real"])
            assert record["downstream"]["pairs"] == 4 and record["downstream"]["iters"] == 4
            manifest = json.loads((work / "synthetic" / record["trial"] / "manifest.json").read_text())
            lora = manifest["config"]["lora"]
            assert manifest["num_samples"] == 4 and (lora is None if record is none else
                                                     Path(lora).resolve() == (work / "runs" / ca["trial"]).resolve())
        assert none["miou_real"] == ca["miou_real"]
        assert t1["miou_real_synth"] is None  # Table 5: not measured

        report = (out / "report.md").read_text()
        assert "python jobs/ablate.py --model tiny" in report and "trials finished: 3 of 3" in report
        assert "| CA-LoRA (normalized, top 2 %) | style | 2 |" in report and "What was left out" in report
        assert "## Table 5 (toy world): the scoring timestep" in report
        assert "## Ranking stability: scoring samples" in report
        assert "--timesteps: 201, 481 of the full grid did not run." in report
        assert "| style | 1 |" in report and "| style | 2 (main) | 0 |" in report
        assert Image.open(out / "fig6.png").format == "PNG"
        assert len(json.loads((out / "results.json").read_text())["rows"]) == 3

        # killed before the CA-LoRA trial finished: its record is missing (records are written whole, at the
        # end) and, here, its fine-tuning run too, and so its downstream set and segmenter run (they come after
        # every trial); the rerun runs that trial alone and gets the same numbers
        kept = (out / "trials" / "none-s0.json").read_bytes()
        (out / "trials" / "normalized-k2-style-s0.json").unlink()
        for lost in (work / "runs" / "normalized-k2-style-s0", work / "synthetic" / "normalized-k2-style-s0",
                     work / "evaluate" / "runs" / "real+normalized-k2-style-s0"):
            shutil.rmtree(lost)
        code, text = run_job_main("ablate", *args)
        assert code == 0, text
        assert "3 trials, 2 finished before, 1 to run" in text
        assert (out / "trials" / "none-s0.json").read_bytes() == kept
        again = json.loads((out / "trials" / "normalized-k2-style-s0.json").read_text())
        assert {k: again[k] for k in METRICS} == {k: ca[k] for k in METRICS}
        assert again["adherence"] == ca["adherence"] and again["modules"] == ca["modules"]
        assert again["miou_real_synth"] == ca["miou_real_synth"]

        code, text = run_job_main("ablate", *args)  # nothing left: no Ray work, the report again
        assert code == 0 and "3 trials, 3 finished before, 0 to run" in text, text
        # a larger grid, reported without running it: what is missing is listed, nothing runs
        code, text = run_job_main("ablate", *args, "--seeds", "0", "1", "--stage", "report")  # the last --seeds wins
        assert code == 0 and "6 trials, 3 finished before, 0 to run" in text, text
        report = (out / "report.md").read_text()
        assert "trials finished: 3 of 6 in the grid" in report and "`none-s1`" in report
        assert "--stage" not in report and not (out / "trials" / "none-s1.json").exists()
        # other settings in the same output would mix incomparable numbers: refused, naming the setting
        other = [("5" if a == "4" and args[i - 1] == "--steps" else a) for i, a in enumerate(args)]
        code, text = run_job_main("ablate", *other)
        assert code == 2 and "was made with steps=4, this run has 5" in text, text
    finally:
        ray.shutdown()
