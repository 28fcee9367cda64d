"""Does a segmentation ControlNet make images follow their masks? Label fidelity with the toy probe.

    python benchmarks/controlnet_fidelity.py --controlnet models/toy-sd-controlnet --update-card

Generates one image per held-out mask (first-person toy:world val renders with their own captions,
and toy:target val masks with the paper's prompt in clear weather), with the ControlNet and — same
seeds and prompts — without it, segments every image with the toy-world probe and reports the mIoU
against the mask it was generated from (jobs/measure.py's label fidelity). Writes fidelity.json and
grid.png (mask | image with ControlNet | probe segmentation | image without) to --output; with
--update-card also the ControlNet's MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from calora_ray.data import open_dataset  # noqa: E402
from calora_ray.data.labels import NUM_CLASSES, colorize  # noqa: E402
from calora_ray.generation import MaskGenerator, build_prompt  # noqa: E402
from calora_ray.metrics import confusion_matrix, mean_iou  # noqa: E402
from calora_ray.probe import load_probe  # noqa: E402
from calora_ray.sampling import image_grid  # noqa: E402


def held_out_masks(n: int) -> list[tuple[str, np.ndarray, str]]:
    """(set, mask, prompt): n first-person world val renders, n toy:target val masks."""
    world = open_dataset("toy:world", split="val", num_images=4 * n, resolution=64)
    items = [world[i] for i in range(4 * n)]
    rows = [("toy:world", it["label"], it["caption"]) for it in items if it["viewpoint"] == "first-person"][:n]
    target = open_dataset("toy:target", split="val", num_images=n, resolution=64)
    rows += [("toy:target", target[i]["label"], build_prompt(target[i]["label"], "clear")) for i in range(n)]
    return rows


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
    parser.add_argument("--update-card", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    rows = held_out_masks(args.masks)
    masks = [m for _, m, _ in rows]
    prompts = [p for _, _, p in rows]
    seeds = list(range(len(rows)))
    probe = load_probe()
    images = {}
    for name, controlnet in (("controlnet", args.controlnet), ("prompt only", None)):
        gen = MaskGenerator(args.model, controlnet=controlnet, device="cpu")
        images[name] = []
        for start in range(0, len(rows), 8):
            images[name] += gen.generate(masks[start:start + 8], prompts[start:start + 8], seeds[start:start + 8],
                                         steps=args.steps, guidance=args.guidance)
    result = {"model": args.model, "controlnet": args.controlnet, "steps": args.steps, "guidance": args.guidance,
              "masks_per_set": args.masks, "miou": {}}
    segs = {}
    for name in images:
        for subset in ("toy:world", "toy:target"):
            idx = [i for i, r in enumerate(rows) if r[0] == subset]
            miou, seg = fidelity(probe, [images[name][i] for i in idx], [masks[i] for i in idx])
            result["miou"][f"{name} / {subset}"] = round(miou, 4)
            segs[name, subset] = dict(zip(idx, seg))
    # The probe on the renders themselves: the ceiling a perfect generator would reach.
    world = open_dataset("toy:world", split="val", num_images=4 * args.masks, resolution=64)
    renders = [world[i] for i in range(4 * args.masks) if world[i]["viewpoint"] == "first-person"][:args.masks]
    result["miou"]["renders (probe ceiling) / toy:world"] = round(
        fidelity(probe, [r["image"] for r in renders], [r["label"] for r in renders])[0], 4)
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")

    show = list(range(4)) + [i for i, r in enumerate(rows) if r[0] == "toy:target"][:4]
    grid_rows = [[Image.fromarray(colorize(masks[i])), Image.fromarray(images["controlnet"][i]),
                  Image.fromarray(colorize(segs["controlnet", rows[i][0]][i])),
                  Image.fromarray(images["prompt only"][i])] for i in show]
    image_grid(grid_rows, [f"{rows[i][0]}: {prompts[i]}" for i in show]).save(out / "grid.png")
    for k, v in result["miou"].items():
        print(f"label fidelity mIoU  {k:<40} {v:.3f}")
    print(f"grid: {out / 'grid.png'}")
    if args.update_card:
        cn = Path(args.controlnet)
        (cn / "grid.png").write_bytes((out / "grid.png").read_bytes())
        (cn / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
        (cn / "MODEL_CARD.md").write_text(card(cn, result))


def card(cn: Path, r: dict) -> str:
    info = json.loads((cn / "controlnet.json").read_text())
    m = r["miou"]
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in m.items())
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
`{info['command']}` (output then copied here): `calora_ray.training.controlnet_task` on the
shared training loop — what jobs/train_controlnet.py's Ray workers run — in one process on
{'an H100' if info['device'] == 'cuda' else 'CPU'}, {info['steps']} steps at batch {info['batch_size']}, lr {info['learning_rate']},
{info['wall_s'] / 60:.1f} min; data: {info['data']} ({info['training_images']} images), the UNet frozen.
Final loss (mean of the last logged steps) {info['final_loss']:.4f}; curve in `loss.png` / `loss.csv`.
On 2 CPU cores the same run would take hours; train longer ones on a GPU.

## Label fidelity (benchmarks/controlnet_fidelity.py)
mIoU of the toy-world probe's segmentation of each generated image against the mask it was
generated from ({r['masks_per_set']} held-out masks per set, DDIM {r['steps']} steps, guidance {r['guidance']}, the
same seeds and prompts with and without the ControlNet). The probe's own mIoU on the renders is the
ceiling.

| images / masks | mIoU |
|---|---|
{rows}

`grid.png`: mask | image with the ControlNet | the probe's segmentation of it | image from the prompt alone.

![grid](grid.png)
"""


if __name__ == "__main__":
    main()
