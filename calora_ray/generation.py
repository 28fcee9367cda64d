"""Mask-conditioned generation: a label map + a prompt + a seed -> an image whose label is the mask.

The pieces, each usable on its own (plain torch / diffusers, no Ray):

- `MaskGenerator`: loads the model (+ CA-LoRA adapter, + segmentation ControlNet) once;
  `generate(labels, prompts, seeds, steps, guidance)` returns one image per label.
  jobs/generate.py's Ray Data actors and the Ray Serve deployment both use it.
- `build_prompt`: the paper's template "Photorealistic first-person urban street view with
  {class names} in {condition}", phrased exactly as the toy world's captions are.
- `sample_seed` / `sample_id` / `plan_sample`: everything random about sample `index` of a job
  derives from (job seed, index), so whichever actor or rerun makes a sample gives it the same
  noise, mask, condition and layout; its pixels are byte-identical for the same batch composition
  and within BATCH_TOLERANCE of that across compositions (the float rounding of batched kernels).
- `augment_layout`: flip and scale-crop of a label map (nearest-neighbour only).
- `check_generate_inputs`: what jobs/generate.py checks before any work.
- `ShardGenerator`: one shard -> its samples generated, written and committed (calora_ray.shards),
  its commit record returned; the callable class that calora_ray.ray_data's actor pool runs.
"""

from __future__ import annotations

import json
import resource
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from PIL import Image

from .cli import quiet_libraries
from .concepts import join_class_names
from .config import GenerateConfig, parse_resolution, size_label
from .controlnet import check_control_palette, control_image, controlnet_sha256, load_controlnet, vae_factor_of
from .data.labels import NUM_CLASSES, MaskError, class_names_present, palette_colors
from .data.png import encode_png
from .datasets import as_size, open_dataset
from .errors import UserValueError
from .lora import file_sha256, load_lora, lora_file
from .masks import MaskReader, MaskRef, load_checked
from .models import load_components, load_unet_skeleton, resolve_dtype
from .shards import SCHEMA, ShardStore, shard_ranges, table_bytes
from .toyworld.world import CONDITION_PHRASES, CONDITIONS, caption

# The style and viewpoint of the paper's generation prompt (docs/method.md, "Generation").
PROMPT_STYLE, PROMPT_VIEWPOINT = "photorealistic", "first-person"
# How far (in 0..255 pixel values) an image may move between batch compositions: the float rounding
# of batched kernels. Measured at most 1 (CPU, float32, toy models; benchmarks/batch_invariance.py,
# docs/benchmarks.md "Batch invariance"); the tests assert this bound.
BATCH_TOLERANCE = 2


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
    mask: int          # index into the list of masks (the planned one; see ShardGenerator.mask_for)
    condition: str
    flip: bool
    zoom: float        # >= 1: the crop's side is the mask's shorter side / zoom
    offset: tuple[float, float]  # (y, x) of the crop in [0, 1] of the free room


def plan_sample(job_seed: int, index: int, num_masks: int, conditions: list[str], weights: list[float],
                flip: bool = False, max_zoom: float = 1.0) -> SamplePlan:
    """Sample `index` uses mask index % num_masks (every listed mask equally often; ShardGenerator
    moves a sample whose mask is unusable to the next usable one), a condition drawn with `weights`,
    and — when asked — a random horizontal flip and a random crop zoomed up to max_zoom."""
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


