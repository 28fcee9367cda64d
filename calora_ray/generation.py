"""Mask-conditioned generation: a label map + a prompt + a seed -> an image whose label is the mask.

The pieces, each usable on its own:

- `MaskGenerator`: loads the model (+ CA-LoRA adapter, + segmentation ControlNet) once;
  `generate(labels, prompts, seeds, steps, guidance)` returns one image per label. Plain torch /
  diffusers, no Ray: jobs/generate.py's Ray Data actors and the Ray Serve deployment both use it.
- `build_prompt`: the paper's template "Photorealistic first-person urban street view with
  {class names} in {condition}", phrased exactly as the toy world's captions are.
- `sample_seed` / `sample_id` / `plan_sample`: everything random about sample `index` of a job
  derives from (job seed, index), so a sample is the same whichever actor, batch or rerun makes it.
- `augment_layout`: flip and scale-crop of a label map (nearest-neighbour only).
- `ShardGenerator`: the Ray Data adapter (a callable class): one input row per shard -> that shard
  generated, written and committed (calora_ray.shards), its record returned.
- `run_generate`: the jobs/generate.py driver (mask check, the Ray Data pipeline, manifest, card).
"""

from __future__ import annotations

import hashlib
import io
import json
import resource
import sys
import time
import traceback
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .concepts import join_class_names
from .data.labels import NUM_CLASSES, class_names_present, colorize
from .toyworld.world import CONDITION_PHRASES, CONDITIONS, caption

# The style and viewpoint of the paper's generation prompt (METHOD.md, stage 4).
PROMPT_STYLE, PROMPT_VIEWPOINT = "photorealistic", "first-person"


# ----------------------------------------------------------------------------- prompts, seeds, layouts


def build_prompt(label: np.ndarray, condition: str, template: str | None = None) -> str:
    """The generation prompt of a label map (HxW train ids) under `condition` (one of CONDITIONS).

    Default (template None): the toy world's caption of a photorealistic first-person street with
    the classes present in the label, e.g. "Photorealistic first-person urban street view with
    road, building and car at night". A user template is a str.format string with the fields
    {classes} ("road, building and car"), {condition} (the phrase with its leading space,
    " in foggy weather" / " at night") and {condition_name} ("foggy").
    """
    if condition not in CONDITION_PHRASES:
        raise ValueError(f"unknown condition {condition!r}; valid: {', '.join(CONDITIONS)}")
    names = class_names_present(label)
    if template is None:
        return caption(PROMPT_STYLE, PROMPT_VIEWPOINT, condition, names)
    return template.format(classes=join_class_names(names), condition=CONDITION_PHRASES[condition],
                           condition_name=condition)


def sample_seed(job_seed: int, index: int) -> int:
    """The seed of sample `index` of a job (a non-negative int64): a hash of (job seed, index), so
    neighbouring samples and neighbouring job seeds get unrelated noise."""
    if job_seed < 0 or index < 0:
        raise ValueError(f"job seed and sample index must be non-negative, got {job_seed}, {index}")
    hi, lo = np.random.SeedSequence([job_seed, index]).generate_state(2, np.uint32)
    return int((int(hi) << 32 | int(lo)) & (2**63 - 1))


def sample_id(job_seed: int, index: int) -> str:
    """The stable id of sample `index` of a job with `job_seed`, e.g. 's0-000000042'."""
    return f"s{job_seed}-{index:09d}"


@dataclass(frozen=True)
class SamplePlan:
    """What sample `index` will be: all of it derived from (job seed, index)."""

    index: int
    sample_id: str
    seed: int          # the noise seed of the image
    mask: int          # index into the list of usable masks
    condition: str
    flip: bool
    zoom: float        # >= 1: the crop's side is the mask's shorter side / zoom
    offset: tuple[float, float]  # (y, x) of the crop in [0, 1] of the free room


