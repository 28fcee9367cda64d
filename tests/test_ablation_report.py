"""calora_ray.ablation_report on synthetic trial JSONs (and a synthetic scoring.json) with known values:
grouping over seeds, the mIoU delta over none, Table 3's and Table 5's cells, the ranking-stability table,
the report's files and sections, and clear errors for bad trial and scoring files."""

import json

import pytest
from PIL import Image

from calora_ray.ablation_report import (group_rows, load_scoring, load_trials, miou_vs_none, ranking_table, table3,
                                        table5, write_report)
from calora_ray.errors import UserError


def trial(mode, k, concept, seed, timestep=None, **metrics):
    """A trial record; `timestep` (another scoring timestep than the main one) only when given, as the sweep."""
    name = (f"{mode}" + (f"-k{k:g}" if k is not None else "") + (f"-{concept}" if concept else "")
            + (f"-t{timestep}" if timestep is not None else "") + f"-s{seed}")
    doc = {"trial": name, "mode": mode, "k": k, "concept": concept, "seed": seed,
           "num_modules": 0 if mode == "none" else 2, "num_candidates": 56,
           "lora_params": 0 if mode == "none" else 1792,
           "param_percent": 0.0 if mode == "none" else 0.021, "steps": None if mode == "none" else 600,
           "final_loss": None if mode == "none" else 0.123, "alignment_mmd2": 1.0,
           "adherence": {"night": 1.0, "foggy": 0.5, "rainy": 0.75, "snowy": 1.0}, "adherence_mean": 0.8125,
           "memorisation": 0.12, "label_fidelity": 0.41, "miou_real": 34.7, "miou_real_synth": 30.1,
           "miou_delta": -4.6, "elapsed_s": 312.5, "config": {"rank": 4}}
    if timestep is not None:
        doc["timestep"] = timestep
    doc.update(metrics)
    return doc


def write_trials(directory, trials):
    (directory / "trials").mkdir(parents=True, exist_ok=True)
    for t in trials:
        (directory / "trials" / f"{t['trial']}.json").write_text(json.dumps(t))


@pytest.fixture
def sweep(tmp_path):
    trials = [
        *[trial("normalized", 2.0, "style", s, alignment_mmd2=a, adherence_mean=ad, label_fidelity=lf, miou_delta=d)
          for s, a, ad, lf, d in [(0, 1.0, 0.5, 0.4, -1.0), (1, 2.0, 0.7, None, 1.0), (2, 3.0, 0.9, 0.6, 3.0)]],
        *[trial("normalized", k, "style", s, alignment_mmd2=a) for k in (1.0, 5.0) for s, a in [(0, k), (1, k + 2)]],
        *[trial("normalized", k, "viewpoint", s, alignment_mmd2=0.5 * k + s, label_fidelity=None)
          for k in (1.0, 2.0, 5.0) for s in (0, 1, 2)],
        *[trial("none", None, None, s, alignment_mmd2=4.0, miou_delta=0.0) for s in (0, 1, 2)],
        *[trial("all", None, None, s, alignment_mmd2=0.5 + 0.25 * s, num_modules=56, param_percent=0.6)
          for s in (0, 1, 2)],
        trial("random", 2.0, "style", 0, alignment_mmd2=2.5, miou_delta=None),   # a single-seed group
        *[trial("unnormalized", 2.0, "style", s, alignment_mmd2=1.5, miou_delta=None, label_fidelity=None)
          for s in (0, 1, 2)],
    ]
    write_trials(tmp_path, trials)
    return tmp_path, trials


def row_of(rows, mode, k, concept):
    [row] = [r for r in rows if (r["mode"], r["k"], r["concept"]) == (mode, k, concept)]
    return row


