"""Does a synthetic dataset help a segmenter? mmsegmentation, trained by its own Runner on our data.

The evaluate job's single-process part (jobs/evaluate.py; calora_ray.ray_eval runs it as Ray tasks):

- Datasets registered in mmseg's DATASETS (no fork, no copied mmseg code): `CaloraRealDataset`
  (the toy city `toy:target` / `toy:source`, or a Cityscapes-layout directory: labelIds -> train ids
  with the official table) and `CaloraShardDataset` (Parquet rows with `image` and `label` PNG
  columns: a jobs/generate.py output's committed shards, as `shards.parquet_files` lists them, on
  any fsspec URI). Their data lists hold references only (toy sample index, file paths, shard file
  + row); nothing is decoded until a worker runs the pipeline.
- Transforms registered in mmseg's TRANSFORMS that take the place of LoadImageFromFile and
  LoadAnnotations in any mmseg config's pipelines (mmseg's LoadAnnotations only reads files):
  `LoadCaloraImage` yields a BGR uint8 image, as LoadImageFromFile does (so every mmseg
  transform and the configs' `bgr_to_rgb=True` data preprocessor apply unchanged);
  `LoadCaloraAnnotations` a uint8 train-id map (0..18, 255 = ignore).
- `CaloraMixedSampler` (DATA_SAMPLERS): an infinite sampler over a ConcatDataset whose every
  batch holds a fixed share of each source (1:1 by default), each source reshuffled by its own
  seeded epochs, so the small real set never runs dry before the synthetic one or vice versa
  (mmdetection's MultiSourceSampler is the reference design).
- `CaloraIoUMetric` (METRICS): mmseg's IoUMetric, returning the per-class IoU as well.
- `check_inputs` (every user error before anything is written or trained), `plan_runs`,
  `build_run_config` (the model config + this job's data, schedule, seed, evaluation),
  `train_run` (one run with mmseg's Runner -> its metrics), `write_report` (metrics.json,
  report.md, per_class_iou.png).

Only the evaluate job and its tests import this module: mmsegmentation, mmengine and mmcv are
the optional `seg` extra.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import statistics
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import mmseg
import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.config import Config
from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.hooks import Hook
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmseg.datasets import BaseSegDataset
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATA_SAMPLERS, DATASETS, HOOKS, METRICS, MODELS, TRANSFORMS
from mmseg.utils import register_all_modules
from torch.utils.data import Sampler

from .config import EvaluateConfig, to_dict
from .data.cityscapes import find_pairs, load_pair
from .data.labels import CLASS_NAMES, NUM_CLASSES, PALETTE
from .data.png import decode_image, decode_label_png
from .datasets import TOY_SOURCES, open_dataset
from .errors import UserError, UserFileNotFoundError
from .masks import MaskRef, check_masks
from .outputs import atomic_write_text
from .shards import RowReader, file_rows, parquet_files
from .toyworld.splits import TOY_SEED_STRIDE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

register_all_modules(init_default_scope=False)  # fill mmseg's registries (models, transforms, ...)

SEG_CONFIG_DIR = Path(__file__).with_name("seg_configs")
MMSEG_CONFIG_DIR = Path(mmseg.__file__).parent / ".mim" / "configs"  # mmseg's configs, shipped in its wheel
METAINFO = {"classes": CLASS_NAMES, "palette": PALETTE[:NUM_CLASSES].tolist()}
IMAGE_LOADERS = ("LoadImageFromFile",)  # the pipeline steps our loaders replace
LABEL_LOADERS = ("LoadAnnotations",)
REAL_SET = "real"


class EvaluationInputError(UserError, ValueError):
    """An evaluate input (a set, a label, a model config) that cannot be used; names it."""


# ----------------------------------------------------------------------------- references


def real_refs(source: str, split: str, num_images: int | None, flag: str = "--real") -> list[dict]:
    """References to the (image, label) pairs of a real set: toy samples by index, Cityscapes files
    by path. UserError naming `flag` when the source, split or count is wrong."""
    if source in TOY_SOURCES and source != "toy:world":
        try:
            ds = open_dataset(source, split=split, num_images=num_images, resolution=None)
        except UserError as e:
            raise type(e)(f"{flag} {source}: {e}") from None
        return [{"kind": "toy", "source": ds.source, "split": split, "index": i, "name": ds.names[i]}
                for i in range(len(ds))]
    if source.startswith("toy:"):
        raise EvaluationInputError(f"{flag} {source}: not a real set; use toy:target, toy:source or a "
                                   "Cityscapes-layout directory")
    if not Path(source).is_dir():
        raise UserFileNotFoundError(f"{flag} {source}: no such directory (expected toy:target, toy:source or a "
                                    "Cityscapes-layout directory: leftImg8bit/<split>/<city>/, gtFine/<split>/<city>/)")
    try:
        pairs = find_pairs(source, split)
    except UserError as e:
        raise type(e)(f"{flag} {source}: {e}") from None
    if num_images is not None:
        if num_images > len(pairs):
            raise EvaluationInputError(f"{flag} {source}: asked for {num_images} images of split {split!r}, "
                                       f"it holds {len(pairs)}")
        pairs = pairs[:num_images]
    return [{"kind": "cityscapes", "image": str(image), "label": str(label), "name": name}
            for image, label, name in pairs]


def shard_refs(uri: str, max_rows: int | None = None, flag: str = "--synthetic") -> list[dict]:
    """References (file URI + row) to the rows of Parquet shards: a generate output's committed
    shards, or every *.parquet of a directory (shards.parquet_files decides). UserError naming the
    URI when it has no committed shards or a file lacks the `image` / `label` column."""
    try:
        fs, files = parquet_files(uri)
    except UserFileNotFoundError:
        raise UserFileNotFoundError(f"{flag} {uri}: no such file or directory") from None
    if not files:
        raise UserFileNotFoundError(f"{flag} {uri}: no committed shards (a jobs/generate.py output without "
                                    "commit records, or a directory without Parquet files)")
    refs: list[dict] = []
    for file, rows in file_rows(fs, files, ["image", "label"], f"{flag} {uri}"):
        if max_rows is not None and len(refs) >= max_rows:
            break
        name = file.rsplit("/", 1)[-1]
        refs += [{"kind": "parquet", "file": file, "row": r, "name": f"{name}#{r}"} for r in range(rows)]
    if not refs:
        raise EvaluationInputError(f"{flag} {uri}: its shards hold no rows")
    return refs[:max_rows] if max_rows is not None else refs


def check_labels(refs: list[dict], what: str) -> None:
    """Decode every label of `refs` once (the generate job's mask check, masks.check_masks) and fail
    naming the first bad one: not a PNG, a colour image, ids outside 0..18 and 255."""
    masks = [MaskRef.parquet(r["file"], r["row"]) if r["kind"] == "parquet" else MaskRef.file(r["label"])
             for r in refs if r["kind"] != "toy"]  # toy labels are valid by construction
    _, bad = check_masks(masks, resolution=1)
    if bad:
        raise EvaluationInputError(f"{what}: {len(bad)} of {len(masks)} labels are unusable, e.g. {bad[0]['reason']}")


class SampleReader:
    """Decodes the (RGB image, train-id label) of a reference. One per process; Parquet rows come
    through shards.RowReader (it keeps the last few row groups), toy datasets stay open."""

    def __init__(self):
        self._rows = RowReader(["image", "label"])
        self._toy: dict = {}

    def load(self, ref: dict) -> tuple[np.ndarray, np.ndarray]:
        if ref["kind"] == "toy":
            key = (ref["source"], ref["split"])
            if key not in self._toy:
                self._toy[key] = open_dataset(ref["source"], split=ref["split"], num_images=TOY_SEED_STRIDE,
                                              resolution=None)
            item = self._toy[key][ref["index"]]
            return item["image"], item["label"]
        if ref["kind"] == "cityscapes":
            return load_pair(ref["image"], ref["label"])
        cells = self._rows.read(ref["file"], ref["row"])
        what = f"{ref['file']} row {ref['row']}"
        image = decode_image(cells["image"], f"{what} image", "RGB")
        label = decode_label_png(cells["label"], f"{what} label")
        if label.shape != image.shape[:2]:
            raise EvaluationInputError(f"{what}: label {label.shape[1]}x{label.shape[0]} does not match image "
                                       f"{image.shape[1]}x{image.shape[0]}")
        return image, label


READER = SampleReader()


# ----------------------------------------------------------------------------- mmseg components


class _CaloraDataset(BaseSegDataset):
    """A BaseSegDataset whose data list holds references (`calora_ref`) instead of file paths."""

    METAINFO = METAINFO

    def _refs(self) -> list[dict]:
        raise NotImplementedError

    def load_data_list(self) -> list[dict]:
        return [{"calora_ref": ref, "img_path": ref["name"], "seg_map_path": ref["name"], "label_map": None,
                 "reduce_zero_label": False, "seg_fields": []} for ref in self._refs()]


@DATASETS.register_module()
class CaloraRealDataset(_CaloraDataset):
    """A real set: `source` 'toy:target' / 'toy:source' (rendered on the fly) or a Cityscapes-layout
    directory (labelIds mapped to train ids); its `split`; the first `num_images` (None: all)."""

    def __init__(self, source: str, split: str = "train", num_images: int | None = None, **kwargs):
        self.source, self.split, self.num_images = source, split, num_images
        super().__init__(**kwargs)

    def _refs(self) -> list[dict]:
        return real_refs(self.source, self.split, self.num_images)


@DATASETS.register_module()
class CaloraShardDataset(_CaloraDataset):
    """Parquet shards with `image` and `label` PNG columns (a generate output: its committed shards
    only) at any fsspec `uri`; the first `max_rows` rows (None: all)."""

    def __init__(self, uri: str, max_rows: int | None = None, **kwargs):
        self.uri, self.max_rows = uri, max_rows
        super().__init__(**kwargs)

    def _refs(self) -> list[dict]:
        return shard_refs(self.uri, self.max_rows)


@TRANSFORMS.register_module()
class LoadCaloraImage(BaseTransform):
    """LoadImageFromFile for `calora_ref`s: `img` HxWx3 uint8 in BGR order (mmcv's, so mmseg's
    transforms and the configs' `bgr_to_rgb=True` preprocessor apply unchanged), `img_shape`,
    `ori_shape`. The label decoded with it waits in the results for LoadCaloraAnnotations."""

    def __init__(self, to_float32: bool = False):
        self.to_float32 = to_float32

    def transform(self, results: dict) -> dict:
        image, label = READER.load(results["calora_ref"])
        img = np.ascontiguousarray(image[..., ::-1])  # RGB -> BGR
        results["img"] = img.astype(np.float32) if self.to_float32 else img
        results["img_shape"] = results["ori_shape"] = img.shape[:2]
        results["calora_label"] = label
        return results


@TRANSFORMS.register_module()
class LoadCaloraAnnotations(BaseTransform):
    """LoadAnnotations for `calora_ref`s: `gt_seg_map` HxW uint8 train ids (255 = ignore), at the
    image's original size (a Resize before this step leaves it alone, as with LoadAnnotations)."""

    def transform(self, results: dict) -> dict:
        label = results.pop("calora_label", None)
        if label is None:
            _, label = READER.load(results["calora_ref"])
        results["gt_seg_map"] = label
        results.setdefault("seg_fields", []).append("gt_seg_map")
        return results


def batch_counts(batch_size: int, source_ratio) -> list[int]:
    """How many of `batch_size` samples each source gives (largest remainders; each source >= 1)."""
    total = float(sum(source_ratio))
    exact = [batch_size * r / total for r in source_ratio]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:batch_size - sum(counts)]:
        counts[i] += 1
    if min(counts) < 1:
        raise EvaluationInputError(f"a batch of {batch_size} cannot hold every source in the ratio "
                                   f"{list(source_ratio)} (got {counts}); raise --batch-size")
    return counts


@DATA_SAMPLERS.register_module()
class CaloraMixedSampler(Sampler):
    """Infinite sampler over a ConcatDataset (or one dataset): every `batch_size` consecutive indices
    hold `batch_counts(batch_size, source_ratio)[s]` samples of source s, sources in order. Each
    source is an endless stream of permutations (epoch e of source s drawn from (seed, s, e)), so
    no source is exhausted and the run is reproducible. With several ranks, each takes every
    world_size-th index of each stream."""

    def __init__(self, dataset, batch_size: int, source_ratio=(1, 1), shuffle: bool = True, seed: int | None = None):
        sizes = np.diff([0, *dataset.cumulative_sizes]) if hasattr(dataset, "cumulative_sizes") else [len(dataset)]
        if len(sizes) != len(source_ratio):
            raise ValueError(f"{len(sizes)} sources but {len(source_ratio)} ratios")
        self.sizes = [int(n) for n in sizes]
        self.starts = [int(s) for s in np.cumsum([0, *self.sizes[:-1]])]
        self.counts = batch_counts(batch_size, source_ratio)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.rank, self.world_size = get_dist_info()

    def _stream(self, source: int):
        n, start = self.sizes[source], self.starts[source]
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, source, epoch]).permutation(n) if self.shuffle else np.arange(n)
            yield from (start + int(i) for i in order)

    def __iter__(self):
        streams = [itertools.islice(self._stream(s), self.rank, None, self.world_size) for s in range(len(self.sizes))]
        while True:
            for stream, count in zip(streams, self.counts):
                yield from itertools.islice(stream, count)

    def __len__(self) -> int:
        return sum(self.sizes)

    def set_epoch(self, epoch: int) -> None:
        """Streams are seeded by their own epochs; DistSamplerSeedHook's epoch is not needed."""


