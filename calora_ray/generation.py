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

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .concepts import join_class_names
from .data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, class_names_present, colorize
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
        return [(np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8) for img in images]


def load_controlnet(path: str):
    """A diffusers ControlNetModel from a local directory (or a hub id)."""
    from diffusers import ControlNetModel

    local = _local_dir(path)
    try:
        return ControlNetModel.from_pretrained(local)
    except (OSError, ValueError, EnvironmentError) as e:
        raise FileNotFoundError(f"--controlnet {path}: not a diffusers ControlNet directory "
                                f"(config.json + diffusion_pytorch_model.safetensors) ({str(e).splitlines()[0]})") from None


def _local_dir(path: str) -> str:
    """A local path for a model directory given as a path or file:// URI."""
    return path[len("file://"):] if path.startswith("file://") else path


__all__ = ["MaskGenerator", "SamplePlan", "augment_layout", "build_prompt", "class_pixels", "control_image",
           "conditioning_channels", "load_controlnet", "plan_sample", "png_bytes", "sample_id", "sample_seed",
           "CLASS_NAMES", "IGNORE_INDEX"]