def test_load_and_group_over_seeds(sweep):
    directory, trials = sweep
    loaded = load_trials(directory)
    assert [t["trial"] for t in loaded] == sorted(t["trial"] for t in trials)
    rows = group_rows(loaded)
    assert [r["mode"] for r in rows][:2] == ["none", "all"]             # Table 3's order
    ca = row_of(rows, "normalized", 2.0, "style")
    assert ca["seeds"] == [0, 1, 2] and ca["trials"] == 3
    assert ca["alignment_mmd2"] == {"mean": 2.0, "std": 1.0, "n": 3}
    # seed 1's null label fidelity is skipped: n = 2
    assert ca["label_fidelity"] == {"mean": pytest.approx(0.5), "std": pytest.approx(0.1414213562), "n": 2}
    assert ca["miou_delta"] == {"mean": 1.0, "std": 2.0, "n": 3}
    assert row_of(rows, "normalized", 2.0, "viewpoint")["label_fidelity"] is None   # all null
    assert row_of(rows, "random", 2.0, "style")["alignment_mmd2"] == {"mean": 2.5, "std": 0.0, "n": 1}
    assert row_of(rows, "all", None, None)["num_modules"] == {"mean": 56.0, "std": 0.0, "n": 3}
    json.dumps(rows, allow_nan=False)   # results.json material: plain, finite JSON


def test_table3_cells(sweep):
    directory, _ = sweep
    text = table3(group_rows(load_trials(directory)))
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith("| tuned group | concept | modules | params % | alignment MMD² ↓ |")
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| tuned")]
    assert [line.split(" | ")[0] for line in body] == [
        "| none (pretrained)", "| full LoRA", "| CA-LoRA (normalized, top 2 %)", "| random 2 %",
        "| unnormalized 2 %", "| CA-LoRA (normalized, top 2 %)"]
    ca = body[2]
    assert ("| style | 2 | 0.021 | 2.000 ± 1.000 | 0.70 ± 0.20 | 0.120 ± 0.000 | 0.50 ± 0.14 (n=2) | 30.1 ± 0.0 | "
            "+1.0 ± 2.0 | +0.0 ± 0.0 |") in ca
    random = body[3]
    assert "2.500 (n=1)" in random and "± 0.00" not in random and random.endswith("| — | +0.0 (n=1) |")
    assert "| none (pretrained) | — | 0 | 0.000 | 4.000 ± 0.000 |" in body[0]
    assert "(n=…) marks a cell with fewer than 3 seeds" in text
    assert "normalized, top 1 %" not in text   # only the main k


def test_write_report(sweep):
    directory, trials = sweep
    grid = [t["trial"] for t in trials] + ["normalized-k10-style-s0"]
    (directory / "grid.json").write_text(json.dumps(grid))
    command = "python jobs/ablation.py --output out/ablation --seeds 3 --k 1,2,3,5,10"
    path = write_report(directory, title="Ablation (toy world)", command=command, machine="2 CPU cores, no GPU",
                        run_time_s=3723.4, left_out=["k = 3 and 10 (time)", "segmenter for random/unnormalized"])
    assert path == directory / "report.md"
    report = path.read_text()
    assert report.startswith("# Ablation (toy world)\n")
    assert command in report and "2 CPU cores, no GPU" in report and "3723 s (1:02:03)" in report
    assert f"trials finished: {len(trials)} of {len(grid)} in the grid" in report
    assert "not finished: `normalized-k10-style-s0`" in report
    assert "| tuned group | concept | modules | params % |" in report and "![Fig. 6" in report
    assert "(fig6.png)" in report and "- k = 3 and 10 (time)" in report and "TODO" not in report
    assert sum(line.startswith("| ") for line in report.split("## Every trial")[1].splitlines()) == len(trials) + 1
    with Image.open(directory / "fig6.png") as img:
        img.load()
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 300
    results = json.loads((directory / "results.json").read_text())
    assert results["trials_finished"] == len(trials) and results["not_finished"] == ["normalized-k10-style-s0"]
    assert row_of(results["rows"], "normalized", 2.0, "style")["alignment_mmd2"]["std"] == 1.0
    # no timestep trials and no scoring.json: neither new section
    assert "## Table 5" not in report and "## Ranking stability" not in report and results["scoring"] is None
    assert results["main_timestep"] == 81


def test_report_without_grid_or_measurements(tmp_path):
    write_trials(tmp_path, [trial("none", None, None, 0, alignment_mmd2=None, adherence_mean=None,
                                  label_fidelity=None, memorisation=None, miou_delta=None)])
    report = write_report(tmp_path, title="t", command="c", machine="m", run_time_s=1.0, left_out=[]).read_text()
    assert "no grid.json" in report and "- nothing" in report
    assert (tmp_path / "fig6.png").stat().st_size > 1000