def augment_layout(label: np.ndarray, resolution: int | tuple[int, int], flip: bool = False, zoom: float = 1.0,
                   offset: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """A label map of `resolution` (a side, or (height, width)) from `label` (HxW train ids).

    Crops the largest window of the output's aspect that fits, shrunk by 1/zoom, at `offset`
    ((y, x) in [0, 1] of the free room; (0.5, 0.5) = centred), resizes it nearest-neighbour only
    (no new ids on boundaries), and flips it left-right when `flip`. The image is generated at this
    size, so it matches the label. (A square output crops a square of the shorter side / zoom.)
    """
    out_h, out_w = as_size(resolution)
    h, w = label.shape
    if h * out_w <= w * out_h:  # the label is wider than the output's aspect: the full height fits
        crop_h, crop_w = h, h * out_w / out_h
    else:
        crop_h, crop_w = w * out_h / out_w, w
    zoom = max(zoom, 1.0)
    crop_h, crop_w = max(1, int(round(crop_h / zoom))), max(1, int(round(crop_w / zoom)))
    top = int(round((h - crop_h) * min(max(offset[0], 0.0), 1.0)))
    left = int(round((w - crop_w) * min(max(offset[1], 0.0), 1.0)))
    crop = np.ascontiguousarray(label[top:top + crop_h, left:left + crop_w])
    if crop.shape != (out_h, out_w):
        crop = np.asarray(Image.fromarray(crop).resize((out_w, out_h), Image.NEAREST))
    if flip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def class_pixels(label: np.ndarray) -> list[int]:
    """Pixel count of each train id 0..18 (index = train id); ignore (255) pixels are not counted."""
    return np.bincount(np.asarray(label).ravel(), minlength=256)[:NUM_CLASSES].astype(np.int64).tolist()


# ----------------------------------------------------------------------------- the generator


class MaskGenerator:
    """Label maps -> images with a (CA-LoRA'd) Stable Diffusion and a segmentation ControlNet.

        gen = MaskGenerator("toy-sd", lora="outputs/finetune", controlnet="outputs/controlnet")
        images = gen.generate(labels, prompts, seeds, steps=25, guidance=4.0)

    Constructor (loads everything once; keep the object for many calls):
      model       --model of every job: 'tiny', 'tiny-sdxl', 'toy-sd', a diffusers directory or a hub id.
                  SD-1.x/2.x-shaped models run StableDiffusionControlNetPipeline; SDXL-shaped ones (two
                  text encoders) StableDiffusionXLControlNetPipeline, with SDXL's size micro-conditioning
                  original_size = target_size = the label's (height, width), crop (0, 0): what
                  jobs/train_controlnet.py trains the ControlNet with.
      lora        a directory with pytorch_lora_weights.safetensors (jobs/finetune.py), or None.
      controlnet  a ControlNetModel directory (jobs/train_controlnet.py, or any diffusers
                  segmentation ControlNet), or None: then the images follow only the prompt and
                  the label is NOT their label (for looking at a model; the dataset job always
                  passes one).
      control_palette  the colours the ControlNet was trained on: 'cityscapes' (jobs/train_controlnet.py's
                  default) or 'ade20k' (public ones such as lllyasviel/control_v11p_sd15_seg); a
                  ControlNet whose controlnet.json records another palette is refused.
      device      torch device; default CUDA when available, else CPU.
      dtype       compute dtype of the text encoder, UNet and ControlNet; default float32 (bfloat16 on a
                  CPU or GPU, float16 on a GPU). The VAE always decodes in float32, as diffusers'
                  force_upcast does: SD VAE decoders overflow in fp16, and on the toy models the bf16
                  decode is the largest single source of deviation from fp32, for one call per image
                  against `steps` UNet + ControlNet calls (docs/benchmarks.md, "Precision").
      model_seed  the seed of the 'tiny' presets' random weights.

    generate(labels, prompts, seeds, steps, guidance, conditioning_scale=1.0) -> list of HxWx3 uint8:
      labels  list of HxW uint8 train-id maps (0..18, 255 = ignore), all the same size; the
              image is generated at that size (a multiple of 8 x the VAE factor).
      prompts one prompt per label (build_prompt makes the paper's).
      seeds   one int per label: image i starts from the noise of torch.Generator().manual_seed(
              seeds[i]) (drawn on the CPU in float32, then cast to dtype, so a seed gives the same
              noise on every device and in every precision); an
              image's content depends on its own seed, label and prompt only, not on the rest of
              the batch. Its bytes are reproducible for the same batch composition (the same
              labels, prompts and seeds in the same order in one call, on the same device, dtype
              and torch thread count), in any process. In another composition (alone, another
              batch size or position) or with another thread count a pixel value may move by
              float rounding of batched kernels: at most 1/255 measured (CPU, float32, toy models;
              benchmarks/batch_invariance.py), BATCH_TOLERANCE = 2 is the bound the tests assert.
              Generation is deliberately not batch-invariant: that would cost throughput.
    """

    def __init__(self, model: str, lora: str | None = None, controlnet: str | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 model_seed: int = 0, control_palette: str = "cityscapes"):
        palette_colors(control_palette)  # an unknown palette fails here, not at the first image
        if controlnet is not None:  # before the model loads: a wrong palette costs nothing
            check_control_palette(controlnet, control_palette)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float32
        components = load_components(model, model_seed)
        cast = None if self.dtype == torch.float32 else self.dtype  # fp32 is what they load as
        components.to(self.device)  # fp32, as they load; the VAE stays so (see the class docstring)
        for module in (components.unet, components.text_encoder, components.text_encoder_2):
            if module is not None:  # text_encoder_2: SDXL only
                module.to(dtype=cast)
        self.components = components
        self.model = model
        self.lora_sha256 = "" if lora is None else load_lora(components, lora)  # patches the shared UNet in place
        self.controlnet = None
        self.control_palette = control_palette
        if controlnet is not None:
            self.controlnet = load_controlnet(controlnet).to(self.device, cast).eval()
        self.pipe = self._pipeline()
        self.pipe.set_progress_bar_config(disable=True)

    def _pipeline(self):
        """The stock diffusers pipeline over the shared modules: text-to-image without a ControlNet,
        else the ControlNet pipeline of the model's family (SD or SDXL)."""
        c = self.components
        if self.controlnet is None:
            return c.pipeline()
        if c.is_sdxl:
            # No watermarker: generate() takes the latents and decodes them itself (decode), so the
            # pipeline's output postprocessing never runs; force_zeros_for_empty_prompt stays SDXL's
            # default (the unconditional branch is zeros; training.empty_prompt_conditioning).
            return StableDiffusionXLControlNetPipeline(
                vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
                tokenizer_2=c.tokenizer_2, unet=c.unet, controlnet=self.controlnet, scheduler=c.scheduler,
                add_watermarker=False)
        return StableDiffusionControlNetPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            controlnet=self.controlnet, scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    @property
    def native_resolution(self) -> int:
        """The side the base model was trained at (UNet sample size x VAE factor)."""
        return self.components.unet.config.sample_size * self.components.vae_scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """The pipeline's own decode and postprocessing of its final latents, with the latents cast to
        the VAE's dtype first (float32: the upcast decode): (B, H, W, 3) floats in [0, 1]. SDXL
        pipelines also undo per-channel latent statistics when the VAE's config records them."""
        vae = self.components.vae
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.components.is_sdxl and mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            latents = (latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor
                       + torch.tensor(mean).view(shape).to(latents))
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * len(image))

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """The starting latents: one draw per CPU generator, in float32 whatever self.dtype, then cast.
        diffusers draws them in the pipeline's dtype, and torch's CPU normal sampler in fp16 / bf16 is
        not the fp32 one rounded in every torch release: the same seed then starts a different image
        in half precision. The fp32 bytes are exactly diffusers' own (randn_tensor, one draw per
        generator)."""
        c = self.components
        shape = (1, c.unet.config.in_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        return noise.to(self.device, self.dtype)

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
                      generator=generators, latents=self.initial_noise(generators, height, width))
        if self.components.is_sdxl:  # the micro-conditioning the ControlNet was trained with (class docstring)
            kwargs.update(original_size=(height, width), target_size=(height, width), crops_coords_top_left=(0, 0))
        if self.controlnet is not None:
            kwargs.update(image=[control_image(np.asarray(label, dtype=np.uint8), self.control_palette)
                                 for label in labels],
                          controlnet_conditioning_scale=conditioning_scale)
        latents = self.pipe(list(prompts), output_type="latent", **kwargs).images
        images = self.decode(latents)  # (B, H, W, 3) floats in [0, 1]
        bad = [i for i, img in enumerate(images) if not np.isfinite(img).all()]
        if bad:  # a NaN would become a black pixel without a word: never write that into a dataset
            raise FloatingPointError(f"non-finite pixels in image(s) {bad} (seeds {[seeds[i] for i in bad]}) in "
                                     f"{str(self.dtype).replace('torch.', '')}; fp16 can overflow: try bf16 or fp32")
        return [(np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8) for img in images]


