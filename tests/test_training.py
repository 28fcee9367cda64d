"""CA-LoRA fine-tuning: the loop lowers the diffusion loss and is reproducible from its seed."""

import re
import shutil

import numpy as np
import pytest
import torch

from calora_ray.config import TrainingConfig
from calora_ray.datasets import open_dataset
from calora_ray.errors import UserError
from calora_ray.lora import lora_state_dict
from calora_ray.models import build_tiny
from calora_ray.sensitivity import find_candidates
from calora_ray.training import STATE_FILE, TrainingStateError, captions_for, lora_task, train

CAPTION = "Photorealistic first-person urban street view"


def lora_model(seed=0, modules=None):
    comps = build_tiny(0)
    return lora_task(comps, modules or list(find_candidates(comps.unet)), rank=4, alpha=4, caption=CAPTION, seed=seed)


def settings(**kw):
    return TrainingConfig(**{"batch_size": 4, "learning_rate": 1e-3, "log_every": 1, **kw})


def test_a_few_steps_lower_the_diffusion_loss_on_a_fixed_toy_batch(fixed_batch_loss):
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    task = lora_model()
    before = fixed_batch_loss(task.components, dataset)
    history = train(task, dataset, settings(steps=20, learning_rate=3e-3, log_every=5), device=torch.device("cpu"),
                    quiet=True)
    after = fixed_batch_loss(task.components, dataset)
    assert [h["step"] for h in history] == [1, 5, 10, 15, 20]
    assert after < before * 0.95, (before, after)


