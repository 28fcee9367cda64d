"""Load the diffusion components: `tiny` / `tiny-sdxl` (built in code), `toy-sd`, a local
diffusers directory, or a hub id.

A preset is resolved here, once, into ordinary diffusers / transformers objects; nothing
downstream asks which preset it got. `toy-sd` is just a local diffusers directory in the repo.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import diffusers
import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from huggingface_hub import constants
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

from .errors import UserError, UserValueError

REPO_ROOT = Path(__file__).resolve().parent.parent
# The project's own pretrained toy model (see the toy world issue), a standard diffusers directory.
TOY_SD_DIR = REPO_ROOT / "models" / "toy-sd"

# Every word the toy world's captions and the shipped concepts use; the tiny tokenizer knows each
# as one token (other text falls back to single characters, so any prompt still tokenizes).
TOKENIZER_WORDS = (
    "photorealistic sketch of first person urban street view in top down "
    "with and clear foggy rainy snowy weather at night a the "
    "road sidewalk building wall fence pole traffic light sign vegetation terrain sky rider car "
    "truck bus train motorcycle bicycle"
).split()


class ModelLoadError(UserError, RuntimeError):
    """The --model could not be loaded; the message says what to pass instead."""


@dataclass
class Components:
    """The pieces of a Stable Diffusion (or SDXL) pipeline that CA-LoRA needs."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # the inference scheduler the model ships with
    text_encoder_2: torch.nn.Module | None = None  # SDXL only
    tokenizer_2: object | None = None  # SDXL only

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @functools.cached_property
    def noise_scheduler(self):
        """The training-time DDPM view of the same noise schedule (built once)."""
        return DDPMScheduler.from_config(self.scheduler.config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self, **extra):
        """A stock diffusers text-to-image pipeline over these (shared, not copied) modules."""
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                scheduler=self.scheduler, **extra)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **extra)

    def to(self, device, dtype=None):
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self


# ----------------------------------------------------------------------------- tiny presets


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable unicode table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(words=TOKENIZER_WORDS, model_max_length: int = 77):
    """A CLIPTokenizer whose BPE merges build each of `words` into a single token.

    Built in code, so no vocabulary file has to be downloaded; saved with save_pretrained it
    loads back with CLIPTokenizer.from_pretrained like any other.
    """
    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    # Learn the merges the way BPE training does (most frequent pair first, ties by name) on
    # the word list itself: applying them in rank order then rebuilds every word whole. Chaining
    # each word's letters on its own would not: another word's earlier merge ("t h" of "the")
    # would split "weather".
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted({w.lower() for w in words})]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces in words:
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for k, pieces in enumerate(words):
            merged, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            words[k] = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _text_encoder_config(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32):
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=projection_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="quick_gelu")


def _sd_scheduler():
    # SD-1.5's schedule; clip_sample=False as in every SD scheduler config.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_tiny(seed: int = 0, sdxl: bool = False) -> Components:
    """A randomly initialised SD-shaped model (or SDXL-shaped with `sdxl=True`), deterministic by seed.

    UNet: two cross-attention down/up blocks (32, 64 channels) + mid block, 7 transformer blocks,
    56 candidate projections; VAE f=4 (64x64 images -> 4x16x16 latents); 2-layer CLIP text encoder.
    """
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_kwargs = dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32)
        if sdxl:
            # SDXL's extras: two text encoders (hidden states concatenated), pooled text + size
            # micro-conditioning through the "text_time" added embedding, 2-layer transformers.
            unet_kwargs.update(
                cross_attention_dim=64, transformer_layers_per_block=(1, 2),
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True)
        unet = UNet2DConditionModel(**unet_kwargs)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=64)
        text_encoder = CLIPTextModel(_text_encoder_config(len(tokenizer)))
        text_encoder_2 = tokenizer_2 = None
        if sdxl:
            text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(len(tokenizer)))
            tokenizer_2 = build_tokenizer()
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.eval()
    return Components(
        name="tiny-sdxl" if sdxl else "tiny", unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, scheduler=_sd_scheduler(), text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2)


