"""The toy-world probe: the stand-in for CLIP in the paper's metrics (CLIP is not reachable offline).

A small CNN trained on rendered images only (never on generated samples, never on the target's
held-out split) that predicts, from a 64x64 image,
    style      photorealistic / sketch
    viewpoint  first-person / top-down
    condition  clear / foggy / night / rainy / snowy
    domain     world / target / source   (which toy renderer's look: what the features must tell apart)
and segments the image into the 19 train-id classes; its pooled features (128-d) are the space in
which jobs/measure.py computes the kernel MMD (the toy CMMD).

    probe = load_probe()                     # trains (~2-4 min on 2 cores) and caches when absent
    out = probe.predict(images)              # images: (N, H, W, 3) uint8
    out["condition"], out["features"], out["segmentation"]

Training is seeded and runs in one process, so the cache can always be rebuilt: the weights live
in <venv>/share/calora_ray/probe-v<N> by default (probe.safetensors + probe.json with the held-out
accuracy it reached).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from calora_ray.data.labels import IGNORE_INDEX, NUM_CLASSES
from calora_ray.datasets import open_dataset
from calora_ray.metrics import confusion_matrix, mean_iou
from calora_ray.toyworld.city import DOMAINS as CITY_DOMAINS
from calora_ray.toyworld.world import CONDITIONS, STYLES, VIEWPOINTS

PROBE_VERSION = 1
DOMAINS = ("world", *CITY_DOMAINS)   # ("world", "target", "source")
HEADS: dict[str, tuple[str, ...]] = {"style": STYLES, "viewpoint": VIEWPOINTS, "condition": CONDITIONS,
                                     "domain": DOMAINS}
ATTRIBUTES = ("style", "viewpoint", "condition")   # what a prompt can ask for
WEIGHTS_NAME, RECORD_NAME = "probe.safetensors", "probe.json"


@dataclass(frozen=True)
class ProbeTrainConfig:
    """Everything the probe's weights depend on (the cache is reused only when this matches)."""

    version: int = PROBE_VERSION
    resolution: int = 64
    width: int = 32
    world_images: int = 3200       # toy:world train renders of dataset seed `data_seed` (balanced in blocks of 80)
    target_images: int = 800       # toy:target train renders of dataset seed `data_seed` (not the few-shot set)
    source_images: int = 400
    eval_images: int = 400         # held out: toy:world val renders (dataset seed 0), target/source train seed + 1
    data_seed: int = 5             # toy dataset seed: scenes neither toy-sd's pretraining nor the few-shot set used
    steps: int = 1500
    batch_size: int = 48
    learning_rate: float = 2e-3
    seed: int = 0


def default_probe_dir() -> Path:
    """<venv>/share/calora_ray/probe-v<N> (the venv is what `make` builds, so a clean clone retrains once)."""
    return Path(sys.prefix) / "share" / "calora_ray" / f"probe-v{PROBE_VERSION}"


# ----------------------------------------------------------------------------- the network


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class ProbeNet(nn.Module):
    """Encoder 64 -> 32 -> 16 -> 8 -> 4 (widths w/2, w, 2w, 4w), one 3x3 conv each (kept small: the
    probe trains in minutes on 2 cores). Pooled features (mean and std of the last map, so brightness
    and contrast survive pooling, through a linear layer: 4w-d) feed the heads; a decoder from 8x8 to
    32x32 (skips from 16x16 and 32x32) gives per-pixel class logits (upsampled bilinearly where used)."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.enc1, self.enc2 = _conv(3, w // 2, 2), _conv(w // 2, w, 2)
        self.enc3, self.enc4 = _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2)
        self.feature = nn.Linear(8 * w, 4 * w)
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(values)) for name, values in HEADS.items()})
        self.decoder = nn.Sequential(_conv(2 * w + w, 2 * w, 1), _conv(2 * w, w, 1))
        self.refine = _conv(w + w // 2, w, 1)
        self.classifier = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) in [0, 1] -> {"features": (B, 4w), head name: logits, "segmentation": (B, C, H/2, W/2)}."""
        h1 = self.enc1(x - 0.5)
        h2 = self.enc2(h1)
        h3 = self.enc3(h2)
        h4 = self.enc4(h3)
        pooled = torch.cat([h4.mean(dim=(2, 3)), h4.flatten(2).std(dim=2)], dim=1)
        features = self.feature(pooled)
        out = {"features": features}
        hidden = F.silu(features)
        for name, head in self.heads.items():
            out[name] = head(hidden)
        d = self.decoder(torch.cat([F.interpolate(h3, size=h2.shape[-2:], mode="nearest"), h2], dim=1))
        d = self.refine(torch.cat([F.interpolate(d, size=h1.shape[-2:], mode="nearest"), h1], dim=1))
        out["segmentation"] = self.classifier(d)  # (B, C, H/2, W/2): upsampled where used
        return out


