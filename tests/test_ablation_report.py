"""calora_ray.ablation_report on synthetic trial JSONs with known values: grouping over seeds,
Table 3's cells, the report's files, and clear errors for bad trial files."""

import json

import pytest
from PIL import Image

from calora_ray.ablation_report import group_rows, load_trials, table3, write_report
from calora_ray.errors import UserError


def trial(mode, k, concept, seed, **metrics):
    name = f"{mode}" + (f"-k{k:g}" if k is not None else "") + (f"-{concept}" if concept else "") + f"-s{seed}"
    doc = {"trial": name, "mode": mode, "k": k, "concept": concept, "seed": seed,
           "num_modules": 0 if mode == "none" else 2, "num_candidates": 56,
           "lora_params": 0 if mode == "none" else 1792,
           "param_percent": 0.0 if mode == "none" else 0.021, "steps": None if mode == "none" else 600,
           "final_loss": None if mode == "none" else 0.123, "alignment_mmd2": 1.0,
           "adherence": {"night": 1.0, "foggy": 0.5, "rainy": 0.75, "snowy": 1.0}, "adherence_mean": 0.8125,
           "memorisation": 0.12, "label_fidelity": 0.41, "miou_real": 34.7, "miou_real_synth": 30.1,
           "miou_delta": -4.6, "elapsed_s": 312.5, "config": {"rank": 4}}
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
    assert "| style | 2 | 0.021 | 2.000 ± 1.000 | 0.70 ± 0.20 | 0.120 ± 0.000 | 0.50 ± 0.14 (n=2) | +1.0 ± 2.0 |" in ca
    random = body[3]
    assert "2.500 (n=1)" in random and "± 0.00" not in random and random.endswith("| — |")
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
