"""The jobs as a user runs them: `python jobs/score.py ...`, then `python jobs/finetune.py ...`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(job, *args, check=True):
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{job} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs") / "score"
    proc = run("score", "--model", "tiny", "--data", "toy", "--concept", "style", "--top-k-percent", "2",
               "--num-samples", "3", "--x0-steps", "2", "--output", out)
    assert str(out / "sensitivity.json") in proc.stdout
    return out


def test_score_job_writes_report_and_plot(scored):
    report = json.loads((scored / "sensitivity.json").read_text())
    for key in ("concept", "timestep", "num_samples", "top_k_percent", "scores", "selected", "normalized",
                "model", "seed", "x0", "base_prompt", "augmented_prompts", "num_workers"):
        assert key in report, key
    assert report["concept"] == "style" and report["timestep"] == 81 and report["num_samples"] == 3
    assert report["normalized"] is True and report["x0"] == "generated" and report["model"]["model"] == "tiny"
    assert len(report["scores"]) == report["num_candidates"] == 56
    assert len(report["selected"]) == 2  # ceil(2 % of 56)
    best = sorted(report["scores"], key=lambda n: -report["scores"][n])[:2]
    assert report["selected"] == best
    png = Image.open(scored / "sensitivity.png")
    assert png.format == "PNG" and png.size[0] > 500
    assert np.asarray(png.convert("L")).std() > 10  # a drawn plot, not a blank canvas
    assert not [p for p in scored.parent.iterdir() if ".partial-" in p.name]


def test_finetune_job_on_the_selection(scored, tmp_path):
    out = tmp_path / "ft"
    proc = run("finetune", "--model", "tiny", "--data", "toy:target", "--selection", scored / "sensitivity.json",
               "--steps", "3", "--batch-size", "2", "--rank", "4", "--num-images", "4", "--learning-rate", "1e-2", "--output", out)
    assert "pytorch_lora_weights.safetensors" in proc.stdout
    report = json.loads((out / "finetune.json").read_text())
    selected = json.loads((scored / "sensitivity.json").read_text())["selected"]
    assert report["lora_modules"] == sorted(selected) and report["steps"] == 3
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert (out / "loss.csv").read_text().splitlines()[0] == "step,loss,lr,elapsed_s"
    assert Image.open(out / "loss.png").format == "PNG"

    # The stock pipeline built from the same base loads it, and its output changes.
    import torch
    from diffusers import StableDiffusionPipeline  # noqa: F401

    from calora_ray.models import build_tiny

    pipe = build_tiny(0).pipeline()
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("Photorealistic first-person urban street view", num_inference_steps=2, height=64, width=64,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    base = sample()
    pipe.load_lora_weights(str(out))
    assert np.abs(sample() - base).max() > 0


def test_selection_all_is_plain_lora(tmp_path):
    out = tmp_path / "all"
    run("finetune", "--selection", "all", "--steps", "1", "--batch-size", "1", "--rank", "2",
        "--num-images", "2", "--output", out)
    report = json.loads((out / "finetune.json").read_text())
    assert report["num_modules"] == report["num_candidates"] == 56 == len(report["lora_modules"])


def test_help_explains_flags():
    proc = run("score", "--help")
    assert "--top-k-percent" in proc.stdout and "--selection-mode" in proc.stdout and "paper" in proc.stdout
    proc = run("finetune", "--help")
    assert "--selection" in proc.stdout and "diffusers format" in proc.stdout


def bad_cityscapes(root: Path) -> Path:
    """A Cityscapes-layout dir whose one label map holds ids 40 and 50 (not Cityscapes labelIds)."""
    img_dir = root / "leftImg8bit" / "train" / "aachen"
    gt_dir = root / "gtFine" / "train" / "aachen"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(img_dir / "aachen_000000_000019_leftImg8bit.png")
    label = np.full((64, 128), 7, np.uint8)
    label[:4, :4] = 40
    Image.fromarray(label).save(gt_dir / "aachen_000000_000019_gtFine_labelIds.png")
    return root


@pytest.mark.parametrize("case", ["unknown_concept", "k_zero", "k_too_big", "foreign_selection", "missing_data",
                                  "unknown_model"])
def test_bad_input_is_a_clear_error_and_leaves_no_output(tmp_path, case):
    out = tmp_path / "out"
    if case == "unknown_concept":
        proc = run("score", "--concept", "weathr", "--output", out, check=False)
        expected = "unknown concept 'weathr'"
    elif case == "k_zero":
        proc = run("score", "--top-k-percent", "0", "--output", out, check=False)
        expected = "--top-k-percent must be in (0, 100]"
    elif case == "k_too_big":
        proc = run("score", "--top-k-percent", "101", "--output", out, check=False)
        expected = "--top-k-percent must be in (0, 100]"
    elif case == "foreign_selection":
        sel = tmp_path / "sensitivity.json"
        sel.write_text(json.dumps({"selected": ["mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
                                                "up_blocks.9.attn1.to_q"]}))
        proc = run("finetune", "--selection", sel, "--steps", "1", "--output", out, check=False)
        expected = "up_blocks.9.attn1.to_q"
    elif case == "missing_data":
        proc = run("finetune", "--data", tmp_path / "no-such-dir", "--steps", "1", "--output", out, check=False)
        expected = "no-such-dir"
    else:
        proc = run("score", "--model", str(tmp_path / "not-a-model"), "--output", out, check=False)
        expected = "not a local directory"
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_bad_label_ids_name_the_file(tmp_path):
    data = bad_cityscapes(tmp_path / "cityscapes")
    out = tmp_path / "out"
    proc = run("finetune", "--data", data, "--steps", "1", "--output", out, check=False)
    assert proc.returncode == 2
    assert "aachen_000000_000019_gtFine_labelIds.png" in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_existing_output_is_kept_without_overwrite(scored):
    before = (scored / "sensitivity.json").read_bytes()
    proc = run("score", "--num-samples", "1", "--output", scored, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (scored / "sensitivity.json").read_bytes() == before


def test_finetune_refuses_a_directory_that_is_not_a_run(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run("finetune", "--steps", "1", "--output", out, check=False)
    assert proc.returncode == 2 and "not a calora_ray fine-tuning run" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