# ----------------------------------------------------------------------------- the dataset job's pieces


def check_generate_inputs(cfg: GenerateConfig) -> dict:
    """Everything jobs/generate.py checks before any work: returns {resolution: (height, width),
    lora_sha256, controlnet_sha256}. A UserError naming the flag for each bad input."""
    if cfg.controlnet is None:
        raise UserValueError("--controlnet is required: a segmentation ControlNet (jobs/train_controlnet.py output) "
                             "turns each label map into its image")
    unknown = [c for c in cfg.conditions if c not in CONDITION_PHRASES]
    if unknown:
        raise UserValueError(f"--conditions: unknown {', '.join(unknown)}; valid: {', '.join(CONDITIONS)}")
    for flag, uri in (("--output", cfg.output), ("--masks", cfg.masks)):
        if uri.startswith("memory://"):
            raise UserValueError(f"{flag} {uri}: memory:// lives inside one process and the Ray actors cannot see "
                                 "it; use a path, file:// or an object store (s3://, gs://, ...)")
    lora_sha = "" if cfg.lora is None else file_sha256(lora_file(cfg.lora))
    cn_sha = controlnet_sha256(cfg.controlnet)
    check_control_palette(cfg.controlnet, cfg.control_palette)
    factor = vae_factor_of(cfg.controlnet)
    size = parse_resolution(cfg.resolution)
    if size is None:
        native = load_unet_skeleton(cfg.model, cfg.model_seed).config.sample_size * factor
        size = (native, native)
    if size[0] % (factor * 8) or size[1] % (factor * 8):
        raise UserValueError(f"--resolution {size_label(size)}: each side must be a multiple of {factor * 8} "
                             f"(VAE factor {factor} x 8)")
    return {"resolution": size, "lora_sha256": lora_sha, "controlnet_sha256": cn_sha}


