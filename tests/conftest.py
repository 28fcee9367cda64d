import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread for the whole suite: the tensors are small, and on a shared 2-core machine two
    OpenMP threads waiting on each other made steps 10-50x slower. Ray workers set their own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_job_main(script: str, *argv) -> tuple[int, str]:
    """Run jobs/<script>.py's main(argv) in this process (imported once per call, so tests stay fast):
    (exit code, stdout + stderr)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"job_{script}", ROOT / "jobs" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            module.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue()


@pytest.fixture
def tiny():
    """A fresh tiny SD-shaped model (tests attach adapters to it, so never shared)."""
    from calora_ray.models import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model saved as a standard diffusers directory (the from_pretrained path)."""
    from calora_ray.models import build_tiny, save_components

    return save_components(build_tiny(seed=0), tmp_path_factory.mktemp("tiny") / "tiny-sd")


def save_random_controlnet(path, sdxl: bool = False):
    """A random segmentation ControlNet of the tiny model (tiny-sdxl's with `sdxl`), saved at `path`:
    from_unet, with its zero convolutions made non-zero (a fresh ControlNet's output is exactly zero,
    so the label would not matter yet)."""
    import torch
    from diffusers import ControlNetModel

    from calora_ray.controlnet import conditioning_channels
    from calora_ray.models import build_tiny

    tiny = build_tiny(0, sdxl=sdxl)
    # seeded before from_unet: its conditioning embedding draws from the global generator, and a
    # fixture that differed per session put different pixels on rounding boundaries each time
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(tiny.unet, conditioning_embedding_out_channels=conditioning_channels(4))
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out]:
            module.weight.normal_(0, 0.05)
    controlnet.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def controlnet_dir(tmp_path_factory):
    """A random segmentation ControlNet for the tiny model (save_random_controlnet)."""
    return save_random_controlnet(tmp_path_factory.mktemp("controlnet") / "cn")


def _fixed_batch_loss(components, dataset, caption="Photorealistic first-person urban street view"):
    """L_diff on a fixed batch: the same images, VAE draws, noise and timesteps every call."""
    import numpy as np
    import torch

    from calora_ray.models import encode_images, encode_prompts
    from calora_ray.training import diffusion_step_loss

    g = torch.Generator().manual_seed(1234)
    images = np.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        latents = encode_images(components, images, g)
        cond = encode_prompts(components, [caption] * len(images), images.shape[1], images.shape[2])
        return float(diffusion_step_loss(components, latents, cond, g))


@pytest.fixture
def fixed_batch_loss():
    return _fixed_batch_loss