@METRICS.register_module()
class CaloraIoUMetric(IoUMetric):
    """mmseg's IoUMetric (aAcc, mIoU, mAcc, in %), plus `IoU.<class>` per class (NaN: the class is in
    neither the labels nor the predictions, left out of the mean as mmseg does)."""

    def compute_metrics(self, results: list) -> dict:
        metrics = super().compute_metrics(results)
        totals = [sum(column) for column in zip(*results)]
        per_class = self.total_area_to_metrics(*totals, ["mIoU"], self.nan_to_num, self.beta)["IoU"]
        for name, value in zip(self.dataset_meta["classes"], per_class):
            metrics[f"IoU.{name}"] = float(np.round(float(value) * 100, 2))
        return metrics


@HOOKS.register_module()
class CaloraRecordHook(Hook):
    """Keeps every validation's metrics (with its iteration) and the per-iteration step and data
    times, for train_run to return."""

    priority = "LOW"

    def __init__(self):
        self.validations: list[dict] = []
        self.times: dict[str, list[float]] = {}

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.validations.append({"iter": runner.iter, **{k: float(v) for k, v in (metrics or {}).items()}})

    def after_train(self, runner) -> None:
        for key in ("time", "data_time"):
            if runner.message_hub.get_scalar(f"train/{key}") is not None:
                self.times[key] = [float(x) for x in runner.message_hub.get_scalar(f"train/{key}").data[0]]