class ShardGenerator:
    """One shard of a generate run at a time: `gen(batch)` over rows {"shard": [k, ...]} generates
    each shard's samples (in batches of cfg.batch_size), writes and commits the shard
    (calora_ray.shards) and returns its commit record; the rows never pass through the caller.
    calora_ray.ray_data runs it as a Ray Data callable class on an actor pool (each actor loads
    the model once); it is as usable in one process.

    cfg: the GenerateConfig; masks: the listed masks, unchecked (sample i uses masks[i % len(masks)],
    or, when that one is unusable, the next usable one in list order: `mask_for`; the bad ones a
    shard met are in its commit record's "skipped"); resolution: the image size, (height, width) or a
    side; threads: torch CPU
    threads; device: where the model runs.
    """

    def __init__(self, cfg: GenerateConfig, masks: list[MaskRef], resolution: int, threads: int | None = None,
                 device: str | None = None):
        quiet_libraries()
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg, self.masks, self.resolution = cfg, list(masks), resolution
        self.generator = MaskGenerator(cfg.model, lora=cfg.lora, controlnet=cfg.controlnet, device=device,
                                       dtype=resolve_dtype(cfg.mixed_precision, device, cpu_bf16=True),
                                       model_seed=cfg.model_seed, control_palette=cfg.control_palette)
        self.reader = MaskReader()
        self.bad: dict[int, str] = {}  # mask index -> why it is unusable (this actor's knowledge)
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

    def mask_for(self, planned: int, met: dict[int, str]) -> tuple[int, np.ndarray]:
        """(index, train-id map) of the mask a sample planned on masks[planned] uses: that one, or the
        next usable one in list order (wrapping). The same whichever actor asks, so a run's rows do
        not depend on which actor met a bad mask first. Bad masks go into `met` (index -> reason);
        --strict raises on the first."""
        for step in range(len(self.masks)):
            j = (planned + step) % len(self.masks)
            if j not in self.bad:
                try:
                    return j, load_checked(self.reader, self.masks[j], self.resolution)
                except MaskError as e:
                    if self.cfg.strict:
                        raise MaskError(f"--strict: bad mask {e}") from None
                    self.bad[j] = str(e)
            met[j] = self.bad[j]
        raise MaskError(f"--masks {self.cfg.masks}: none of its {len(self.masks)} masks is usable; e.g. "
                        f"{next(iter(self.bad.values()))}")

    def make_rows(self, indices, met: dict[int, str] | None = None) -> dict[str, list]:
        """The shard-schema columns (shards.SCHEMA) of samples `indices`, generated in batches of
        cfg.batch_size; the bad masks met on the way go into `met`."""
        cfg = self.cfg
        met = {} if met is None else met
        rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        plans = [self.plan(i) for i in indices]
        for start in range(0, len(plans), cfg.batch_size):
            chunk = plans[start:start + cfg.batch_size]
            used = [self.mask_for(p.mask, met) for p in chunk]
            labels = [augment_layout(label, self.resolution, p.flip, p.zoom, p.offset)
                      for p, (_, label) in zip(chunk, used)]
            prompts = [build_prompt(label, p.condition, cfg.prompt_template) for label, p in zip(labels, chunk)]
            images = self.generator.generate(labels, prompts, [p.seed for p in chunk], cfg.steps, cfg.guidance,
                                             cfg.conditioning_scale)
            for p, (j, _), label, prompt, image in zip(chunk, used, labels, prompts, images):
                row = {"sample_id": p.sample_id, "image": encode_png(image), "label": encode_png(label),
                       "prompt": prompt, "condition": p.condition, "seed": p.seed, "width": label.shape[1],
                       "height": label.shape[0], "class_pixels": class_pixels(label), "model": cfg.model,
                       "lora_sha256": self.generator.lora_sha256, "mask": str(self.masks[j])}
                for name in SCHEMA.names:  # a column missing here is a KeyError, never a silent gap
                    rows[name].append(row[name])
        return rows

    def make_shard(self, k: int) -> dict:
        if self.cfg.simulate_failure_at_shard == k:
            raise RuntimeError(f"simulated failure while generating shard {k} (--simulate-failure-at-shard)")
        indices = shard_ranges(self.cfg.num_samples, self.cfg.rows_per_shard)[k]
        met: dict[int, str] = {}
        rows = self.make_rows(indices, met)
        data = table_bytes(rows, self.cfg.row_group_size)
        skipped = [{"mask": str(self.masks[j]), "reason": reason} for j, reason in sorted(met.items())]
        return self.store.write_shard(k, data, len(indices), rows["sample_id"][0], rows["sample_id"][-1],
                                      skipped=skipped)