@pytest.mark.parametrize("content, says", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"trial": "x", "mode": "none"}), "missing keys"),
    (json.dumps(trial("sideways", None, None, 0)), "mode 'sideways'"),
    (json.dumps(trial("none", None, None, 0, alignment_mmd2="low")), "alignment_mmd2"),
    (json.dumps(trial("none", None, None, 0, alignment_mmd2=float("nan"))), "alignment_mmd2"),
    (json.dumps({**trial("none", None, None, 0), "seed": "0"}), "seed an integer"),
    (json.dumps(trial("normalized", 2.0, "style", 0, timestep="1")), "timestep must be an integer or null"),
    (json.dumps(trial("normalized", 2.0, "style", 0, timestep=True)), "timestep must be an integer or null"),
    (json.dumps(trial("normalized", 2.0, "style", 0, modules="a.to_q")), "modules must be a list"),
    (json.dumps(trial("normalized", 2.0, "style", 0, modules=["a.to_q", 3])), "modules must be a list"),
    (json.dumps(trial("normalized", 2.0, "style", 0, miou_real_synth="high")), "miou_real_synth"),
])
def test_bad_trial_file_is_named(tmp_path, content, says):
    write_trials(tmp_path, [trial("all", None, None, 0)])
    bad = tmp_path / "trials" / "broken-trial.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=says) as caught:
        load_trials(tmp_path)
    assert isinstance(caught.value, UserError) and str(bad) in str(caught.value)


def test_missing_trials_dir_and_repeated_seed(tmp_path):
    with pytest.raises(FileNotFoundError, match="trials"):
        load_trials(tmp_path)
    twice = [trial("all", None, None, 0), {**trial("all", None, None, 0), "trial": "all-s0-again"}]
    with pytest.raises(ValueError, match="repeat one seed"):
        group_rows(twice)
    at_t1 = [trial("normalized", 2.0, "style", 0, timestep=1),
             {**trial("normalized", 2.0, "style", 0, timestep=1), "trial": "again"}]
    with pytest.raises(ValueError, match=r"repeat one seed of \(normalized, k=2.0, style, t=1\)"):
        group_rows(at_t1)



# --- the scoring timestep (Table 5), the mIoU delta over none, the ranking's stability (scoring.json) ---

SCORING = {
    "main_timestep": 81, "main_samples": 16, "reference": {"samples": 64, "seed": 1, "timestep": 81}, "ks": [2.0, 10.0],
    "rows": [
        {"concept": "style", "study": "timestep", "timestep": 1, "samples": 16, "seed": 0,
         "against": {"timestep": 81, "samples": 16, "seed": 0},
         "spearman": 0.71, "overlap": {"2": 0.5, "10": 0.67}, "selected": ["a.to_q", "b.to_k"]},
        {"concept": "style", "study": "timestep", "timestep": 500, "samples": 16, "seed": 0,
         "against": {"timestep": 81, "samples": 16, "seed": 0},
         "spearman": 0.2, "overlap": {"2": 0.0, "10": 0.33}, "selected": ["c.to_v", "d.to_out"]},
        *[{"concept": "viewpoint", "study": "timestep", "timestep": 1, "samples": 16, "seed": seed,
           "against": {"timestep": 81, "samples": 16, "seed": seed},
           "spearman": rho, "overlap": {"2": 1.0, "10": 1.0}, "selected": ["a.to_q", "b.to_k"]}
          for seed, rho in [(0, 0.5), (1, 0.7)]],
        {"concept": "style", "study": "samples", "timestep": 81, "samples": 16, "seed": 0,   # listed before n = 4
         "against": {"timestep": 81, "samples": 64, "seed": 1},
         "spearman": 0.8, "overlap": {"2": 1.0, "10": 0.75}, "selected": ["a.to_q", "b.to_k"]},
        {"concept": "style", "study": "samples", "timestep": 81, "samples": 4, "seed": 0,
         "against": {"timestep": 81, "samples": 64, "seed": 1},
         "spearman": 0.55, "overlap": {"2": 0.0, "10": 0.5}, "selected": ["c.to_v", "a.to_q"]}]}