# ----------------------------------------------------------------------------- configs


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SEG_CONFIG_DIR.glob("*.py"))


def resolve_model_config(name: str) -> Path:
    """The file of --model-config: a shipped name, 'mmseg::<path>' (mmsegmentation's own configs,
    shipped in its wheel under .mim/configs), or a path."""
    if name.startswith("mmseg::"):
        path = MMSEG_CONFIG_DIR / name.removeprefix("mmseg::")
    elif (SEG_CONFIG_DIR / f"{name}.py").is_file():
        path = SEG_CONFIG_DIR / f"{name}.py"
    else:
        path = Path(name)
    if not path.is_file():
        raise UserFileNotFoundError(f"--model-config {name}: not a shipped config ({', '.join(shipped_configs())}), "
                                    "not an mmseg::<path> of mmsegmentation's configs, and no such file")
    return path


@contextmanager
def _mmseg_configs_env():
    """$MMSEG_CONFIGS = mmseg's config directory while a config is read (the shipped configs name their
    mmseg base through it), unless the user set it."""
    was_set = "MMSEG_CONFIGS" in os.environ
    os.environ.setdefault("MMSEG_CONFIGS", str(MMSEG_CONFIG_DIR))
    try:
        yield
    finally:
        if not was_set:
            os.environ.pop("MMSEG_CONFIGS", None)


