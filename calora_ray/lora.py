"""LoRA on exactly the selected projections: attach (peft), save in the diffusers format, load.

Two silent failures of diffusers / peft this module guards against (docs/method.md, "Fine-tuning"): a file saved without adapter
metadata loads with alpha = r whatever alpha was; and peft-native keys or keys without the
`unet.` prefix load as a no-op. `save_lora` therefore always writes metadata and goes through
diffusers' own `save_lora_weights`, and the tests compare outputs after loading.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from .errors import UserError, UserFileNotFoundError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class SelectionError(UserError, ValueError):
    """A selection that does not fit the model; the message names the file and the modules."""


def read_selection(path: str | Path) -> list[str]:
    """The 'selected' module names of a sensitivity.json written by jobs/score.py."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"--selection {path}: file not found (pass a sensitivity.json written "
                             f"by jobs/score.py, or 'all')")
    try:
        selected = json.loads(path.read_text())["selected"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SelectionError(f"--selection {path}: not a sensitivity report with a 'selected' list ({e})") from None
    if not isinstance(selected, list) or not selected or not all(isinstance(s, str) for s in selected):
        raise SelectionError(f"--selection {path}: 'selected' must be a non-empty list of module names")
    return selected


def check_modules(names: list[str], candidates: dict[str, nn.Module], source: str) -> None:
    """Every name must be a candidate projection of this UNet; else name the strangers."""
    unknown = [n for n in names if n not in candidates]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise SelectionError(
            f"{source}: {len(unknown)} selected module(s) are not attention projections of this "
            f"model's UNet: {shown}. Was the selection scored on another model? "
            f"(this UNet has {len(candidates)} candidates, e.g. {next(iter(candidates))})")


def attach_lora(unet: nn.Module, module_names: list[str], rank: int, alpha: float,
                adapter_name: str = "default"):
    """Add LoRA adapters (peft) to exactly `module_names` (full module paths); returns the LoraConfig.

    The base weights stay frozen; only lora_A / lora_B of those modules train (fp32).
    Full paths are matched exactly, so `...attn2.to_k` does not leak onto other `to_k` layers.
    """
    # An anchored alternation is matched with re.fullmatch by peft: exact full paths only.
    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in module_names) + ")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=pattern)
    unet.add_adapter(config, adapter_name=adapter_name)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return config


def trainable_modules(unet: nn.Module) -> list[str]:
    """Names of modules that own a trainable parameter (after attach_lora: the LoRA'd projections)."""
    names = set()
    for name, param in unet.named_parameters():
        if param.requires_grad:
            names.add(name.split(".lora_")[0] if ".lora_" in name else name.rsplit(".", 1)[0])
    return sorted(names)


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights with diffusers keys (`<module>.lora.down.weight`, no `unet.` prefix)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(components, unet: nn.Module, output_dir: str | Path) -> Path:
    """Write pytorch_lora_weights.safetensors that a stock pipeline loads with load_lora_weights.

    Goes through the pipeline class's own save_lora_weights (which adds the `unet.` prefix) and
    always stores the adapter config as metadata, so alpha != r survives the round trip.
    """
    pipeline_class = StableDiffusionXLPipeline if components.is_sdxl else StableDiffusionPipeline
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict()
    metadata = json.loads(json.dumps(metadata, default=lambda o: list(o) if isinstance(o, set) else str(o)))
    pipeline_class.save_lora_weights(output_dir, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    return Path(output_dir) / LORA_WEIGHT_NAME


def local_path(path: str | Path) -> Path:
    """A local path for a file or directory given as a path or a file:// URI."""
    return Path(str(path).removeprefix("file://"))


def lora_file(path: str | Path, flag: str = "--lora") -> Path:
    """The adapter file of a LoRA directory (a jobs/finetune.py output, path or file:// URI).

    The one check every job makes of a LoRA argument: a UserError naming `flag` when the
    directory holds no pytorch_lora_weights.safetensors.
    """
    file = local_path(path) / LORA_WEIGHT_NAME
    if not file.is_file():
        raise UserFileNotFoundError(f"{flag} {path}: no {LORA_WEIGHT_NAME} there (pass a jobs/finetune.py output)")
    return file


def load_lora(components, path: str | Path, flag: str = "--lora") -> str:
    """Load a LoRA directory into the components' UNet (in place, through the stock pipeline's
    load_lora_weights, as a user would); returns the adapter file's sha256."""
    file = lora_file(path, flag)
    components.pipeline().load_lora_weights(str(file.parent))  # patches the shared UNet in place
    return file_sha256(file)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