def test_same_seed_same_weights_and_losses():
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    runs = []
    for seed in (7, 7, 8):
        task = lora_model(seed=seed)
        hist = train(task, dataset, settings(steps=3, batch_size=2, seed=seed), device=torch.device("cpu"), quiet=True)
        runs.append((hist, lora_state_dict(task.components.unet)))
    (h1, w1), (h2, w2), (h3, w3) = runs
    losses = [[(h["step"], h["loss"], h["lr"]) for h in hist] for hist in (h1, h2, h3)]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    """4 steps, checkpoint at 2, resume from it: the same weights as 4 uninterrupted steps."""
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    kept = {}

    def report(metrics, directory):
        if directory is not None:
            shutil.copytree(directory, tmp_path / f"step{metrics['step']}")
            kept[metrics["step"]] = tmp_path / f"step{metrics['step']}"

    whole = lora_model()
    train(whole, dataset, settings(steps=4, checkpoint_every=2, lr_scheduler="cosine"), device=torch.device("cpu"),
          report=report, quiet=True)
    assert sorted(kept) == [2, 4]
    assert (kept[2] / "pytorch_lora_weights.safetensors").is_file()  # a checkpoint is a loadable adapter too
    resumed = lora_model()
    hist = train(resumed, dataset, settings(steps=4, lr_scheduler="cosine"), device=torch.device("cpu"),
                 resume_from=kept[2], quiet=True)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    a, b = lora_state_dict(whole.components.unet), lora_state_dict(resumed.components.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


class CodeOnLoad:
    """Pickles to a call of exec: loading it with an unrestricted unpickler writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_resume_refuses_a_state_file_that_would_run_code(tmp_path):
    """A checkpoint's state file under a shared --storage-path is input: it is safetensors + JSON,
    and resuming refuses a pickle that would run code, as the state file or as an older version's
    training_state.pt, naming the file and running nothing."""
    dataset = open_dataset("toy:target", num_images=2, resolution=64)
    kept = tmp_path / "checkpoint"

    def report(metrics, directory):
        if directory is not None:
            shutil.copytree(directory, kept)

    def resume():
        train(lora_model(), dataset, settings(steps=2, batch_size=1), device=torch.device("cpu"), resume_from=kept,
              quiet=True)

    train(lora_model(), dataset, settings(steps=1, batch_size=1), device=torch.device("cpu"), report=report,
          quiet=True)
    state_file = kept / STATE_FILE
    assert state_file.is_file()
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "history": CodeOnLoad(marker)}, state_file)  # planted by whoever can write there
    with pytest.raises(TrainingStateError, match=re.escape(f"{state_file}: not a calora_ray training state")) as e:
        resume()
    assert isinstance(e.value, UserError)
    assert not marker.exists()
    state_file.rename(kept / "training_state.pt")  # the pickle state of older versions is refused too
    with pytest.raises(TrainingStateError, match=re.escape(f"{kept / 'training_state.pt'}: a training state in the "
                                                           "pickle format of older calora_ray versions")):
        resume()
    assert not marker.exists()
    # The planted file was live: an unrestricted load runs its code.
    torch.load(kept / "training_state.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def test_state_files_round_trip_without_pickle(tmp_path):
    from calora_ray.training import load_state, save_state

    state = {"step": 3, "history": [{"step": 1, "loss": 0.5, "lr": 1e-3, "elapsed_s": 0.25}], "none": None,
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
                           "param_groups": [{"betas": (0.9, 0.999), "params": [0], "amsgrad": False}]},
             "weights": {"a.b": torch.arange(4, dtype=torch.bfloat16)}}
    save_state(state, tmp_path / STATE_FILE)
    back = load_state(tmp_path / STATE_FILE)
    assert back.keys() == state.keys() and back["history"] == state["history"] and back["none"] is None
    assert list(back["optimizer"]["state"]) == [0] and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2, 2))
    assert torch.equal(back["weights"]["a.b"], state["weights"]["a.b"])
    with pytest.raises(TypeError, match="weights/x: a object"):
        save_state({"weights": {"x": object()}}, tmp_path / "bad.safetensors")


def test_gradient_accumulation_and_checkpointing_run():
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    comps = build_tiny(0)
    task = lora_task(comps, list(find_candidates(comps.unet))[:4], rank=2, alpha=2, caption=CAPTION,
                     gradient_checkpointing=True)
    hist = train(task, dataset, settings(steps=2, batch_size=1, gradient_accumulation_steps=3),
                 device=torch.device("cpu"), quiet=True)
    assert len(hist) == 2 and all(h["loss"] > 0 for h in hist)


def test_only_lora_parameters_change():
    dataset = open_dataset("toy:target", num_images=2, resolution=64)
    selected = ["up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"]
    task = lora_model(modules=selected)
    unet = task.components.unet
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    train(task, dataset, settings(steps=2, batch_size=2, learning_rate=1e-2), device=torch.device("cpu"), quiet=True)
    assert all(torch.equal(p, frozen[n]) for n, p in unet.named_parameters() if "lora_" not in n)
    changed = [n for n, p in unet.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed == [selected[0] + ".lora_B.default.weight"]


def test_captions_with_class_names():
    label = np.full((4, 4), 255, np.uint8)
    label[0] = 0   # road
    label[1] = 13  # car
    label[2] = 10  # sky
    assert captions_for([label], CAPTION, True) == [f"{CAPTION} with road, sky and car"]
    assert captions_for([label], CAPTION, False) == [CAPTION]


def test_tensorboard_logs_and_validation_images(tmp_path):
    from PIL import Image

    dataset = open_dataset("toy:target", num_images=2, resolution=64)
    task = lora_model(modules=["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"])
    train(task, dataset, settings(steps=2, batch_size=1, report_to="tensorboard", validation_every=2,
                                  validation_steps=2, validation_prompts=["Sketch of urban street in top-down view",
                                                                           CAPTION]),
          device=torch.device("cpu"), log_dir=tmp_path, quiet=True)
    import struct

    from tensorboardX.proto.event_pb2 import Event

    (events,) = tmp_path.glob("events.out.tfevents.*")
    data, tags = events.read_bytes(), set()
    while data:  # TFRecord framing: length, crc, payload, crc
        (n,) = struct.unpack("<Q", data[:8])
        event = Event.FromString(data[12:12 + n])
        tags |= {v.tag for v in event.summary.value}
        data = data[16 + n:]
    assert {"train/loss", "train/lr", "train/images_per_s", "validation"} <= tags

    grid = Image.open(tmp_path / "validation" / "step_000002.png")
    assert grid.size[0] == 128 and grid.size[1] > 2 * 128  # a 128-px row per prompt, under its caption
    assert np.asarray(grid.convert("L"))[-128:].std() > 1  # images, not an empty canvas