def load_model_config(name: str) -> Config:
    path = resolve_model_config(name)
    try:
        with _mmseg_configs_env():
            cfg = Config.fromfile(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to read it is the user's file
        raise EvaluationInputError(f"--model-config {name}: not a readable mmseg config "
                                   f"({type(e).__name__}: {e})") from None
    for key in ("model", "train_dataloader", "val_dataloader", "optim_wrapper", "train_cfg"):
        if key not in cfg:
            raise EvaluationInputError(f"--model-config {name}: has no '{key}' (not an mmseg training config)")
    return cfg


def _pipeline(dataloader, fallback, name: str, where: str) -> list[dict]:
    """The dataloader's pipeline (through dataset wrappers) with LoadImageFromFile / LoadAnnotations
    replaced by LoadCaloraImage / LoadCaloraAnnotations, in place (a test pipeline that loads the
    label after Resize keeps the label at its original size)."""
    dataset = dataloader.get("dataset", {})
    while "pipeline" not in dataset and isinstance(dataset.get("dataset"), dict):
        dataset = dataset["dataset"]
    pipeline = dataset.get("pipeline", fallback) or []
    out, seen = [], set()
    for step in pipeline:
        kind = step.get("type")
        kind = getattr(kind, "__name__", kind).rsplit(".", 1)[-1]
        if kind in IMAGE_LOADERS:
            out.append({"type": "LoadCaloraImage", "to_float32": bool(step.get("to_float32", False))})
            seen.add("image")
        elif kind in LABEL_LOADERS:
            out.append({"type": "LoadCaloraAnnotations"})
            seen.add("label")
        else:
            out.append(dict(step))
    if seen != {"image", "label"}:
        raise EvaluationInputError(f"--model-config {name}: its {where} pipeline has no LoadImageFromFile and "
                                   "LoadAnnotations steps to put this job's loaders in place of")
    return out


def _set_num_classes(head) -> None:
    for h in head if isinstance(head, list) else [head]:
        if isinstance(h, dict) and "num_classes" in h:
            h["num_classes"] = NUM_CLASSES


def _stretch_schedule(schedulers, old_iters: int, new_iters: int):
    """The config's iteration-based schedule scaled to `new_iters` (begin / end / milestones)."""
    schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
    out = []
    for s in schedulers:
        s = dict(s)
        if not s.get("by_epoch", True) and old_iters != new_iters:
            for key in ("begin", "end"):
                if key in s and s[key] is not None:
                    s[key] = min(new_iters, max(0, round(s[key] * new_iters / old_iters)))
            if "milestones" in s:
                s["milestones"] = [round(m * new_iters / old_iters) for m in s["milestones"]]
        out.append(s)
    return out


@dataclass(frozen=True)
class RunSpec:
    """One training run: a set (real only, or real + one synthetic URI), a seed, its mmseg work dir."""

    set_name: str
    synthetic: str | None
    seed: int
    work_dir: str

    @property
    def key(self) -> str:
        return f"{self.set_name}/seed{self.seed}"


def build_run_config(cfg: EvaluateConfig, run: RunSpec) -> Config:
    """The mmengine Config of one run: the model config's model, optimizer, schedule (stretched to
    --iters) and pipelines (with our loaders), plus this job's data (real [+ synthetic, mixed per
    batch]), the held-out real set, the seed, CaloraIoUMetric, and a checkpoint at the end."""
    mc = load_model_config(cfg.model_config)
    config_iters = int(mc.train_cfg.get("max_iters", 0)) or None
    iters = cfg.iters or config_iters
    if not iters:
        raise EvaluationInputError(f"--model-config {cfg.model_config}: no train_cfg.max_iters; pass --iters")
    batch = cfg.batch_size or int(mc.train_dataloader.get("batch_size", 2))
    train_pipeline = _pipeline(mc.train_dataloader, mc.get("train_pipeline"), cfg.model_config, "training")
    test_pipeline = _pipeline(mc.val_dataloader, mc.get("test_pipeline"), cfg.model_config, "validation")
    workers = {name: cfg.loader_workers if cfg.loader_workers is not None else int(loader.get("num_workers", 2))
               for name, loader in (("train", mc.train_dataloader), ("val", mc.val_dataloader))}
    train_workers, val_workers = workers["train"], workers["val"]

    datasets = [{"type": "CaloraRealDataset", "source": cfg.real, "split": cfg.real_split,
                 "num_images": cfg.real_images, "pipeline": train_pipeline}]
    ratio = [1.0]
    if run.synthetic is not None:
        datasets.append({"type": "CaloraShardDataset", "uri": run.synthetic, "max_rows": cfg.synthetic_rows,
                         "pipeline": train_pipeline})
        ratio = [1.0 - cfg.synthetic_ratio, cfg.synthetic_ratio]
    mc.train_dataloader = {
        "batch_size": batch, "num_workers": train_workers, "persistent_workers": train_workers > 0,
        "sampler": {"type": "CaloraMixedSampler", "batch_size": batch, "source_ratio": ratio},
        "dataset": {"type": "ConcatDataset", "datasets": datasets}}
    mc.val_dataloader = {
        "batch_size": int(mc.val_dataloader.get("batch_size", 1)), "num_workers": val_workers,
        "persistent_workers": False, "sampler": {"type": "DefaultSampler", "shuffle": False},
        "dataset": {"type": "CaloraRealDataset", "source": cfg.val or cfg.real, "split": cfg.val_split,
                    "num_images": cfg.val_images, "pipeline": test_pipeline, "test_mode": True}}
    mc.val_evaluator = {"type": "CaloraIoUMetric", "iou_metrics": ["mIoU"]}
    for key in ("test_dataloader", "test_evaluator", "test_cfg"):
        mc.pop(key, None)
    mc.train_cfg = {"type": "IterBasedTrainLoop", "max_iters": iters, "val_interval": cfg.val_interval or iters}
    mc.val_cfg = {"type": "ValLoop"}
    if mc.get("param_scheduler"):
        mc.param_scheduler = _stretch_schedule(mc.param_scheduler, config_iters or iters, iters)
    _set_num_classes(mc.model.get("decode_head"))
    _set_num_classes(mc.model.get("auxiliary_head"))
    hooks = dict(mc.get("default_hooks") or {})
    hooks["checkpoint"] = {"type": "CheckpointHook", "by_epoch": False, "interval": iters, "max_keep_ckpts": 1,
                           "save_last": True}
    hooks["logger"] = {"type": "LoggerHook", "interval": max(1, min(50, iters // 20)), "log_metric_by_epoch": False}
    mc.default_hooks = hooks
    mc.custom_hooks = [{"type": "CaloraRecordHook"}]
    mc.log_processor = {"by_epoch": False}
    mc.default_scope = "mmseg"
    mc.randomness = {"seed": run.seed, "deterministic": False}
    mc.work_dir = run.work_dir
    mc.experiment_name = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', run.key)}-{uuid.uuid4().hex[:6]}"
    if isinstance(mc.get("visualizer"), dict):
        mc.visualizer = {k: v for k, v in mc.visualizer.items() if k != "name"}  # one per run: the experiment's name
    mc.load_from, mc.resume, mc.launcher = None, False, "none"
    return mc


# ----------------------------------------------------------------------------- the job's plan


def set_names(synthetic: list[str]) -> list[str]:
    """A directory-safe, unique name per synthetic set: 'real+<last path part>'."""
    names = []
    for uri in synthetic:
        base = uri.rstrip("/").removesuffix("/data").rsplit("/", 1)[-1] or "synthetic"
        name = f"{REAL_SET}+{re.sub(r'[^A-Za-z0-9._-]+', '_', base)}"
        candidate, k = name, 2
        while candidate in names:
            candidate, k = f"{name}-{k}", k + 1
        names.append(candidate)
    return names


def plan_runs(cfg: EvaluateConfig) -> list[RunSpec]:
    """Every (set, seed) run, real-only first; work dirs under OUTPUT/runs/<set>/seed<k>."""
    sets = [(REAL_SET, None), *zip(set_names(cfg.synthetic), cfg.synthetic)]
    root = Path(cfg.output).resolve() / "runs"
    return [RunSpec(name, uri, seed, str(root / name / f"seed{seed}")) for name, uri in sets for seed in range(cfg.seeds)]


def check_inputs(cfg: EvaluateConfig) -> dict:
    """Every check that needs no training, before anything is written: the model config (read, its
    pipelines adapted, its model built), the real and held-out sets, each synthetic set (committed
    shards, `image` and `label` columns, every label decoded and in the class set), the batch mix.
    Returns what the report states (set sizes, iterations, batch size, the model config's file)."""
    mc = build_run_config(cfg, RunSpec(REAL_SET, None, 0, str(Path(cfg.output).resolve() / "runs" / "check")))
    try:
        with DefaultScope.overwrite_default_scope("mmseg"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mmseg's deprecation notes; the run's log has them
            MODELS.build(mc.model)
    except Exception as e:  # noqa: BLE001 - a model mmseg cannot build is the config's fault
        raise EvaluationInputError(f"--model-config {cfg.model_config}: mmseg cannot build its model "
                                   f"({type(e).__name__}: {str(e)[:300]})") from None
    real = real_refs(cfg.real, cfg.real_split, cfg.real_images, "--real")
    val_source = cfg.val or cfg.real
    if val_source == cfg.real and cfg.val_split == cfg.real_split:
        raise EvaluationInputError(f"--val {val_source} --val-split {cfg.val_split}: the held-out images would be "
                                   "the training images; choose another split or set")
    val = real_refs(val_source, cfg.val_split, cfg.val_images, "--val")
    check_labels(real, f"--real {cfg.real}")
    check_labels(val, f"--val {val_source}")
    synthetic = {}
    for uri in cfg.synthetic:
        refs = shard_refs(uri, cfg.synthetic_rows)
        check_labels(refs, f"--synthetic {uri}")
        READER.load(refs[0])  # the first image decodes (a wrong column fails here, not in a run)
        synthetic[uri] = len(refs)
    batch = int(mc.train_dataloader.batch_size)
    if cfg.synthetic:
        try:
            counts = batch_counts(batch, [1.0 - cfg.synthetic_ratio, cfg.synthetic_ratio])
        except EvaluationInputError as e:
            raise EvaluationInputError(f"--synthetic-ratio {cfg.synthetic_ratio}: {e}") from None
    else:
        counts = [batch]
    return {"model_config_file": str(resolve_model_config(cfg.model_config)), "iters": int(mc.train_cfg.max_iters),
            "batch_size": batch, "batch_mix": counts, "real_images": len(real), "val_images": len(val),
            "synthetic_rows": synthetic}


# ----------------------------------------------------------------------------- one run


def train_run(cfg: EvaluateConfig, run: RunSpec) -> dict:
    """Train one run with mmseg's Runner (Runner.from_cfg(...).train()) and return its record:
    mIoU / aAcc / mAcc and per-class IoU (%, on the held-out real set, after the last iteration),
    iterations, wall time, throughput, loader share of a step, seed, work dir and checkpoint."""
    started = time.perf_counter()
    work_dir = Path(run.work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)  # a crashed attempt's leftovers: the run starts over
    mc = build_run_config(cfg, run)
    runner = Runner.from_cfg(mc)
    record_hook = next(h for h in runner.hooks if isinstance(h, CaloraRecordHook))
    train_started = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - train_started
    final = record_hook.validations[-1]
    step = record_hook.times.get("time", [])[5:]  # leave out the warm-up iterations
    data = record_hook.times.get("data_time", [])[5:]
    batch = int(mc.train_dataloader["batch_size"])
    return {
        "set": run.set_name, "synthetic": run.synthetic, "seed": run.seed,
        "mIoU": final.get("mIoU"), "aAcc": final.get("aAcc"), "mAcc": final.get("mAcc"),
        "per_class_iou": {name: _finite(final.get(f"IoU.{name}")) for name in CLASS_NAMES},
        "iterations": int(runner.iter), "batch_size": batch,
        "wall_time_s": round(time.perf_counter() - started, 2), "train_time_s": round(train_s, 2),
        "images_per_s": round(batch / statistics.median(step), 2) if step else None,
        "loader_share_of_step": round(statistics.median(data) / statistics.median(step), 4) if step else None,
        "device": str(next(runner.model.parameters()).device), "torch_threads": torch.get_num_threads(),
        "validations": [{"iter": v["iter"], "mIoU": v.get("mIoU")} for v in record_hook.validations],
        "work_dir": str(work_dir), "checkpoint": str(work_dir / f"iter_{int(runner.iter)}.pth"),
    }


def _finite(value):
    return None if value is None or not math.isfinite(value) else value


# ----------------------------------------------------------------------------- run records and the report

RUN_METRICS = "metrics.json"


def run_complete(run: RunSpec, iters: int) -> dict | None:
    """The run's record if its metrics.json is complete (mIoU, every class, all iterations), else None."""
    path = Path(run.work_dir) / RUN_METRICS
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    ok = (isinstance(record.get("mIoU"), (int, float)) and record.get("iterations") == iters
          and set(record.get("per_class_iou", {})) == set(CLASS_NAMES))
    return record if ok else None


def write_run_metrics(record: dict) -> None:
    path = Path(record["work_dir"]) / RUN_METRICS
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict], sets: list[tuple[str, str | None]]) -> list[dict]:
    """Per set: mean and sample std over seeds of mIoU, aAcc and each class's IoU; delta of the mean
    mIoU over the real-only set's."""
    rows = []
    for name, uri in sets:
        runs = sorted((r for r in records if r["set"] == name), key=lambda r: r["seed"])
        miou, miou_std = _mean_std([r["mIoU"] for r in runs])
        aacc, aacc_std = _mean_std([r["aAcc"] for r in runs])
        per_class = {c: _mean_std([r["per_class_iou"][c] for r in runs]) for c in CLASS_NAMES}
        rows.append({"set": name, "synthetic": uri, "seeds": [r["seed"] for r in runs], "runs": len(runs),
                     "mIoU_mean": miou, "mIoU_std": miou_std, "aAcc_mean": aacc, "aAcc_std": aacc_std,
                     "per_class_iou_mean": {c: m for c, (m, _) in per_class.items()},
                     "per_class_iou_std": {c: sd for c, (_, sd) in per_class.items()},
                     "wall_time_s_mean": _mean_std([r["wall_time_s"] for r in runs])[0]})
    base = rows[0]["mIoU_mean"] if rows else None
    for row in rows:
        row["delta_mIoU"] = (row["mIoU_mean"] - base) if row["mIoU_mean"] is not None and base is not None else None
    return rows


def _fmt(value, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def report_markdown(cfg: EvaluateConfig, checked: dict, summary: list[dict], records: list[dict]) -> str:
    """report.md: the paper's Table 1 shape (mean ± std over seeds, delta over real-only), per-class
    IoU, and every run."""
    lines = ["# Segmenter evaluation: real only vs real + synthetic", "",
             f"- segmenter: `{cfg.model_config}` (`{checked['model_config_file']}`), trained by mmsegmentation "
             f"{mmseg.__version__}'s Runner, {checked['iters']} iterations, batch {checked['batch_size']}"
             + (f" (real : synthetic = {checked['batch_mix'][0]} : {checked['batch_mix'][1]} per batch)"
                if cfg.synthetic else ""),
             f"- real training images: `{cfg.real}` split `{cfg.real_split}`, {checked['real_images']} images",
             f"- held-out evaluation: `{cfg.val or cfg.real}` split `{cfg.val_split}`, {checked['val_images']} images",
             *[f"- synthetic `{uri}`: {n} rows" for uri, n in checked["synthetic_rows"].items()],
             f"- seeds: {cfg.seeds} per set (0..{cfg.seeds - 1}); mean ± sample standard deviation over seeds", "",
             "| training set | runs | mIoU (%) | Δ mIoU vs real only | aAcc (%) |", "|---|---|---|---|---|"]
    for row in summary:
        label = "real only" if row["synthetic"] is None else f"real + `{row['synthetic']}`"
        lines.append(f"| {label} | {row['runs']} | {_fmt(row['mIoU_mean'])} ± {_fmt(row['mIoU_std'])} | "
                     f"{_fmt(row['delta_mIoU'], sign=True) if row['synthetic'] is not None else '—'} | "
                     f"{_fmt(row['aAcc_mean'])} ± {_fmt(row['aAcc_std'])} |")
    lines += ["", "## IoU per class (%, mean over seeds; — : class absent from the held-out labels and the "
              "predictions)", "", "| class | " + " | ".join(r["set"] for r in summary) + " |",
              "|---|" + "---|" * len(summary)]
    for c in CLASS_NAMES:
        lines.append(f"| {c} | " + " | ".join(_fmt(r["per_class_iou_mean"][c]) for r in summary) + " |")
    lines += ["", "## Runs", "",
              "| set | seed | mIoU | aAcc | iterations | wall time (s) | images/s | loader share of a step | work dir |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["set"], r["seed"])):
        share = r.get("loader_share_of_step")
        lines.append(f"| {r['set']} | {r['seed']} | {_fmt(r['mIoU'])} | {_fmt(r['aAcc'])} | {r['iterations']} | "
                     f"{r['wall_time_s']:.0f} | {_fmt(r.get('images_per_s'), 1)} | "
                     f"{'—' if share is None else _fmt(100 * share, 1) + ' %'} | `{r['work_dir']}` |")
    return "\n".join(lines) + "\n"


def plot_per_class(summary: list[dict], path: Path) -> None:
    """Grouped bars: IoU per class, one bar per training set (mean over seeds, std as error bars);
    only the classes that count (in the held-out labels or some prediction)."""
    classes = [c for c in CLASS_NAMES if any(row["per_class_iou_mean"][c] is not None for row in summary)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(classes) + 2), 4.2), dpi=110)
    width = 0.8 / max(1, len(summary))
    x = np.arange(len(classes))
    for k, row in enumerate(summary):
        values = [row["per_class_iou_mean"][c] for c in classes]
        errors = [row["per_class_iou_std"][c] for c in classes]
        ax.bar(x + (k - (len(summary) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
               yerr=[0 if e is None else e for e in errors], capsize=2,
               label=f"{row['set']} (mIoU {_fmt(row['mIoU_mean'], 1)} ± {_fmt(row['mIoU_std'], 1)})")
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("IoU per class on the held-out real images (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(cfg: EvaluateConfig, checked: dict, records: list[dict]) -> dict:
    """metrics.json (every run + the per-set summary), report.md and per_class_iou.png in --output."""
    out = Path(cfg.output)
    sets = [(REAL_SET, None), *zip(set_names(cfg.synthetic), cfg.synthetic)]
    summary = summarize(records, sets)
    doc = {"config": to_dict(cfg), "checked": checked, "mmseg_version": mmseg.__version__,
           "summary": summary, "runs": sorted(records, key=lambda r: (r["set"], r["seed"]))}
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "report.md", report_markdown(cfg, checked, summary, records))
    tmp = out / f".per_class_iou.{uuid.uuid4().hex[:6]}.png"
    plot_per_class(summary, tmp)
    tmp.replace(out / "per_class_iou.png")
    return {"summary": summary, "metrics": str(out / "metrics.json"), "report": str(out / "report.md"),
            "plot": str(out / "per_class_iou.png")}
