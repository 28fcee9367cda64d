"""jobs/measure.py: how good are generated samples? (the paper's metrics, in the toy world)

    prompt adherence   per attribute (style, viewpoint, condition): the fraction of samples whose
                       probe prediction matches what the prompt asked (the toy CLIP-score)
    domain alignment   kernel MMD between the probe features of the samples and of a reference set
                       (the toy CMMD; lower = closer to the reference domain)
    memorisation       mean distance of each sample to its nearest training image (pixels in [0, 1],
                       RMS over the image: lower = closer to a copy)
    label fidelity     for mask-conditioned samples: mIoU of the probe's segmentation of each image
                       against the mask it was generated from

For real models `--clip MODEL` computes CMMD and CLIP-score with a CLIP model instead of the probe
(the same code path as any from_pretrained; offline without the weights it fails naming them).

Samples are read from a jobs/sample.py output (samples.json + PNGs) or from Parquet shards with
`image` (PNG bytes) and `prompt` columns (and `label`, PNG train ids, for label fidelity): the
format jobs/generate.py writes. Both may live on any fsspec URI.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from . import __version__
from .config import MeasureConfig, SampleConfig, build_config
from .data.labels import CLASS_NAMES, NUM_CLASSES
from .data.png import decode_image, decode_label_png
from .datasets import TOY_SOURCES, open_dataset
from .errors import UserFileNotFoundError, UserValueError
from .metrics import adherence, confusion_matrix, kernel_mmd, mean_iou, nearest_distances
from .models import ModelLoadError
from .probe import ATTRIBUTES, load_probe
from .sampling import run_sampling
from .shards import parquet_files, read_table, url_to_fs
from .toyworld.world import BASE_PROMPTS, CONDITION_PHRASES, parse_caption

CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0   # CMMD (Jayasumana et al. 2024): RBF sigma 10 on CLIP embeddings, x1000


@dataclass
class SampleSet:
    """Generated images (N, H, W, 3) uint8 of one size, their prompts, and masks (N, H, W) where known."""

    images: np.ndarray
    prompts: list[str]
    labels: np.ndarray | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading samples


def read_samples(uri: str, max_samples: int | None = None) -> SampleSet:
    """A jobs/sample.py directory (samples.json) or Parquet shards (*.parquet under uri, or one file)."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        raise UserFileNotFoundError(f"--samples {uri}: does not exist")
    if fs.isdir(path) and fs.exists(posixpath.join(path, "samples.json")):
        record = json.loads(fs.cat_file(posixpath.join(path, "samples.json")))
        entries = record["images"][:max_samples]
        images = [decode_image(fs.cat_file(posixpath.join(path, e["file"])), f"{uri}/{e['file']}", "RGB")
                  for e in entries]
        prompts = [e["prompt"] for e in entries]
        meta = {k: record.get(k) for k in ("model", "lora", "lora_sha256")}
        return SampleSet(_stack(images, uri), prompts, None, uri, meta)
    _, files = parquet_files(uri)
    if not files:
        raise UserValueError(f"--samples {uri}: neither a jobs/sample.py output (samples.json) nor Parquet shards")
    table = read_table(uri, max_rows=max_samples)
    if "image" not in table.column_names or "prompt" not in table.column_names:
        raise UserValueError(f"--samples {uri}: lacks an 'image' or 'prompt' column "
                             f"(has {', '.join(table.column_names)})")
    cols = table.to_pydict()
    ids = cols.get("sample_id") or [f"row {i}" for i in range(table.num_rows)]
    images = [decode_image(data, f"{uri} {sid} image", "RGB") for sid, data in zip(ids, cols["image"])]
    labels = ([decode_label_png(data, f"{uri} {sid} label") for sid, data in zip(ids, cols["label"])]
              if "label" in cols else [])
    models = sorted(set(cols.get("model") or [])) or None
    return SampleSet(_stack(images, uri), cols["prompt"], _stack(labels, uri) if labels else None, uri,
                     {"model": models})


def _stack(arrays: list[np.ndarray], uri: str) -> np.ndarray:
    if not arrays:
        raise UserValueError(f"--samples {uri}: no samples")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserValueError(f"--samples {uri}: images differ in size ({sorted(shapes)[:3]}); measure one size at a time")
    return np.stack(arrays)