@pytest.fixture
def timestep_sweep(tmp_path):
    """none for seeds 0..2, full LoRA (one null mIoU), CA-LoRA at the main timestep for seeds 0..3 (no none
    trial for seed 3) and CA-LoRA scored at t = 1 (seeds 0 and 5) and t = 20 (seed 0), without mIoU."""
    trials = [
        *[trial("none", None, None, s, miou_real_synth=rs) for s, rs in [(0, 30.0), (1, 31.0), (2, 32.0)]],
        *[trial("all", None, None, s, miou_real_synth=rs) for s, rs in [(0, None), (1, 33.0), (2, 34.0)]],
        *[trial("normalized", 2.0, "style", s, alignment_mmd2=a, miou_real_synth=rs)
          for s, a, rs in [(0, 1.0, 32.0), (1, 2.0, 35.0), (2, 3.0, 38.0), (3, 4.0, 35.0)]],
        *[trial("normalized", 2.0, "style", s, timestep=1, alignment_mmd2=a, label_fidelity=None, miou_real=None,
                miou_real_synth=None, miou_delta=None, modules=["a.to_q", "b.to_k"])
          for s, a in [(0, 5.0), (5, 7.0)]],
        trial("normalized", 2.0, "style", 0, timestep=20, alignment_mmd2=3.0, miou_real=None, miou_real_synth=None,
              miou_delta=None),
    ]
    trials[0]["timestep"] = None   # null is the main timestep, like an absent key
    write_trials(tmp_path, trials)
    return tmp_path, trials


