"""The segmentation ControlNet: its conditioning image and its directory (the one module that
checks, reads and writes one).

- The conditioning of a label map (HxW Cityscapes train ids) is its palette colour image
  (`data.labels.colorize`, ignore = black) at the label's own size, so no colour is ever
  interpolated: `control_image` (PIL, what a ControlNet pipeline takes) and `control_tensor`
  ((B, 3, H, W) in [0, 1], what training and a direct call take). The palette is the one the
  ControlNet was trained on (--control-palette): 'cityscapes' (jobs/train_controlnet.py's default) or
  'ade20k' (public segmentation ControlNets; data.labels.ADE20K_CLASSES).
- `recorded_palette` / `check_control_palette`: the palette a ControlNet directory's controlnet.json
  (jobs/train_controlnet.py's record) says it was trained on, and the check that it is the one asked for.
- A ControlNet directory is a diffusers `ControlNetModel.save_pretrained` output: config.json +
  diffusion_pytorch_model.safetensors (a downloaded one may carry the .bin instead).
  `controlnet_dir` checks one, `load_controlnet` loads it, `save_controlnet` writes one.
- `conditioning_channels`: the conditioning-embedding widths for a VAE factor (SD's f = 8, the
  toy models' f = 4), and `vae_factor_of` reads it back from a directory's config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image

from .data.labels import colorize
from .errors import UserFileNotFoundError, UserValueError
from .lora import file_sha256, local_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
CONTROLNET_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what this project writes
RECORD_NAME = "controlnet.json"  # jobs/train_controlnet.py's record of how the ControlNet was trained
DEFAULT_CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' default: SD's f = 8


def control_image(label: np.ndarray, palette: str = "cityscapes") -> Image.Image:
    """The ControlNet conditioning image of a label map: its colours in `palette` ('cityscapes' or
    'ade20k'; ignore = black), at the label's own size."""
    return Image.fromarray(colorize(label, palette))


def control_tensor(labels: list[np.ndarray], device: torch.device | str = "cpu",
                   palette: str = "cityscapes") -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1]: the control images of `labels` in `palette` as a ControlNet
    pipeline feeds them (for training and for calling a ControlNet directly)."""
    images = torch.from_numpy(np.stack([colorize(np.asarray(label, dtype=np.uint8), palette) for label in labels]))
    return images.permute(0, 3, 1, 2).to(device, torch.float32) / 255.0


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """ControlNet conditioning-embedding widths whose stride-2 convolutions map the image to the
    latent size: SD's (16, 32, 96, 256) for f = 8, one fewer stage for the tiny models' f = 4."""
    stages = int(np.log2(vae_scale_factor))
    widths = (16, 32, 96, 256, 256)
    if 2 ** stages != vae_scale_factor or stages + 1 > len(widths):
        raise ValueError(f"unsupported VAE downsampling factor {vae_scale_factor}")
    return widths[:stages + 1]


def controlnet_dir(path: str | Path, flag: str = "--controlnet") -> Path:
    """The local directory of a ControlNet argument (path or file:// URI), checked: config.json and
    the weights must be there; a UserError naming `flag` otherwise."""
    directory = local_path(path)
    if not (directory / CONFIG_NAME).is_file() or controlnet_weights(directory) is None:
        raise UserFileNotFoundError(
            f"{flag} {path}: not a diffusers ControlNet directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}; "
            "pass a jobs/train_controlnet.py output, or a diffusers ControlNet downloaded from the hub: "
            "docs/public-controlnets.md)")
    return directory


def controlnet_weights(directory: str | Path) -> Path | None:
    """The weights file of a ControlNet directory (safetensors first), or None."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def controlnet_sha256(path: str | Path, flag: str = "--controlnet") -> str:
    """sha256 of a checked ControlNet directory's weights (what manifests and /v1/info record)."""
    return file_sha256(controlnet_weights(controlnet_dir(path, flag)))


def recorded_palette(path: str | Path, flag: str = "--controlnet") -> str | None:
    """The conditioning palette a checked ControlNet directory was trained on, from its controlnet.json
    (jobs/train_controlnet.py's record; one written before the option existed means 'cityscapes', the
    only palette then), or None when it has no such record (e.g. a downloaded ControlNet)."""
    record = controlnet_dir(path, flag) / RECORD_NAME
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text()).get("control_palette", "cityscapes")
    except (ValueError, AttributeError):
        raise UserValueError(f"{flag} {path}: {RECORD_NAME} is not a JSON object") from None


def check_control_palette(path: str | Path, palette: str, flag: str = "--controlnet") -> None:
    """A UserError when the ControlNet directory records another conditioning palette than `palette`
    (one without a record is trusted to take `palette`)."""
    recorded = recorded_palette(path, flag)
    if recorded is not None and recorded != palette:
        raise UserValueError(
            f"{flag} {path} was trained on the {recorded} palette (its {RECORD_NAME}), but --control-palette "
            f"is {palette}: pass --control-palette {recorded}, or a ControlNet trained on the {palette} palette")


def vae_factor_of(path: str | Path, flag: str = "--controlnet") -> int:
    """The VAE downsampling factor a ControlNet directory was built for (from its conditioning
    embedding: each stage after the first halves the image)."""
    config = json.loads((controlnet_dir(path, flag) / CONFIG_NAME).read_text())
    return 2 ** (len(config.get("conditioning_embedding_out_channels", DEFAULT_CONDITIONING_CHANNELS)) - 1)


def load_controlnet(path: str | Path, flag: str = "--controlnet") -> ControlNetModel:
    """A diffusers ControlNetModel from a checked ControlNet directory."""
    directory = controlnet_dir(path, flag)
    try:
        return ControlNetModel.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise UserValueError(f"{flag} {path}: not a loadable diffusers ControlNet directory "
                             f"({str(e).splitlines()[0]})") from None


def save_controlnet(controlnet: ControlNetModel, directory: str | Path) -> Path:
    """Write a ControlNet directory (config.json + diffusion_pytorch_model.safetensors)."""
    controlnet.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)
