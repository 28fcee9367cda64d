"""jobs/pretrain_toy.py at a tiny scale: layout, stock loading, resume, errors (the real run is ~90 min)."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_job_main
from calora_ray.config import ConfigError, PretrainConfig, build_config, parse_config
from calora_ray.toyworld.pretrain import DIFFUSERS_PARTS, architecture, build_toy_sd, num_parameters, prepare_output

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Sketch of urban street in top-down view at night"
# A few images at 32x32, narrow widths, a handful of steps per phase, one interruption at UNet step 2.
TINY = ["--num-images", "16", "--val-images", "4", "--resolution", "32", "--vae-channels", "8", "16", "16",
        "--unet-channels", "16", "32", "32", "--text-width", "16", "--vae-steps", "3", "--unet-steps", "4",
        "--vae-batch-size", "4", "--unet-batch-size", "4", "--warmup-steps", "2", "--log-every", "1",
        "--sample-images", "1", "--sample-steps", "1", "--simulate-interrupt-at-step", "2"]


def run_job(*argv) -> tuple[int, str]:
    return run_job_main("pretrain_toy", *argv)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, interrupted at UNet step 2 and then resumed by the same command: (dir, logs)."""
    out = tmp_path_factory.mktemp("pretrain") / "toy-sd"
    code, first = run_job(*TINY, "--output", out)
    assert code == 130, first
    assert "interrupted at step 2" in first
    assert (out / "checkpoint.safetensors").is_file() and not (out / "model_index.json").exists()
    assert [r["step"] for r in _rows(out / "logs" / "unet" / "loss.csv")] == ["1", "2"]
    code, second = run_job(*TINY, "--output", out)
    assert code == 0, second
    return out, first, second


def test_resume_continues_the_step_counter(trained):
    out, _, second = trained
    assert "resuming from" in second and "vae step 3, unet step 2" in second
    assert [r["step"] for r in _rows(out / "logs" / "unet" / "loss.csv")] == ["1", "2", "3", "4"]
    assert [r["step"] for r in _rows(out / "logs" / "vae" / "loss.csv")] == ["1", "2", "3"]
    report = json.loads((out / "pretrain.json").read_text())
    assert report["steps"] == {"vae": 3, "unet": 4}
    # The same command once more: complete, nothing to redo.
    code, third = run_job(*TINY, "--output", out)
    assert code == 0 and "nothing to do" in third, third
    assert len(_rows(out / "logs" / "unet" / "loss.csv")) == 4