# ----------------------------------------------------------------------------- from_pretrained


def _load_pretrained(path_or_id: str, local_only: bool) -> Components:
    kw = dict(local_files_only=local_only)
    index = DiffusionPipeline.load_config(path_or_id, **kw)
    unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", **kw)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, subfolder="tokenizer", **kw)
    scheduler_class = index.get("scheduler", [None, "DDIMScheduler"])[1]
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(path_or_id, subfolder="scheduler", **kw)
    text_encoder_2 = tokenizer_2 = None
    if "text_encoder_2" in index:
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path_or_id, subfolder="text_encoder_2", **kw)
        tokenizer_2 = AutoTokenizer.from_pretrained(path_or_id, subfolder="tokenizer_2", **kw)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.eval()
    return Components(name=str(path_or_id), unet=unet, vae=vae, text_encoder=text_encoder,
                      tokenizer=tokenizer, scheduler=scheduler, text_encoder_2=text_encoder_2,
                      tokenizer_2=tokenizer_2)


def _check_hub_reachable(model: str, timeout: float = 3.0) -> None:
    """One quick TCP connect to the hub, so an offline machine fails in seconds, not after retries."""
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {constants.ENDPOINT} ({e})") from None


_HINT = ("pass --model tiny or tiny-sdxl (random test models), --model toy-sd (the project's pretrained toy model), a "
         "local diffusers directory (e.g. one written by save_pretrained) or a reachable hub id")


def _load_local_or_hub(model: str, target: str, load=None):
    """`load(target, local_only)` for a local directory or a hub id, with errors that say what to pass."""
    load = load or _load_pretrained
    if os.path.exists(target):
        if not (Path(target) / "model_index.json").is_file():
            raise ModelLoadError(
                f"--model {model}: {target} is not a diffusers model directory (no model_index.json; "
                f"expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        try:
            return load(target, local_only=True)
        except Exception as e:  # noqa: BLE001 - whatever broke, the directory is not usable
            raise ModelLoadError(f"--model {model}: could not load the diffusers directory {target}: {e}") from e
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", target) or ".." in target:
        raise ModelLoadError(f"--model {model}: not a local directory (no such path) and not a hub id; {_HINT}")
    try:
        # The local cache first: an offline machine with the weights cached needs no network.
        return load(target, local_only=True)
    except Exception as cache_error:  # noqa: BLE001
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelLoadError(f"--model {model}: not a local directory, and the hub id is not in the local "
                                 f"cache (HF_HUB_OFFLINE=1); {_HINT}") from cache_error
    try:
        _check_hub_reachable(model)
        return load(target, local_only=False)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"--model {model}: not a local directory, and the hub id could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); without network access {_HINT}") from e


TINY_PRESETS = ("tiny", "tiny-sdxl")


def _target(model: str) -> str:
    """The path or hub id behind --model (presets resolved)."""
    if model != "toy-sd":
        return model
    if not (TOY_SD_DIR / "model_index.json").is_file():
        raise ModelLoadError(f"--model toy-sd: the pretrained toy model is not in this checkout ({TOY_SD_DIR} "
                             f"has no model_index.json); {_HINT}")
    return str(TOY_SD_DIR)


def load_unet_skeleton(model: str, seed: int = 0) -> torch.nn.Module:
    """The UNet's module tree without its weights (meta device): enough to list and check the
    candidate projections in a job's driver before any worker loads the real model."""
    if model in TINY_PRESETS:
        return build_tiny(seed, sdxl=model == "tiny-sdxl").unet

    def load(target, local_only):
        config = UNet2DConditionModel.load_config(target, subfolder="unet", local_files_only=local_only)
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)

    return _load_local_or_hub(model, _target(model), load)


def load_components(model: str, seed: int = 0) -> Components:
    """Resolve `--model` into components (fp32, CPU, eval mode, all weights frozen).

    'tiny' / 'tiny-sdxl' are built from `seed`; 'toy-sd' is the committed toy model directory;
    anything else is a local diffusers directory or a hub id loaded with `from_pretrained`.
    """
    if model in TINY_PRESETS:
        components = build_tiny(seed, sdxl=model == "tiny-sdxl")
    else:
        components = _load_local_or_hub(model, _target(model))
        components.name = model
    for m in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
    return components


