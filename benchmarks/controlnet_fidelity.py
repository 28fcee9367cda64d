"""Does a segmentation ControlNet make images follow their masks? Label fidelity with the toy probe.

    python benchmarks/controlnet_fidelity.py --controlnet models/toy-sd-controlnet --update-card

Generates one image per held-out mask (first-person toy:world val renders with their own captions,
and toy:target val masks with the paper's prompt in clear weather), with the ControlNet and — same
seeds and prompts — without it, segments every image with the toy-world probe and reports the mIoU
against the mask it was generated from (jobs/measure.py's label fidelity). Writes fidelity.json,
grid.png (mask | image with ControlNet | probe segmentation | image without) and unusual.png
(hand-made layouts no render has, with and without) to --output; with
--update-card also the ControlNet's MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


import numpy as np
from PIL import Image

from calora_ray.datasets import open_dataset
from calora_ray.data.labels import NUM_CLASSES, colorize
from calora_ray.generation import MaskGenerator, build_prompt
from calora_ray.metrics import confusion_matrix, mean_iou
from calora_ray.probe import load_probe
from calora_ray.sampling import image_grid
from calora_ray.toyworld.world import first_person_indices


def held_out_masks(n: int) -> list[tuple[str, np.ndarray, str, np.ndarray]]:
    """(set, mask, prompt, render): n first-person world val renders with their captions, n
    toy:target val masks with the paper's prompt in clear weather."""
    world = open_dataset("toy:world", split="val", num_images=4 * n, resolution=64)
    items = [world[i] for i in first_person_indices("val", 4 * n)[:n]]
    rows = [("toy:world", it["label"], it["caption"], it["image"]) for it in items]
    target = open_dataset("toy:target", split="val", num_images=n, resolution=64)
    rows += [("toy:target", target[i]["label"], build_prompt(target[i]["label"], "clear"), target[i]["image"])
             for i in range(n)]
    return rows


def through_vae(model: str, images: list[np.ndarray]) -> list[np.ndarray]:
    """The renders encoded and decoded by the model's VAE: no generated image can be sharper, so the
    probe's score on these is the ceiling a generator of this model can reach."""
    import torch

    from calora_ray.models import decode_latents, encode_images, load_components

    c = load_components(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 16):
            latents = encode_images(c, np.stack(images[start:start + 16]), torch.Generator().manual_seed(0))
            out += list(decode_latents(c, latents))
    return out


def unusual_masks() -> list[np.ndarray]:
    """Layouts no street render has (an upside-down street, a vertical split, a wall of trees,
    a car in the sky): does the ControlNet follow the mask, or draw the street it knows?"""
    from calora_ray.data.labels import CLASS_NAMES

    cid = {name: i for i, name in enumerate(CLASS_NAMES)}
    street = open_dataset("toy:target", split="val", num_images=2, resolution=64)[1]["label"]
    split = np.full((64, 64), cid["road"], np.uint8)
    split[:, 32:] = cid["building"]
    split[:16] = cid["sky"]
    trees = np.full((64, 64), cid["vegetation"], np.uint8)
    trees[:24] = cid["sky"]
    trees[40:, 16:48] = cid["road"]
    car = np.full((64, 64), cid["sky"], np.uint8)
    car[32:] = cid["road"]
    car[:, :20] = cid["building"]
    car[8:36, 36:60] = cid["car"]
    return [street[::-1].copy(), split, trees, car]