def plan_sample(job_seed: int, index: int, num_masks: int, conditions: list[str], weights: list[float],
                flip: bool = False, max_zoom: float = 1.0) -> SamplePlan:
    """Sample `index` uses mask index % num_masks (every mask equally often), a condition drawn with
    `weights`, and — when asked — a random horizontal flip and a random crop zoomed up to max_zoom."""
    if num_masks < 1:
        raise ValueError("no usable masks")
    seed = sample_seed(job_seed, index)
    rng = np.random.default_rng(seed)
    p = np.asarray(weights, dtype=np.float64)
    condition = conditions[int(rng.choice(len(conditions), p=p / p.sum()))]
    flipped = bool(rng.random() < 0.5)
    zoom = float(rng.uniform(1.0, max_zoom)) if max_zoom > 1.0 else 1.0
    offset = (float(rng.random()), float(rng.random()))
    return SamplePlan(index, sample_id(job_seed, index), seed, index % num_masks, condition,
                      flip and flipped, zoom if max_zoom > 1.0 else 1.0,
                      offset if max_zoom > 1.0 else (0.5, 0.5))


def augment_layout(label: np.ndarray, resolution: int, flip: bool = False, zoom: float = 1.0,
                   offset: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """A square `resolution` x `resolution` label map from `label` (HxW train ids).

    Crops a square of side (shorter side / zoom) at `offset` ((y, x) in [0, 1] of the free room;
    (0.5, 0.5) = centred), resizes it nearest-neighbour only (no new ids on boundaries), and
    flips it left-right when `flip`. The image is generated at this size, so it matches the label.
    """
    h, w = label.shape
    side = max(1, int(round(min(h, w) / max(zoom, 1.0))))
    top = int(round((h - side) * min(max(offset[0], 0.0), 1.0)))
    left = int(round((w - side) * min(max(offset[1], 0.0), 1.0)))
    crop = np.ascontiguousarray(label[top:top + side, left:left + side])
    if crop.shape != (resolution, resolution):
        crop = np.asarray(Image.fromarray(crop).resize((resolution, resolution), Image.NEAREST))
    if flip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def class_pixels(label: np.ndarray) -> list[int]:
    """Pixel count of each train id 0..18 (index = train id); ignore (255) pixels are not counted."""
    return np.bincount(np.asarray(label).ravel(), minlength=256)[:NUM_CLASSES].astype(np.int64).tolist()


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of an HxW (mode L) or HxWx3 (RGB) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def control_image(label: np.ndarray) -> Image.Image:
    """The ControlNet conditioning image of a label map: its Cityscapes palette colours (ignore =
    black), at the label's own size, so no colour is ever interpolated."""
    return Image.fromarray(colorize(label))


def control_tensor(labels: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1]: the control images of `labels` as a ControlNet pipeline feeds
    them (for training and for calling a ControlNet directly)."""
    images = torch.from_numpy(np.stack([colorize(np.asarray(label, dtype=np.uint8)) for label in labels]))
    return images.permute(0, 3, 1, 2).to(device, torch.float32) / 255.0


# ----------------------------------------------------------------------------- the generator


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """ControlNet conditioning-embedding widths whose stride-2 convolutions map the image to the
    latent size: SD's (16, 32, 96, 256) for f = 8, one fewer stage for the tiny models' f = 4."""
    stages = int(np.log2(vae_scale_factor))
    widths = (16, 32, 96, 256, 256)
    if 2 ** stages != vae_scale_factor or stages + 1 > len(widths):
        raise ValueError(f"unsupported VAE downsampling factor {vae_scale_factor}")
    return widths[:stages + 1]


class MaskGenerator:
    """Label maps -> images with a (CA-LoRA'd) Stable Diffusion and a segmentation ControlNet.

        gen = MaskGenerator("toy-sd", lora="outputs/finetune", controlnet="outputs/controlnet")
        images = gen.generate(labels, prompts, seeds, steps=25, guidance=4.0)

    Constructor (loads everything once; keep the object for many calls):
      model       --model of every job: 'tiny', 'toy-sd', a diffusers directory or a hub id.
      lora        a directory with pytorch_lora_weights.safetensors (jobs/finetune.py), or None.
      controlnet  a ControlNetModel directory (jobs/train_controlnet.py, or any diffusers
                  segmentation ControlNet whose conditioning is the Cityscapes palette), or None:
                  then the images follow only the prompt and the label is NOT their label (for
                  looking at a model; the dataset job always passes one).
      device      torch device; default CUDA when available, else CPU.
      dtype       weights' dtype; default float32 (pass torch.float16 / bfloat16 on a GPU).
      model_seed  the seed of the 'tiny' presets' random weights.

    generate(labels, prompts, seeds, steps, guidance, conditioning_scale=1.0) -> list of HxWx3 uint8:
      labels  list of HxW uint8 train-id maps (0..18, 255 = ignore), all the same size; the
              image is generated at that size (a multiple of 8 x the VAE factor).
      prompts one prompt per label (build_prompt makes the paper's).
      seeds   one int per label: image i starts from the noise of torch.Generator().manual_seed(
              seeds[i]) (drawn on the CPU, so a seed gives the same noise on every device); an
              image depends on its own seed, label and prompt, not on the rest of the batch
              (up to float rounding of batched kernels; byte-identical for the same batch).
    """

    def __init__(self, model: str, lora: str | None = None, controlnet: str | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 model_seed: int = 0):
        from .lora import LORA_WEIGHT_NAME, file_sha256
        from .models import load_components

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float32
        components = load_components(model, model_seed)
        if components.is_sdxl:
            raise ValueError(f"--model {model}: mask-conditioned generation supports SD-1.x/2.x-shaped "
                             "models (an SDXL ControlNet pipeline is not wired up yet)")
        cast = None if self.dtype == torch.float32 else self.dtype  # fp32 is what they load as
        components.to(self.device, cast)
        self.components = components
        self.model = model
        self.lora_sha256 = ""
        if lora is not None:
            lora_file = _local_dir(lora) + "/" + LORA_WEIGHT_NAME
            try:
                self.lora_sha256 = file_sha256(lora_file)
            except FileNotFoundError:
                raise FileNotFoundError(f"--lora {lora}: no {LORA_WEIGHT_NAME} there "
                                        "(pass a jobs/finetune.py output)") from None
            components.pipeline().load_lora_weights(_local_dir(lora))  # patches the shared UNet in place
        self.controlnet = None
        if controlnet is not None:
            self.controlnet = load_controlnet(controlnet).to(self.device, cast).eval()
        self.pipe = self._pipeline()
        self.pipe.set_progress_bar_config(disable=True)

    def _pipeline(self):
        c = self.components
        if self.controlnet is None:
            return c.pipeline()
        from diffusers import StableDiffusionControlNetPipeline

        return StableDiffusionControlNetPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            controlnet=self.controlnet, scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    @property
    def native_resolution(self) -> int:
        """The side the base model was trained at (UNet sample size x VAE factor)."""
        return self.components.unet.config.sample_size * self.components.vae_scale_factor

    @torch.no_grad()
    def generate(self, labels: list[np.ndarray], prompts: list[str], seeds: list[int], steps: int = 25,
                 guidance: float = 4.0, conditioning_scale: float = 1.0) -> list[np.ndarray]:
        """One HxWx3 uint8 image per label (see the class docstring)."""
        if not (len(labels) == len(prompts) == len(seeds)) or not labels:
            raise ValueError(f"generate needs as many labels, prompts and seeds (>= 1), got "
                             f"{len(labels)}, {len(prompts)}, {len(seeds)}")
        shapes = {np.asarray(label).shape for label in labels}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"generate needs HxW labels of one size per call, got shapes {sorted(shapes)}")
        height, width = next(iter(shapes))
        factor = self.components.vae_scale_factor * 8 if self.controlnet is not None else self.components.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"label size {width}x{height} must be a multiple of {factor}")
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                      generator=generators, output_type="np")
        if self.controlnet is not None:
            kwargs.update(image=[control_image(np.asarray(label, dtype=np.uint8)) for label in labels],
                          controlnet_conditioning_scale=conditioning_scale)
        images = self.pipe(list(prompts), **kwargs).images  # (B, H, W, 3) floats in [0, 1]
        bad = [i for i, img in enumerate(images) if not np.isfinite(img).all()]
        if bad:  # a NaN would become a black pixel without a word: never write that into a dataset
            raise FloatingPointError(f"non-finite pixels in image(s) {bad} (seeds {[seeds[i] for i in bad]}) in "
                                     f"{str(self.dtype).replace('torch.', '')}; fp16 can overflow: try bf16 or fp32")
        return [(np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8) for img in images]


def load_controlnet(path: str):
    """A diffusers ControlNetModel from a local directory (or a hub id)."""
    from diffusers import ControlNetModel

    local = _local_dir(path)
    try:
        return ControlNetModel.from_pretrained(local)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--controlnet {path}: not a diffusers ControlNet directory "
                                f"(config.json + diffusion_pytorch_model.safetensors) ({str(e).splitlines()[0]})") from None


def _local_dir(path: str) -> str:
    """A local path for a model directory given as a path or file:// URI."""
    return path.removeprefix("file://")


# ----------------------------------------------------------------------------- shards (the Ray Data adapter)


class ShardGenerator:
    """Ray Data callable class: `map_batches(ShardGenerator, fn_constructor_kwargs=..., batch_size=1,
    compute=ActorPoolStrategy(...))` over rows {"shard": k}. Each actor loads the model once; each
    call generates shard k's samples (in batches of cfg.batch_size), writes and commits the shard
    (calora_ray.shards) and returns its commit record. The rows never pass through the driver.

    cfg: the GenerateConfig; masks: the usable mask refs (sample i uses masks[i % len(masks)]);
    resolution: the image side; threads: torch CPU threads; device: where the model runs.
    """

    def __init__(self, cfg, masks: list[str], resolution: int, threads: int | None = None,
                 device: str | None = None):
        from .cli import quiet_libraries
        from .data.masks import MaskReader
        from .models import resolve_dtype
        from .shards import ShardStore

        quiet_libraries()
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg, self.masks, self.resolution = cfg, list(masks), resolution
        self.generator = MaskGenerator(cfg.model, lora=cfg.lora, controlnet=cfg.controlnet, device=device,
                                       dtype=resolve_dtype(cfg.mixed_precision, device),
                                       model_seed=cfg.model_seed)
        self.reader = MaskReader()
        self.store = ShardStore(cfg.output)
        self.weights = cfg.condition_weights or [1.0] * len(cfg.conditions)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for k in batch["shard"]:
            try:
                records.append(self.make_shard(int(k)))
            except Exception:  # noqa: BLE001 - reported by the driver, which fails the job at the end
                # Returned, not raised: a raising UDF fails the whole Dataset at once, and its actor
                # pool may outlive the failure holding its CPUs; this way the other shards finish
                # and commit, the pool shuts down normally, and a rerun only redoes this shard.
                records.append({"shard": int(k), "rows": 0, "error": traceback.format_exc(limit=8)})
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return {"shard": np.array([r["shard"] for r in records], dtype=np.int64),
                "rows": np.array([r["rows"] for r in records], dtype=np.int64),
                "record": np.array([json.dumps(r) for r in records], dtype=object),
                "peak_rss_mb": np.full(len(records), peak_rss_mb)}

    def plan(self, index: int) -> SamplePlan:
        cfg = self.cfg
        return plan_sample(cfg.seed, index, len(self.masks), cfg.conditions, self.weights, cfg.flip, cfg.max_zoom)

    def make_rows(self, indices) -> dict[str, list]:
        """The shard-schema columns of samples `indices` (generated in batches of cfg.batch_size)."""
        cfg = self.cfg
        rows: dict[str, list] = {name: [] for name in ("sample_id", "image", "label", "prompt", "condition", "seed",
                                                       "width", "height", "class_pixels", "model", "lora_sha256",
                                                       "mask")}
        plans = [self.plan(i) for i in indices]
        for start in range(0, len(plans), cfg.batch_size):
            chunk = plans[start:start + cfg.batch_size]
            labels = [augment_layout(self.reader.load(self.masks[p.mask]), self.resolution, p.flip, p.zoom, p.offset)
                      for p in chunk]
            prompts = [build_prompt(label, p.condition, cfg.prompt_template) for label, p in zip(labels, chunk)]
            images = self.generator.generate(labels, prompts, [p.seed for p in chunk], cfg.steps, cfg.guidance,
                                             cfg.conditioning_scale)
            for p, label, prompt, image in zip(chunk, labels, prompts, images):
                rows["sample_id"].append(p.sample_id)
                rows["image"].append(png_bytes(image))
                rows["label"].append(png_bytes(label))
                rows["prompt"].append(prompt)
                rows["condition"].append(p.condition)
                rows["seed"].append(p.seed)
                rows["width"].append(label.shape[1])
                rows["height"].append(label.shape[0])
                rows["class_pixels"].append(class_pixels(label))
                rows["model"].append(cfg.model)
                rows["lora_sha256"].append(self.generator.lora_sha256)
                rows["mask"].append(self.masks[p.mask])
        return rows

    def make_shard(self, k: int) -> dict:
        from .shards import shard_ranges, table_bytes

        if self.cfg.simulate_failure_at_shard == k:
            raise RuntimeError(f"simulated failure while generating shard {k} (--simulate-failure-at-shard)")
        indices = shard_ranges(self.cfg.num_samples, self.cfg.rows_per_shard)[k]
        rows = self.make_rows(indices)
        data = table_bytes(rows, self.cfg.row_group_size)
        return self.store.write_shard(k, data, len(indices), rows["sample_id"][0], rows["sample_id"][-1])


# ----------------------------------------------------------------------------- the job


# Knobs that do not change what a sample is: a rerun may change them and still resume.
# (A different --batch-size may change an image by float rounding of batched kernels, not its content.)
NOT_IDENTITY = ("num_actors", "batch_size", "cpus_per_actor", "use_gpu", "strict", "preview_samples", "measure_samples",
                "overwrite",
                "simulate_failure_at_shard", "output", "row_group_size")


def _file_hash(path: str) -> str:
    from .lora import file_sha256

    return file_sha256(path)


def check_generate_inputs(cfg) -> dict:
    """Everything the driver checks before Ray starts: returns {resolution, lora_sha256, controlnet_sha256}."""
    from pathlib import Path

    from .lora import LORA_WEIGHT_NAME
    from .models import load_unet_skeleton

    if cfg.controlnet is None:
        raise ValueError("--controlnet is required: a segmentation ControlNet (jobs/train_controlnet.py output) "
                         "turns each label map into its image")
    unknown = [c for c in cfg.conditions if c not in CONDITION_PHRASES]
    if unknown:
        raise ValueError(f"--conditions: unknown {', '.join(unknown)}; valid: {', '.join(CONDITIONS)}")
    for flag, uri in (("--output", cfg.output), ("--masks", cfg.masks)):
        if uri.startswith("memory://"):
            raise ValueError(f"{flag} {uri}: memory:// lives inside one process and the Ray actors cannot see it; "
                             "use a path, file:// or an object store (s3://, gs://, ...)")
    lora_sha = ""
    if cfg.lora is not None:
        lora_file = Path(_local_dir(cfg.lora)) / LORA_WEIGHT_NAME
        if not lora_file.is_file():
            raise FileNotFoundError(f"--lora {cfg.lora}: no {LORA_WEIGHT_NAME} there (pass a jobs/finetune.py output)")
        lora_sha = _file_hash(str(lora_file))
    cn_dir = Path(_local_dir(cfg.controlnet))
    weights = [w for w in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin") if (cn_dir / w).is_file()]
    if not (cn_dir / "config.json").is_file() or not weights:
        raise FileNotFoundError(f"--controlnet {cfg.controlnet}: not a diffusers ControlNet directory (needs config.json "
                                "and diffusion_pytorch_model.safetensors; pass a jobs/train_controlnet.py output)")

    cn_config = json.loads((cn_dir / "config.json").read_text())
    factor = 2 ** (len(cn_config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    resolution = cfg.resolution or load_unet_skeleton(cfg.model, cfg.model_seed).config.sample_size * factor
    if resolution % (factor * 8):
        raise ValueError(f"--resolution {resolution} must be a multiple of {factor * 8} (VAE factor {factor} x 8)")
    return {"resolution": resolution, "lora_sha256": lora_sha, "controlnet_sha256": _file_hash(str(cn_dir / weights[0]))}


def generation_resources(num_actors: int | None, use_gpu: str, cpus_per_actor: int | None,
                         wait_s: float = 60.0) -> tuple[int, bool, int]:
    """(actors, a GPU each?, CPUs each) that the cluster can host (distributed.resolve_resources).

    Default: one actor per GPU of the cluster, else one actor. Without GPUs the actors share the
    cluster's CPUs (one actor gets them all); the pipeline has no other task that needs a CPU (the
    input rows come from the driver and the actors write their own shards), so a pool that
    reserves every CPU cannot starve a writer: ECOSYSTEM.md's 2-CPU hang of actors +
    write_parquet has no writer task to wait for here.
    """
    import ray

    from .distributed import resolve_resources

    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = num_actors or (gpus if gpus and use_gpu != "false" else 1)
    gpu, per_actor = resolve_resources(actors, use_gpu, cpus_per_actor, wait_s)
    return actors, gpu, per_actor


def is_toy_model(model: str) -> bool:
    """The models the toy-world probe can judge: the presets and the committed toy-sd directory."""
    from .models import TOY_SD_DIR

    return model in ("tiny", "toy-sd") or (Path(model).is_dir() and Path(model).resolve() == Path(TOY_SD_DIR).resolve())


def probe_measures(uri: str, max_rows: int) -> dict:
    """Label fidelity and prompt adherence of the first `max_rows` rows of a generate output, with the
    toy-world probe (jobs/measure.py's metrics, no reference set): what the dataset card reports."""
    from .config import MeasureConfig, build_config
    from .measure import probe_metrics, read_samples

    samples = read_samples(uri.rstrip("/") + "/data", max_rows)
    report = probe_metrics(samples, build_config(MeasureConfig, {"samples": uri, "reference": None,
                                                                  "train_data": None}))
    return {"rows_measured": int(len(samples.images)), "measured_with": "toy-world probe (calora_ray.probe)",
            "label_fidelity_miou": report["label_fidelity"]["miou"] if "label_fidelity" in report else None,
            **{f"prompt_adherence_{k}": v["adherence"] for k, v in report["prompt_adherence"].items()}}


def run_generate(cfg, progress: bool = True) -> dict:
    """jobs/generate.py: check the inputs and masks, generate the missing shards on a Ray Data actor
    pool, then write manifest.json, README.md and preview.png. Returns the run summary.

    Rerunning the same command resumes: shards with a commit record are kept, every other file
    under data/ is deleted, and only the missing shards are generated.
    """
    import ray

    from . import __version__
    from .config import to_dict
    from .data.masks import check_masks, list_masks
    from .distributed import ensure_ray
    from .shards import (
        MANIFEST,
        ShardStore,
        dataset_card,
        dataset_stats,
        preview_image,
        shard_ranges,
    )

    checked = check_generate_inputs(cfg)
    resolution = checked["resolution"]
    refs = list_masks(cfg.masks, cfg.split, cfg.num_masks, resolution)
    masks, skipped = check_masks(refs, resolution, strict=cfg.strict)
    if not masks:
        raise ValueError(f"--masks {cfg.masks}: none of its {len(refs)} masks is usable; e.g. {skipped[0]['reason']}")
    store = ShardStore(cfg.output)
    identity = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IDENTITY}
    identity |= {"resolution": resolution, "lora_sha256": checked["lora_sha256"],
                 "controlnet_sha256": checked["controlnet_sha256"],
                 "masks_sha256": hashlib.sha256("\n".join(masks).encode()).hexdigest()}
    completed = store.prepare(identity, cfg.overwrite)
    shards = shard_ranges(cfg.num_samples, cfg.rows_per_shard)
    pending = [k for k in range(len(shards)) if k not in completed]

    started = time.perf_counter()
    new_samples = sum(len(shards[k]) for k in pending)
    actors = gpu = per_actor = None
    actor_peak_rss_mb = 0.0
    if pending:
        ensure_ray()
        actors, gpu, per_actor = generation_resources(cfg.num_actors, cfg.use_gpu, cfg.cpus_per_actor)
        actors = min(actors, len(pending))
        ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            ShardGenerator, batch_size=1,
            fn_constructor_kwargs={"cfg": cfg, "masks": masks, "resolution": resolution,
                                   "threads": None if gpu else int(per_actor)},
            # one shard in flight per actor: shards are long, so queueing them would only unbalance the pool
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_cpus=per_actor, num_gpus=1 if gpu else 0)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.num_samples, initial=cfg.num_samples - new_samples, unit="img", desc="generate",
                       file=sys.stderr)
        errors = {}
        try:
            for row in ds.iter_rows():  # one small commit record per shard: the rows stay in the shards
                record = json.loads(row["record"])
                if "error" in record:
                    errors[record["shard"]] = record["error"]
                else:
                    completed[record["shard"]] = record
                actor_peak_rss_mb = max(actor_peak_rss_mb, float(row["peak_rss_mb"]))
                if bar is not None:
                    bar.update(int(row["rows"]))
        finally:
            if bar is not None:
                bar.close()
        if errors:
            first = min(errors)
            raise RuntimeError(f"{len(errors)} shard(s) failed ({', '.join(map(str, sorted(errors)[:10]))}); the "
                               f"others are committed, so running the same command again generates only these. "
                               f"Shard {first}:\n{errors[first]}")
    elapsed = time.perf_counter() - started

    completed = store.completed()
    missing = [k for k in range(len(shards)) if k not in completed]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) were not committed ({', '.join(map(str, missing[:10]))}); "
                           "run the same command again to generate them")
    records = [completed[k] for k in range(len(shards))]
    stats = dataset_stats(store, records)
    example_prompt = store.read_shard(records[0]["file"], ["prompt"]).column(0)[0].as_py()
    manifest = {
        "format": "calora_ray generate shards v1",
        "num_samples": cfg.num_samples,
        "num_shards": len(records),
        "rows_per_shard": cfg.rows_per_shard,
        "resolution": resolution,
        "shards": records,
        "stats": stats,
        "num_masks": len(refs),
        "num_usable_masks": len(masks),
        "skipped": skipped,
        "lora_sha256": checked["lora_sha256"],
        "controlnet_sha256": checked["controlnet_sha256"],
        "example_prompt": example_prompt,
        "this_run": {"generated_samples": new_samples, "generated_shards": len(pending),
                     "resumed_shards": len(records) - len(pending), "elapsed_s": round(elapsed, 3),
                     "images_per_s": round(new_samples / elapsed, 3) if new_samples and elapsed > 0 else None,
                     "actors": actors, "gpu_per_actor": gpu, "cpus_per_actor": per_actor,
                     "actor_peak_rss_mb": round(actor_peak_rss_mb, 1) or None},
        "calora_ray_version": __version__,
        "config": to_dict(cfg),
    }
    measures = (store.read_json(MANIFEST) or {}).get("measures")  # added later (shards.update_card_measures)
    if measures:
        manifest["measures"] = measures
    store.write_text(MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    store.write_text("README.md", dataset_card(manifest, measures))
    grid = preview_image(store, records, cfg.preview_samples)
    if grid is not None:
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        store.put("preview.png", buf.getvalue())
    if cfg.measure_samples and is_toy_model(cfg.model):
        measures = probe_measures(store.uri, cfg.measure_samples)
        from .shards import update_card_measures

        update_card_measures(store.uri, measures)
    return {"output": store.uri, "samples": stats["rows"], "unique_sample_ids": stats["unique_sample_ids"],
            "shards": len(records), "generated_samples": new_samples, "resumed_shards": len(records) - len(pending),
            "elapsed_s": elapsed, "images_per_s": manifest["this_run"]["images_per_s"], "skipped": len(skipped),
            "actor_peak_rss_mb": manifest["this_run"]["actor_peak_rss_mb"]}


__all__ = [
    "MaskGenerator",
    "SamplePlan",
    "ShardGenerator",
    "augment_layout",
    "build_prompt",
    "class_pixels",
    "conditioning_channels",
    "control_image",
    "control_tensor",
    "load_controlnet",
    "plan_sample",
    "png_bytes",
    "run_generate",
    "sample_id",
    "sample_seed",
]