def save_components(components: Components, directory: str | Path) -> Path:
    """Write the components as a standard diffusers directory (model_index.json, unet/, ...)."""
    directory = Path(directory)
    components.pipeline().save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------- devices, prompts


def resolve_dtype(mixed_precision: str, device: torch.device, cpu_bf16: bool = False) -> torch.dtype:
    """Compute dtype of frozen weights for --mixed-precision on `device`: fp16/bf16 on CUDA when asked;
    on CPU fp32 (training's autocast is CUDA-only), except bf16 when asked and `cpu_bf16` (generation).

    With `cpu_bf16`, fp16 on CPU is refused: CPUs have no fp16 arithmetic, and toy-sd generation ran
    ~16x slower than in fp32 (docs/benchmarks.md, "Precision").
    """
    if mixed_precision == "no" or (device.type != "cuda" and not cpu_bf16):
        return torch.float32
    if device.type != "cuda" and mixed_precision == "fp16":
        raise UserValueError(f"--mixed-precision fp16 on {device.type}: CPUs have no fp16 arithmetic (toy-sd "
                             "generation ~16x slower than fp32); use bf16 or no")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], height: int, width: int) -> dict:
    """UNet conditioning for `prompts`: kwargs for `unet(x, t, **cond)`.

    SD: {"encoder_hidden_states": (B, 77, D)}. SDXL: penultimate hidden states of both text
    encoders concatenated, plus "added_cond_kwargs" with the pooled embedding of the second
    and the size micro-conditioning (original = target = (height, width), no crop), as SDXL's
    pipeline does.
    """
    device = components.unet.device
    dtype = components.unet.dtype

    def ids(tokenizer):
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)

    if not components.is_sdxl:
        hidden = components.text_encoder(ids(components.tokenizer))[0]
        return {"encoder_hidden_states": hidden.to(dtype)}
    out1 = components.text_encoder(ids(components.tokenizer), output_hidden_states=True)
    out2 = components.text_encoder_2(ids(components.tokenizer_2), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    pooled = out2.text_embeds
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device).repeat(len(prompts), 1)
    return {"encoder_hidden_states": hidden.to(dtype),
            "added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}}


def expand_conditioning(cond: dict, batch: int) -> dict:
    """Repeat a conditioning of batch 1 (or B) to `batch` rows."""
    def rep(x):
        return x if x.shape[0] == batch else x.expand(batch, *x.shape[1:])

    out = {"encoder_hidden_states": rep(cond["encoder_hidden_states"])}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: rep(v) for k, v in cond["added_cond_kwargs"].items()}
    return out


def model_info(components: Components) -> dict:
    """What a report records about the base model."""
    return {"model": components.name, "sdxl": components.is_sdxl,
            "unet_parameters": sum(p.numel() for p in components.unet.parameters()),
            "prediction_type": components.scheduler.config.prediction_type,
            "unet_config": json.loads(json.dumps(dict(components.unet.config), default=str))}


@torch.no_grad()
def encode_images(components: Components, images, generator: torch.Generator | list | None = None) -> torch.Tensor:
    """uint8 images (B, H, W, 3) (numpy or tensor) -> scaled VAE latents (B, C, H/f, W/f).

    Samples the VAE posterior (as diffusers' training scripts do) with `generator`, and applies
    the VAE's scaling (and shift, where the config has one).
    """
    vae = components.vae
    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2).to(device=vae.device, dtype=vae.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    if isinstance(generator, list):
        # One generator per image: a sample's latent does not depend on its batch neighbours' draws.
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
    latents = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode_latents(components: Components, latents: torch.Tensor) -> np.ndarray:
    """The inverse of encode_images: scaled VAE latents (B, C, h, w) -> uint8 images (B, H, W, 3)."""
    vae = components.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