def write_render_shards(uri: str, source: str, split: str = "train", start: int = 0, count: int = 500,
                        rows_per_shard: int = 50) -> list[dict]:
    """Images `start`..`start + count - 1` of a real set (`toy:target`, `toy:source`, a Cityscapes-
    layout directory) written at `uri` as committed shards in this job's row format, with their exact
    labels: what a perfect generator would give (a control set for jobs/evaluate.py, and the synthetic
    set of benchmarks/segmenter_throughput.py). Returns the commit records."""
    ds = open_dataset(source, split=split, num_images=start + count, resolution=None)
    store, records = ShardStore(uri), []
    for k, first in enumerate(range(start, start + count, rows_per_shard)):
        rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        for i in range(first, min(start + count, first + rows_per_shard)):
            item = ds[i]
            label = item["label"]
            row = {"sample_id": sample_id(0, i - start), "image": encode_png(item["image"]), "label": encode_png(label),
                   "prompt": "", "condition": "", "seed": 0, "width": label.shape[1], "height": label.shape[0],
                   "class_pixels": class_pixels(label), "model": f"{source} renders", "lora_sha256": "",
                   "mask": f"{source} {split} {item['name']}"}
            for name in SCHEMA.names:
                rows[name].append(row[name])
        records.append(store.write_shard(k, table_bytes(rows), len(rows["sample_id"]), rows["sample_id"][0],
                                         rows["sample_id"][-1]))
    return records


__all__ = [
    "MaskGenerator",
    "SamplePlan",
    "ShardGenerator",
    "BATCH_TOLERANCE",
    "augment_layout",
    "build_prompt",
    "class_pixels",
    "check_generate_inputs",
    "plan_sample",
    "sample_id",
    "sample_seed",
    "write_render_shards",
]