def to_input(images: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, r, r) float in [0, 1] (bilinear, antialiased resize when H, W != r)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x


class Probe:
    """A trained ProbeNet with its training record; predict() is what the metrics use."""

    def __init__(self, net: ProbeNet, config: ProbeTrainConfig, record: dict):
        self.net, self.config, self.record = net.eval(), config, record

    @torch.no_grad()
    def predict(self, images, batch_size: int = 128) -> dict[str, np.ndarray]:
        """images: (N, H, W, 3) uint8 (any H, W). Returns "features" (N, 4w) float32, one (N,) array of
        class names per head, and "segmentation" (N, H, W) uint8 train ids at the input size."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"probe inputs must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        outs: dict[str, list] = {}
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            out = self.net(to_input(chunk, self.config.resolution))
            seg = F.interpolate(out["segmentation"], size=chunk.shape[1:3], mode="bilinear", align_corners=False)
            outs.setdefault("features", []).append(out["features"].numpy().astype(np.float32))
            outs.setdefault("segmentation", []).append(seg.argmax(1).numpy().astype(np.uint8))
            for name, values in HEADS.items():
                outs.setdefault(name, []).append(np.asarray(values, dtype=object)[out[name].argmax(1).numpy()])
        if not outs:
            return {"features": np.zeros((0, 4 * self.config.width), np.float32),
                    "segmentation": np.zeros((0, *images.shape[1:3]), np.uint8),
                    **{name: np.zeros(0, dtype=object) for name in HEADS}}
        return {k: np.concatenate(v) for k, v in outs.items()}


# ----------------------------------------------------------------------------- training data


def render_probe_data(cfg: ProbeTrainConfig, held_out: bool = False) -> dict[str, np.ndarray]:
    """Renders and their targets: images (N, r, r, 3) uint8, labels (N, r, r) uint8, and one int
    array per head (-1 where a head has no target: style/viewpoint/condition of target/source renders).

    Training: toy:world / toy:target / toy:source train renders of dataset seed cfg.data_seed.
    held_out: toy:world val renders (dataset seed 0) and target/source train renders of data_seed + 1
    (the target's val split, the held-out split of the experiments, is never used).
    """
    r = cfg.resolution
    if held_out:
        n = cfg.eval_images
        parts = [("world", "val", 0, n), ("target", "train", cfg.data_seed + 1, n // 4),
                 ("source", "train", cfg.data_seed + 1, n // 4)]
    else:
        parts = [("world", "train", cfg.data_seed, cfg.world_images),
                 ("target", "train", cfg.data_seed, cfg.target_images),
                 ("source", "train", cfg.data_seed, cfg.source_images)]
    images, labels, targets = [], [], {name: [] for name in HEADS}
    for domain, split, seed, n in parts:
        dataset = open_dataset(f"toy:{domain}", split=split, num_images=n, resolution=r, seed=seed)
        for i in range(n):
            item = dataset[i]
            images.append(item["image"])
            labels.append(item["label"])
            targets["domain"].append(DOMAINS.index(domain))
            for name in ATTRIBUTES:
                targets[name].append(HEADS[name].index(item[name]) if domain == "world" else -1)
    return {"images": np.stack(images), "labels": np.stack(labels),
            **{name: np.asarray(v, dtype=np.int64) for name, v in targets.items()}}


def augment(x: torch.Tensor, label: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips (label too), and what generated images do to renders: blur (down- and up-sampling) and
    noise. Never colour changes: brightness and saturation are what the condition and style heads read."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    label = torch.where(flip[:, None, None], label.flip(-1), label)
    blur = torch.rand(b, generator=g) < 0.5
    scale = float(torch.empty(1).uniform_(0.35, 0.75, generator=g))
    small = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
    soft = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    x = torch.where(blur[:, None, None, None], soft, x)
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.04
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1), label


def _losses(out: dict, batch: dict) -> torch.Tensor:
    """Cross-entropy of every head (where it has a target) plus the segmentation's, at half the input
    size (logits upsampled x2, labels subsampled: cheaper than full size, and thin classes survive)."""
    labels = batch["labels"][:, 1::2, 1::2].long()
    logits = F.interpolate(out["segmentation"], size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    for name in HEADS:
        if (batch[name] >= 0).any():
            loss = loss + F.cross_entropy(out[name], batch[name], ignore_index=-1)
    return loss


def evaluate(probe: Probe, data: dict[str, np.ndarray]) -> dict:
    """Held-out accuracy per head (over renders that have the target) and segmentation mIoU."""
    out = probe.predict(data["images"])
    result = {}
    for name, values in HEADS.items():
        keep = data[name] >= 0
        truth = np.asarray(values, dtype=object)[data[name][keep]]
        result[f"{name}_accuracy"] = float((out[name][keep] == truth).mean())
    conf = confusion_matrix(out["segmentation"], data["labels"], NUM_CLASSES)
    result["segmentation_miou"] = mean_iou(conf)[0]
    return result


def train_probe(cfg: ProbeTrainConfig, progress: bool = True) -> tuple[ProbeNet, dict]:
    """Train a ProbeNet from scratch on renders (seeded; one process, one thread). Returns it with its record."""
    threads = torch.get_num_threads()
    # Small tensors: one thread is as fast on an idle machine and does not stall (OpenMP threads
    # waiting on each other) when other work shares the cores, as 2 threads did: 0.8 s vs 0.09 s a step.
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # also when the caller measures under no_grad (the probe trains on first use)
            return _train_probe(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train_probe(cfg: ProbeTrainConfig, progress: bool) -> tuple[ProbeNet, dict]:
    t0 = time.perf_counter()
    data = render_probe_data(cfg)
    render_s = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = ProbeNet(cfg.width)
    images = torch.from_numpy(data["images"])
    tensors = {"labels": torch.from_numpy(data["labels"]),
               **{name: torch.from_numpy(data[name]) for name in HEADS}}
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.learning_rate, total_steps=cfg.steps,
                                                   pct_start=0.1)
    net.train()
    bar = tqdm(range(1, cfg.steps + 1), desc="probe", file=sys.stderr, disable=not progress, mininterval=2)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        pick = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        x, label = augment(to_input(images[pick], cfg.resolution), tensors["labels"][pick], g)
        batch = {"labels": label, **{name: tensors[name][pick] for name in HEADS}}
        loss = _losses(net(x), batch)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix_str(f"loss {float(loss):.3f}")
    net.eval()
    train_s = time.perf_counter() - t0 - render_s
    probe = Probe(net, cfg, {})
    held_out = evaluate(probe, render_probe_data(cfg, held_out=True))
    record = {"config": asdict(cfg), "held_out": held_out, "render_s": round(render_s, 1),
              "train_s": round(train_s, 1), "torch_version": torch.__version__}
    return net, record


def save_probe(net: ProbeNet, record: dict, directory: Path) -> None:
    """Weights and record, each written to a temporary name and renamed (a reader never sees half)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(directory / WEIGHTS_NAME)
    tmp = directory / f".{RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(directory / RECORD_NAME)


def load_probe(directory: str | Path | None = None, config: ProbeTrainConfig | None = None,
               train_if_missing: bool = True, progress: bool = True) -> Probe:
    """The probe cached in `directory` (default: default_probe_dir()), trained and cached first when
    it is absent or was trained with another configuration."""
    cfg = config or ProbeTrainConfig()
    directory = Path(directory) if directory is not None else default_probe_dir()
    record_path, weights_path = directory / RECORD_NAME, directory / WEIGHTS_NAME
    if record_path.is_file() and weights_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("config") == asdict(cfg):
            net = ProbeNet(cfg.width)
            net.load_state_dict(load_file(str(weights_path)))
            return Probe(net, cfg, record)
    if not train_if_missing:
        raise FileNotFoundError(f"no probe trained with this configuration in {directory}")
    sys.stderr.write(f"probe: none cached in {directory}; training one on renders (a few minutes, once)\n")
    net, record = train_probe(cfg, progress=progress)
    save_probe(net, record, directory)
    held = record["held_out"]
    sys.stderr.write("probe: held-out accuracy " + ", ".join(
        f"{name} {held[f'{name}_accuracy']:.3f}" for name in HEADS) + f", mIoU {held['segmentation_miou']:.3f}\n")
    return Probe(net, cfg, record)