def fidelity(probe, images: list[np.ndarray], masks: list[np.ndarray]) -> tuple[float, np.ndarray]:
    seg = probe.predict(np.stack(images))["segmentation"]
    conf = sum(confusion_matrix(s, m, NUM_CLASSES) for s, m in zip(seg, masks))
    return mean_iou(conf)[0], seg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--controlnet", default="models/toy-sd-controlnet")
    parser.add_argument("--masks", type=int, default=24, help="masks per set (two sets)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--output", default="/tmp/controlnet_fidelity")
    parser.add_argument("--update-card", action="store_true",
                        help="write fidelity.json, grid.png and MODEL_CARD.md into the --controlnet directory")
    parser.add_argument("--status", default=None, help="a verdict paragraph for the card's Status section")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    rows = held_out_masks(args.masks)
    masks = [r[1] for r in rows]
    prompts = [r[2] for r in rows]
    seeds = list(range(len(rows)))
    probe = load_probe()
    images = {}
    generators = {name: MaskGenerator(args.model, controlnet=controlnet, device="cpu")
                  for name, controlnet in (("controlnet", args.controlnet), ("prompt only", None))}
    for name, gen in generators.items():
        images[name] = []
        for start in range(0, len(rows), 8):
            images[name] += gen.generate(masks[start:start + 8], prompts[start:start + 8], seeds[start:start + 8],
                                         steps=args.steps, guidance=args.guidance)
    # Ceilings: the probe on the renders of these very masks, and on the renders through the VAE.
    images["renders"] = [r[3] for r in rows]
    images["renders through the VAE"] = through_vae(args.model, images["renders"])
    result = {"model": args.model, "controlnet": args.controlnet, "steps": args.steps, "guidance": args.guidance,
              "masks_per_set": args.masks, "miou": {}, "miou_other_mask": {}}
    segs = {}
    for name in images:
        for subset in ("toy:world", "toy:target"):
            idx = [i for i, r in enumerate(rows) if r[0] == subset]
            miou, seg = fidelity(probe, [images[name][i] for i in idx], [masks[i] for i in idx])
            result["miou"][f"{name} / {subset}"] = round(miou, 4)
            segs[name, subset] = dict(zip(idx, seg))
            # The same images against another mask of the set: what typical street layouts alone score.
            # own - other is what following *this* mask adds (about 0 for the prompt alone).
            other = fidelity(probe, [images[name][i] for i in idx], [masks[i] for i in idx[1:] + idx[:1]])[0]
            result["miou_other_mask"][f"{name} / {subset}"] = round(other, 4)
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")

    show = list(range(4)) + [i for i, r in enumerate(rows) if r[0] == "toy:target"][:4]
    grid_rows = [[Image.fromarray(colorize(masks[i])), Image.fromarray(images["controlnet"][i]),
                  Image.fromarray(colorize(segs["controlnet", rows[i][0]][i])),
                  Image.fromarray(images["prompt only"][i])] for i in show]
    image_grid(grid_rows, [f"{rows[i][0]}: {prompts[i]}" for i in show]).save(out / "grid.png")
    odd = unusual_masks()
    odd_prompts = [build_prompt(m, "clear") for m in odd]
    odd_rows = [[Image.fromarray(colorize(m))] for m in odd]
    for gen in generators.values():  # the ControlNet, then the prompt alone
        for row, img in zip(odd_rows, gen.generate(odd, odd_prompts, list(range(len(odd))), steps=args.steps,
                                                   guidance=args.guidance)):
            row.append(Image.fromarray(img))
    image_grid(odd_rows, ["mask | ControlNet | prompt only"] * len(odd)).save(out / "unusual.png")
    for k, v in result["miou"].items():
        other = result["miou_other_mask"].get(k)
        print(f"label fidelity mIoU  {k:<40} {v:.3f}" + (f"   vs another mask {other:.3f}" if other is not None else ""))
    print(f"grids: {out / 'grid.png'}, {out / 'unusual.png'}")
    if args.update_card:
        cn = Path(args.controlnet)
        for name in ("grid.png", "unusual.png"):
            (cn / name).write_bytes((out / name).read_bytes())
        (cn / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
        (cn / "MODEL_CARD.md").write_text(card(cn, result, args.status))


def training_stages(info: dict) -> list[dict]:
    """controlnet.json and the records of the runs it continued (init_record), oldest first."""
    stages = []
    while info:
        stages.append(info)
        info = info.get("init_record")
    return stages[::-1]


def card(cn: Path, r: dict, status: str | None = None) -> str:
    stages = training_stages(json.loads((cn / "controlnet.json").read_text()))
    where = {"cuda": "H100", "cpu": "CPU, 1 thread"}
    stage_rows = "\n".join(
        f"| {i + 1} | {where.get(s['device'], s['device'])} | {s['steps']} | {s['batch_size']} | {s['learning_rate']:g} | "
        f"{s.get('timesteps', 'uniform')} | {s.get('proportion_empty_prompts', 0.0):g} | {s['wall_s'] / 60:.1f} |"
        for i, s in enumerate(stages))
    notes = "\n".join(f"- stage {i + 1}: {s['note']}" for i, s in enumerate(stages) if s.get("note"))
    steps = sum(s["steps"] for s in stages)
    seen = sum(s["steps"] * s["batch_size"] for s in stages)
    minutes = {d: sum(s["wall_s"] for s in stages if s["device"] == d) / 60 for d in ("cuda", "cpu")}
    m, other = r["miou"], r.get("miou_other_mask", {})
    rows = "\n".join(f"| {k} | {v:.3f} | " + (f"{other[k]:.3f} | {v - other[k]:+.3f} |" if k in other else "— | — |")
                     for k, v in m.items())
    status_text = f"\n## Status\n{status}\n" if status else ""
    return f"""# toy-sd-controlnet

The segmentation ControlNet that ships with `toy-sd` (as users download, not train, the public
SD-1.5 segmentation ControlNets): a diffusers `ControlNetModel` initialised from toy-sd's UNet
(`ControlNetModel.from_unet`, conditioning embedding {json.loads((cn / 'config.json').read_text())['conditioning_embedding_out_channels']}
for the VAE's factor 4), conditioned on the Cityscapes-palette colour map of a label.

```python
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
controlnet = ControlNetModel.from_pretrained("models/toy-sd-controlnet")
pipe = StableDiffusionControlNetPipeline.from_pretrained("models/toy-sd", controlnet=controlnet)
```
or `--controlnet models/toy-sd-controlnet` in jobs/generate.py.

## Training
`jobs/train_toy_controlnet.py`: `calora_ray.training.controlnet_task` on the shared training loop
(what jobs/train_controlnet.py's Ray workers run) in one process, the UNet frozen; data:
{stages[-1]['data']}. Trained in {len(stages)} stages, each continuing the last (`--init`, a new
optimizer): {steps} steps, {seen / 1000:.0f}k image draws, {minutes['cuda']:.0f} min on an H100 and
{minutes['cpu']:.0f} min on CPU.

| stage | where | steps | batch | lr | timesteps | empty prompts | minutes |
|---|---|---|---|---|---|---|---|
{stage_rows}

{notes}

Last stage: `{stages[-1]['command']}`; final loss (mean of the last logged steps)
{stages[-1]['final_loss']:.4f}, curve in `loss.png` / `loss.csv`. Continue it with
`--init models/toy-sd-controlnet`.

## Label fidelity (benchmarks/controlnet_fidelity.py)
mIoU of the toy-world probe's segmentation of each generated image against the mask it was
generated from ({r['masks_per_set']} held-out masks per set, DDIM {r['steps']} steps, guidance {r['guidance']}, the
same seeds and prompts with and without the ControlNet), and against another mask of the same set:
typical street layouts score there too, so *own − other* is what following the image's own mask
adds (about 0 for the prompt alone). The ceilings: the probe on the renders of the same masks, and
on those renders encoded and decoded by toy-sd's VAE (no generated image can be sharper than the
VAE decodes; the probe, trained on renders, loses mIoU on blur).

| images / masks | mIoU, own mask | another mask | own − other |
|---|---|---|---|
{rows}
{status_text}
`grid.png`: mask | image with the ControlNet | the probe's segmentation of it | image from the prompt alone.

![grid](grid.png)

`unusual.png`: layouts no street render has (upside down, split vertically, a wall of trees, a car
in the sky) | with the ControlNet | prompt alone. A ControlNet that has learnt the mapping from
colours to classes follows them; one that has learnt street statistics draws a street.

![unusual layouts](unusual.png)
"""


if __name__ == "__main__":
    main()