def _is_sample_output(source: str) -> bool:
    """A URI, a .parquet file, or a directory holding samples.json or Parquet shards."""
    p = Path(source)
    return ("://" in source or p.suffix == ".parquet"
            or p.is_dir() and ((p / "samples.json").is_file() or any(p.rglob("*.parquet"))))


def read_reference(source: str, split: str, num_images: int, resolution: int) -> np.ndarray:
    """(N, r, r, 3) uint8 reference / training images: a dataset source (toy:…, a Cityscapes-layout
    directory; its `split`) or samples (Parquet shards, a jobs/sample.py output; any fsspec URI)."""
    if source in TOY_SOURCES or not _is_sample_output(source):
        dataset = open_dataset(source, split=split, num_images=num_images if source in TOY_SOURCES else None,
                               resolution=resolution)
        return np.stack([dataset[i]["image"] for i in range(min(num_images, len(dataset)))])
    return _resize(read_samples(source, num_images).images, resolution)


# ----------------------------------------------------------------------------- the metrics


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
    if images.shape[1:3] == (resolution, resolution):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC)) for im in images])


def _pixels(images: np.ndarray, resolution: int) -> torch.Tensor:
    """(N, r*r*3) float in [0, 1], scaled by 1/sqrt(r*r*3): Euclidean distance = RMS pixel difference."""
    x = torch.from_numpy(_resize(images, resolution)).float().flatten(1) / 255.0
    return x / x.shape[1] ** 0.5


def probe_metrics(samples: SampleSet, cfg: MeasureConfig) -> dict:
    """Every toy metric the inputs allow, with the probe."""
    probe = load_probe(cfg.probe)
    out = probe.predict(samples.images)
    asked = [parse_caption(p) for p in samples.prompts]
    report: dict = {"probe": {"directory": str(cfg.probe or "default"), "held_out": probe.record.get("held_out")}}

    adh = {}
    for name in ATTRIBUTES:
        wanted = [a[name] for a in asked]
        adh[name] = {"adherence": adherence(list(out[name]), wanted),
                     "samples": sum(w is not None for w in wanted),
                     "by_value": {v: adherence([p for p, w in zip(out[name], wanted) if w == v],
                                               [w for w in wanted if w == v])
                                  for v in sorted({w for w in wanted if w is not None})}}
    report["prompt_adherence"] = adh
    report["predicted_domain"] = {d: float(np.mean(out["domain"] == d)) for d in sorted(set(out["domain"]))}

    if cfg.reference is not None:
        ref = read_reference(cfg.reference, cfg.reference_split, cfg.reference_images, cfg.resolution)
        ref_features = torch.from_numpy(probe.predict(ref)["features"])
        mmd2, sigma = kernel_mmd(torch.from_numpy(out["features"]), ref_features, cfg.kernel_bandwidth)
        report["domain_alignment"] = {"reference": cfg.reference, "split": cfg.reference_split,
                                      "reference_images": len(ref), "kernel_mmd2": mmd2, "bandwidth": sigma,
                                      "space": "probe features"}
    if cfg.train_data is not None:
        train = read_reference(cfg.train_data, "train", cfg.train_images, cfg.resolution)
        dist, index = nearest_distances(_pixels(samples.images, cfg.resolution), _pixels(train, cfg.resolution))
        report["memorisation"] = {"train_data": cfg.train_data, "train_images": len(train),
                                  "mean_nn_rmse": float(dist.mean()), "min_nn_rmse": float(dist.min()),
                                  "nearest_counts": np.bincount(index.numpy(), minlength=len(train)).tolist(),
                                  "space": "pixels in [0, 1], RMS difference"}
    if samples.labels is not None:
        conf = sum(confusion_matrix(s, l, NUM_CLASSES) for s, l in zip(out["segmentation"], samples.labels))
        miou, per_class = mean_iou(conf)
        report["label_fidelity"] = {"miou": miou, "per_class_iou": {
            CLASS_NAMES[i]: (None if np.isnan(v) else float(v)) for i, v in enumerate(per_class)}}
    return report