def test_miou_vs_none_and_timestep_groups(timestep_sweep):
    directory, trials = timestep_sweep
    loaded = load_trials(directory)
    by_id = dict(zip([t["trial"] for t in loaded], miou_vs_none(loaded)))
    assert by_id["normalized-k2-style-s0"] == 2.0 and by_id["normalized-k2-style-s2"] == 6.0
    assert by_id["normalized-k2-style-s3"] is None      # no none trial with seed 3
    assert by_id["all-s0"] is None and by_id["none-s0"] is None   # null real+synth; none is the reference
    rows = group_rows(loaded)
    ca = [r for r in rows if (r["mode"], r["concept"]) == ("normalized", "style")]
    assert [r["timestep"] for r in ca] == [None, 1, 20]   # the main timestep first
    main, t1, _ = ca
    assert main["seeds"] == [0, 1, 2, 3] and main["trials"] == 4   # t = 1's seed 0 and 5 stay apart
    assert main["miou_vs_none"] == {"mean": 4.0, "std": 2.0, "n": 3}   # +2, +4, +6; seed 3: null
    assert main["miou_real_synth"] == {"mean": 35.0, "std": pytest.approx(6 ** 0.5), "n": 4}
    assert main["alignment_mmd2"] == {"mean": 2.5, "std": pytest.approx((5 / 3) ** 0.5), "n": 4}
    assert t1["seeds"] == [0, 5] and t1["alignment_mmd2"] == {"mean": 6.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert t1["miou_vs_none"] is None and t1["miou_delta"] is None
    assert row_of(rows, "all", None, None)["miou_vs_none"] == {"mean": 2.0, "std": 0.0, "n": 2}  # 33-31, 34-32
    assert row_of(rows, "none", None, None)["miou_vs_none"] is None
    assert row_of(rows, "none", None, None)["timestep"] is None
    json.dumps(rows, allow_nan=False)


def test_table3_miou_columns_and_main_timestep_only(timestep_sweep):
    directory, _ = timestep_sweep
    text = table3(group_rows(load_trials(directory)))
    lines = text.splitlines()
    assert lines[0] == ("| tuned group | concept | modules | params % | alignment MMD² ↓ | adherence ↑ | "
                        "memorisation distance ↑ | label fidelity ↑ | mIoU real+synth ↑ | mIoU Δ vs real only ↑ | "
                        "mIoU Δ vs none ↑ |")
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| tuned")]
    assert body == [
        "| none (pretrained) | — | 0 | 0.000 | 1.000 ± 0.000 (n=3) | 0.81 ± 0.00 (n=3) | 0.120 ± 0.000 (n=3) | "
        "0.41 ± 0.00 (n=3) | 31.0 ± 1.0 (n=3) | -4.6 ± 0.0 (n=3) | — |",
        "| full LoRA | — | 2 | 0.021 | 1.000 ± 0.000 (n=3) | 0.81 ± 0.00 (n=3) | 0.120 ± 0.000 (n=3) | "
        "0.41 ± 0.00 (n=3) | 33.5 ± 0.7 (n=2) | -4.6 ± 0.0 (n=3) | +2.0 ± 0.0 (n=2) |",
        "| CA-LoRA (normalized, top 2 %) | style | 2 | 0.021 | 2.500 ± 1.291 | 0.81 ± 0.00 | 0.120 ± 0.000 | "
        "0.41 ± 0.00 | 35.0 ± 2.4 | -4.6 ± 0.0 | +4.0 ± 2.0 (n=3) |"]   # no t = 1 or t = 20 row
    assert "Δ vs none subtracts real+synth of the none (pretrained) trial with the same seed" in text


def test_table5(timestep_sweep):
    directory, _ = timestep_sweep
    text = table5(group_rows(load_trials(directory)), SCORING, 2.0, 81)
    print(text)
    lines = text.splitlines()
    assert lines[0] == ("| concept | t | Spearman vs t = 81 | top-2 % overlap with t = 81 | alignment MMD² ↓ | "
                        "adherence ↑ | memorisation distance ↑ | label fidelity ↑ | mIoU Δ vs real only ↑ |")
    assert lines[2:8] == [
        "| style | 81 (main) | 1.00 | 1.00 | 2.500 ± 1.291 | 0.81 ± 0.00 | 0.120 ± 0.000 | 0.41 ± 0.00 | -4.6 ± 0.0 |",
        "| style | 1 | 0.71 | 0.50 | 6.000 ± 1.414 (n=2) | 0.81 ± 0.00 (n=2) | 0.120 ± 0.000 (n=2) | — | — |",
        "| style | 20 | — | — | 3.000 (n=1) | 0.81 (n=1) | 0.120 (n=1) | 0.41 (n=1) | — |",   # trials, no scoring row
        "| style | 500 | 0.20 | 0.00 | — | — | — | — | — |",                                  # scoring row, no trials
        "| viewpoint | 81 (main) | 1.00 | 1.00 | — | — | — | — | — |",
        "| viewpoint | 1 | 0.60 ± 0.14 (n=2) | 1.00 ± 0.00 (n=2) | — | — | — | — | — |"]
    assert lines[8] == "" and "trains exactly the same projections" in lines[9] and len(lines) == 10
    # without scoring.json: the trials' timesteps only, agreement unknown
    alone = table5(group_rows(load_trials(directory)), None, 2.0, 81).splitlines()
    assert alone[2:5] == [lines[2], "| style | 1 | — | — | 6.000 ± 1.414 (n=2) | 0.81 ± 0.00 (n=2) | "
                                    "0.120 ± 0.000 (n=2) | — | — |", lines[4]]


def test_ranking_table():
    text = ranking_table(SCORING, 2.0)
    lines = text.splitlines()
    assert lines[:4] == [
        "| concept | samples n | seed | Spearman vs reference | top-2 % overlap | top-10 % overlap |",
        "|---|---|---|---|---|---|",
        "| style | 4 | 0 | 0.55 | 0.00 | 0.50 |",
        "| style | 16 (main) | 0 | 0.80 | 1.00 | 0.75 |"]
    assert "reference run (n = 64 samples, seed 1, t = 81)" in text and "share no samples" in text
    # a k outside scoring["ks"] gets its column, unknown
    assert ranking_table(SCORING, 5.0).splitlines()[2] == "| style | 4 | 0 | 0.55 | 0.00 | — | 0.50 |"


def test_write_report_with_scoring(timestep_sweep):
    directory, trials = timestep_sweep
    (directory / "scoring.json").write_text(json.dumps(SCORING))
    report = write_report(directory, title="t", command="c", machine="m", run_time_s=1.0, left_out=[]).read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings == ["## Table 3 (toy world): selection modes at k = 2 %", "## Fig. 6 (toy world): CA-LoRA against k",
                        "## Table 5 (toy world): the scoring timestep", "## Ranking stability: scoring samples",
                        "## Every trial", "## What was left out"]
    assert "| style | 1 | 0.71 | 0.50 | 6.000 ± 1.414 (n=2) |" in report
    assert "| style | 4 | 0 | 0.55 | 0.00 | 0.50 |" in report
    every = [line for line in report.split("## Every trial")[1].splitlines() if line.startswith("| ")]
    assert "| trial | mode | concept | seed | k | t | modules |" in every[0]
    assert [line for line in every if line.startswith("| normalized-k2-style-t1-s5 |")][0].startswith(
        "| normalized-k2-style-t1-s5 | normalized | style | 5 | 2 | 1 | 2 |")
    assert [line for line in every if line.startswith("| none-s0 |")][0].startswith("| none-s0 | none | — | 0 | — | — |")
    assert sum(line.startswith("| ") for line in every) == len(trials) + 1
    results = json.loads((directory / "results.json").read_text())
    assert results["scoring"] == SCORING and results["main_timestep"] == 81
    assert row_of([r for r in results["rows"] if r["timestep"] is None], "normalized", 2.0, "style")[
        "miou_vs_none"] == {"mean": 4.0, "std": 2.0, "n": 3}


def test_write_report_ranking_without_timesteps(sweep):
    directory, _ = sweep                 # no timestep trials; scoring.json with samples rows only
    (directory / "scoring.json").write_text(json.dumps({**SCORING, "rows": SCORING["rows"][4:]}))
    report = write_report(directory, title="t", command="c", machine="m", run_time_s=1.0, left_out=[]).read_text()
    assert "## Ranking stability: scoring samples" in report and "## Table 5" not in report


def test_write_report_timesteps_without_scoring(timestep_sweep):
    directory, _ = timestep_sweep        # timestep trials, no scoring.json; the main timestep given
    report = write_report(directory, title="t", command="c", machine="m", run_time_s=1.0, left_out=[],
                          timestep=100).read_text()
    assert "## Table 5 (toy world): the scoring timestep" in report and "## Ranking stability" not in report
    assert "| concept | t | Spearman vs t = 100 |" in report and "| style | 100 (main) | 1.00 | 1.00 | 2.500" in report
    results = json.loads((directory / "results.json").read_text())
    assert results["scoring"] is None and results["main_timestep"] == 100


def _bad_row(**change):
    return {**SCORING, "rows": [{**SCORING["rows"][0], **change}]}


@pytest.mark.parametrize("content, says", [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    (json.dumps({k: v for k, v in SCORING.items() if k != "rows"}), r"missing keys \['rows'\]"),
    (json.dumps({**SCORING, "reference": {"samples": 64, "seed": 1}}), r"reference: missing keys \['timestep'\]"),
    (json.dumps({**SCORING, "rows": [{k: v for k, v in SCORING["rows"][0].items() if k != "overlap"}]}),
     r"rows\[0\]: missing keys \['overlap'\]"),
    (json.dumps(_bad_row(study="seeds")), "study 'timestep' or 'samples'"),
    (json.dumps(_bad_row(timestep="1")), r"rows\[0\]: \['timestep'\] must be integers"),
    (json.dumps(_bad_row(overlap={"2": 1.5})), "overlap must map k to a fraction"),
    (json.dumps(_bad_row(spearman="high")), "spearman must be a number"),
    (json.dumps(_bad_row(selected="a.to_q")), "selected must be a list"),
])
def test_bad_scoring_file_is_named(sweep, content, says):
    directory, _ = sweep
    bad = directory / "scoring.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=says) as caught:
        load_scoring(directory)
    assert isinstance(caught.value, UserError) and str(bad) in str(caught.value)
    with pytest.raises(UserError, match=says):   # the report stops on it too
        write_report(directory, title="t", command="c", machine="m", run_time_s=1.0, left_out=[])
