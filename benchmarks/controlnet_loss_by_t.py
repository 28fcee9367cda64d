"""Does a segmentation ControlNet use its mask, and at which noise levels? Held-out L_diff by t.

    python benchmarks/controlnet_loss_by_t.py models/toy-sd-controlnet [more ControlNet dirs ...]

For 128 held-out first-person toy:world val renders (their own captions), the diffusion loss at
fixed timesteps without the ControlNet, with it and the render's own mask, and with it and another
render's mask (the masks shifted by one). A ControlNet that reads its mask lowers the loss with the
own mask and raises it with another; the gap at high t is what decides a sample's layout (a
sampler's first steps). Same noise draws for every column and every ControlNet. CUDA when present.
"""

from __future__ import annotations

import argparse


import numpy as np
import torch

from calora_ray.datasets import open_dataset
from calora_ray.controlnet import control_tensor
from calora_ray.losses import diffusion_target, noisy_latents
from calora_ray.models import encode_images, encode_prompts, load_components
from calora_ray.toyworld.world import first_person_indices

TIMESTEPS = (999, 900, 700, 500, 300)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("controlnets", nargs="+", help="ControlNet directories")
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--images", type=int, default=128)
    args = parser.parse_args(argv)
    from diffusers import ControlNetModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = load_components(args.model)
    c.to(device)
    world = open_dataset("toy:world", split="val", num_images=4 * args.images, resolution=64)
    items = [world[i] for i in first_person_indices("val", 4 * args.images)[:args.images]]
    with torch.no_grad():
        latents = encode_images(c, np.stack([it["image"] for it in items]), torch.Generator().manual_seed(0))
        cond = torch.cat([encode_prompts(c, [it["caption"]], 64, 64)["encoder_hidden_states"] for it in items])
        own = control_tensor([it["label"] for it in items], device)
        print(f"held-out L_diff, {len(items)} renders: no ControlNet / own mask / another mask")
        print(f"{'ControlNet':<40}" + "".join(f"{'t=' + str(t):>22}" for t in TIMESTEPS))
        for path in args.controlnets:
            cn = ControlNetModel.from_pretrained(path).to(device).eval()
            g = torch.Generator().manual_seed(1)
            cells = []
            for t0 in TIMESTEPS:
                t = torch.full((len(items),), t0, device=device)
                noise = torch.randn(latents.shape, generator=g).to(device)
                x = noisy_latents(c.noise_scheduler, latents, noise, t)
                target = diffusion_target(c.noise_scheduler, latents, noise, t)
                losses = []
                for control in (None, own, own.roll(1, 0)):
                    extra = {}
                    if control is not None:
                        down, mid = cn(x, t, encoder_hidden_states=cond, controlnet_cond=control, return_dict=False)
                        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
                    pred = c.unet(x, t, encoder_hidden_states=cond, **extra).sample
                    losses.append(float(((pred - target) ** 2).mean()))
                cells.append("{:.3f}/{:.3f}/{:.3f}".format(*losses))
            print(f"{str(path)[-40:]:<40}" + "".join(f"{cell:>22}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