def clip_metrics(samples: SampleSet, cfg: MeasureConfig) -> dict:
    """CMMD to the reference and CLIP-score to the prompts with a real CLIP model (`--clip`)."""
    try:
        model = CLIPModel.from_pretrained(cfg.clip).eval()
        processor = CLIPProcessor.from_pretrained(cfg.clip)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--clip {cfg.clip}: could not load a CLIP model ({str(exc).splitlines()[0]}); "
                             "pass a local directory with the weights, or a hub id with network access "
                             "(leave --clip out to use the toy-world probe)") from None

    @torch.no_grad()
    def embed_images(images: np.ndarray) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), 32):
            inputs = processor(images=list(images[start:start + 32]), return_tensors="pt")
            rows.append(torch.nn.functional.normalize(model.get_image_features(**inputs), dim=-1))
        return torch.cat(rows)

    image_emb = embed_images(samples.images)
    with torch.no_grad():
        text = processor(text=samples.prompts, return_tensors="pt", padding=True, truncation=True)
        text_emb = torch.nn.functional.normalize(model.get_text_features(**text), dim=-1)
    report = {"clip": cfg.clip, "clip_score": float(100 * (image_emb * text_emb).sum(-1).clamp_min(0).mean())}
    if cfg.reference is not None:
        ref = read_reference(cfg.reference, cfg.reference_split, cfg.reference_images, 224)
        mmd2, _ = kernel_mmd(image_emb, embed_images(ref), CMMD_SIGMA)
        report["cmmd"] = CMMD_SCALE * mmd2
    return report


def run_measure(cfg: MeasureConfig) -> dict:
    """jobs/measure.py: read the samples, compute the metrics, write the JSON report to cfg.output."""
    samples = read_samples(cfg.samples, cfg.max_samples)
    sys.stderr.write(f"measure: {len(samples.images)} samples of {samples.images.shape[2]}x{samples.images.shape[1]} "
                     f"from {cfg.samples}\n")
    report = {"samples": cfg.samples, "num_samples": int(len(samples.images)), **samples.meta}
    report.update(clip_metrics(samples, cfg) if cfg.clip else probe_metrics(samples, cfg))
    report.update({"config": dataclasses.asdict(cfg), "calora_ray_version": __version__})
    fs, path = url_to_fs(cfg.output)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as handle:
        handle.write(json.dumps(report, indent=2) + "\n")
    return report


def summary_lines(report: dict) -> list[str]:
    """What jobs/measure.py prints: one line per metric."""
    lines = []
    for name, a in report.get("prompt_adherence", {}).items():
        if a["adherence"] is not None:
            by = ", ".join(f"{k} {v:.2f}" for k, v in a["by_value"].items() if v is not None)
            lines.append(f"adherence {name:<9} {a['adherence']:.3f}  over {a['samples']} samples ({by})")
    if "domain_alignment" in report:
        d = report["domain_alignment"]
        lines.append(f"kernel MMD^2 to {d['reference']} [{d['split']}]: {d['kernel_mmd2']:.4f} (bandwidth {d['bandwidth']:.3f})")
    if "memorisation" in report:
        m = report["memorisation"]
        lines.append(f"memorisation: mean nearest-training-image RMSE {m['mean_nn_rmse']:.4f} "
                     f"(min {m['min_nn_rmse']:.4f}) over {m['train_images']} images of {m['train_data']}")
    if "label_fidelity" in report:
        lines.append(f"label fidelity: mIoU {report['label_fidelity']['miou']:.3f}")
    if "clip_score" in report:
        lines.append(f"CLIP-score {report['clip_score']:.2f}" + (f", CMMD {report['cmmd']:.3f}" if "cmmd" in report else ""))
    return lines


def measure_model(model: str, output: str, *, num_images: int = 8, steps: int = 25, guidance: float = 4.0,
                  seed: int = 0, lora: str | None = None, probe: str | None = None,
                  reference: str | None = "toy:world", train_data: str | None = "toy:world",
                  train_images: int = 8000) -> dict:
    """A model's quality bars in one call: jobs/sample.py over every style x viewpoint x condition
    prompt of the toy world (num_images each), then jobs/measure.py on the result (output/measure.json)."""
    prompts = [base + phrase for base in BASE_PROMPTS.values() for phrase in CONDITION_PHRASES.values()]
    run_sampling(build_config(SampleConfig, {"model": model, "lora": lora, "prompt": prompts, "num_images": num_images,
                                             "seed": seed, "steps": steps, "guidance": guidance,
                                             "output": output, "overwrite": True}))
    return run_measure(build_config(MeasureConfig, {
        "samples": output, "reference": reference, "reference_split": "val", "train_data": train_data,
        "train_images": train_images, "probe": probe, "output": posixpath.join(output, "measure.json")}))