def test_standard_layout_and_reports(trained):
    out, _, _ = trained
    for part in DIFFUSERS_PARTS:
        assert (out / part).exists(), part
    assert list((out / "unet").glob("*.safetensors")) and list((out / "vae").glob("*.safetensors"))
    assert list((out / "text_encoder").glob("*.safetensors"))
    assert "checkpoint.safetensors" in (out / ".gitignore").read_text().split()
    report = json.loads((out / "pretrain.json").read_text())
    for key in ("wall_s", "final_loss", "vae_psnr_db", "latent_scaling_factor", "parameters", "safetensors_bytes",
                "command", "config"):
        assert key in report, key
    assert report["command"].startswith("python jobs/pretrain_toy.py") and "--simulate-interrupt-at-step" in report["command"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "PSNR" in card and report["command"] in card and "samples.png" in card
    assert "not guaranteed to equal an uninterrupted" in " ".join(card.split())
    grid = Image.open(out / "samples.png")
    assert grid.format == "PNG" and np.asarray(grid.convert("L")).std() > 5
    assert len(report["sample_prompts"]) == 20  # 4 style x viewpoint, clear + 4 conditions
    for phase in ("vae", "unet"):
        assert Image.open(out / "logs" / phase / "loss.png").format == "PNG"


def test_stock_pipeline_loads_offline(trained, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    def no_network(*args, **kwargs):
        raise AssertionError("network access while loading a local model")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    sc = pipe.scheduler.config
    assert (sc.prediction_type, sc.beta_schedule, sc.timestep_spacing, sc.clip_sample) == \
        ("v_prediction", "squaredcos_cap_v2", "trailing", False)
    report = json.loads((out / "pretrain.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(report["latent_scaling_factor"])
    image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]  # default output_type
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_load_components_like_any_model(trained):
    from calora_ray.models import encode_images, encode_prompts, load_components

    out, _, _ = trained
    c = load_components(str(out))
    assert c.vae_scale_factor == 4 and c.unet.config.sample_size == 8 and not c.is_sdxl
    assert c.noise_scheduler.config.prediction_type == "v_prediction"
    assert c.unet.dtype == c.text_encoder.dtype == c.vae.dtype == torch.float32
    cond = encode_prompts(c, [PROMPT, ""], 32, 32)
    assert cond["encoder_hidden_states"].shape == (2, 77, 16)
    latents = encode_images(c, np.zeros((1, 32, 32, 3), np.uint8), torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 8, 8)


def test_tokenizer_round_trips(trained):
    from transformers import AutoTokenizer

    from calora_ray.datasets import open_dataset
    from calora_ray.models import build_tokenizer
    from calora_ray.toyworld.pretrain import sample_prompts

    out, _, _ = trained
    loaded = AutoTokenizer.from_pretrained(out / "tokenizer")
    built = build_tokenizer()
    world = open_dataset("toy:world", num_images=40, resolution=32)
    captions = [world[i]["caption"] for i in range(len(world))] + sample_prompts() + [""]
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert loaded(captions, **kw).input_ids == built(captions, **kw).input_ids
    words = {w for cap in captions for w in cap.lower().replace(",", " ").replace("-", " ").split()}
    assert all(len(loaded(w).input_ids) == 3 for w in words)  # <start> word <end>: every word is one token


def test_default_architecture_is_toy_sd_size():
    c = build_toy_sd(**architecture(PretrainConfig()), seed=0)
    assert 6e6 <= num_parameters(c.unet) <= 7e6
    total_bytes = 4 * sum(num_parameters(m) for m in (c.unet, c.vae, c.text_encoder))
    assert total_bytes <= 30e6  # fp32 safetensors
    assert c.unet.config.cross_attention_dim == 64 and c.unet.config.sample_size == 16
    assert c.unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert c.vae_scale_factor == 4 and c.text_encoder.config.num_hidden_layers == 2
    assert c.text_encoder.config.hidden_size == 64


def test_committed_config_fits_the_budget():
    cfg = parse_config(PretrainConfig, ["--config", str(ROOT / "jobs" / "configs" / "toy-sd.yaml")], job="pretrain_toy")
    assert cfg.output == "models/toy-sd" and cfg.resolution == 64
    assert architecture(cfg) == architecture(PretrainConfig())
    # Step budgets (so a rerun reproduces the weights), sized by the step times measured on 2 idle
    # cores: VAE 0.76 s, UNet + text encoder 1.06 s at the committed batch sizes.
    assert cfg.vae_minutes is None and cfg.unet_minutes is None
    assert cfg.vae_steps * 0.76 + cfg.unet_steps * 1.06 <= 85 * 60  # + rendering, encoding, samples: ~90 min


def test_optional_numbers_can_be_unset_on_the_command_line():
    cfg = parse_config(PretrainConfig, ["--vae-minutes", "none", "--vae-steps", "5", "--unet-minutes", "null",
                                        "--unet-steps", "7"], job="pretrain_toy")
    assert (cfg.vae_minutes, cfg.vae_steps, cfg.unet_minutes, cfg.unet_steps) == (None, 5, None, 7)
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--vae-minutes", "soon"], job="pretrain_toy")


def test_bad_output_is_a_clear_error(tmp_path, trained):
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, log = run_job(*TINY, "--output", other)
    assert code == 2 and "not a pretrain_toy run" in log and "Traceback" not in log
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, log = run_job(*TINY, "--output", a_file)
    assert code == 2 and "not a directory" in log
    code, log = run_job(*TINY, "--output", other, "--overwrite", "--unet-steps", "1", "--vae-steps", "1")
    assert code == 0 and not (other / "notes.txt").exists() and (other / "model_index.json").is_file(), log
    out, _, _ = trained  # the finished run, continued with another seed: refused, left as it was
    code, log = run_job(*TINY, "--output", out, "--seed", "1")
    assert code == 2 and "different configuration (seed differ)" in log


class CodeOnLoad:
    """Pickles to a call of exec: loading it with an unrestricted unpickler writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """A pickle planted as the checkpoint (or as an older version's checkpoint.pt) is refused, naming
    the file, and runs nothing."""
    out = tmp_path / "toy-sd"
    output = prepare_output(parse_config(PretrainConfig, [*map(str, TINY), "--output", str(out)], job="pretrain_toy"))
    marker = tmp_path / "code-ran"
    for name, message in (("checkpoint.safetensors", "not a calora_ray training state"),
                          ("checkpoint.pt", "a training state in the pickle format of older calora_ray versions")):
        torch.save({"format": 1, "vae_phase": CodeOnLoad(marker)}, output / name)
        code, log = run_job(*TINY, "--output", out)
        assert code == 2 and f"{output / name}: {message}" in log and "Traceback" not in log, log
        assert not marker.exists()
        (output / name).unlink()


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "36"], "--resolution 36 must be a multiple of 16"),
    (["--caption-dropout", "1.5"], "--caption-dropout must be in [0, 1)"),
    (["--vae-channels", "12", "16"], "--vae-channels needs"),
    (["--unet-minutes", "0"], "--unet-minutes must be > 0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
])
def test_bad_config_values(flags, message, tmp_path):
    code, log = run_job("--output", tmp_path / "x", *flags)
    assert code == 2 and message in log, log
    assert not (tmp_path / "x").exists()


def test_a_phase_needs_a_budget():
    with pytest.raises(ConfigError, match="--vae-minutes and --vae-steps are both unset"):
        build_config(PretrainConfig, {"vae_minutes": None})
