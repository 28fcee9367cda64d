"""Train a segmentation ControlNet on target (image, label) pairs, on top of the CA-LoRA UNet.

    python jobs/train_controlnet.py --model toy-sd --lora outputs/finetune --data toy:target \
        --steps 2000 --output outputs/controlnet

The ControlNet starts as a copy of the UNet's encoder (ControlNetModel.from_unet) and learns to
steer the frozen UNet (with the LoRA applied) from the colour-coded label map. Writes OUTPUT/
config.json + diffusion_pytorch_model.safetensors (ControlNetModel.from_pretrained(OUTPUT); a
stock StableDiffusionControlNetPipeline runs with it), controlnet.json, loss.csv and loss.png.
Checkpoints and resume work as for jobs/finetune.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from calora_ray.cli import run_job  # noqa: E402
from calora_ray.config import ControlNetConfig, parse_config  # noqa: E402
from calora_ray.training import run_train_controlnet  # noqa: E402


def main(argv=None):
    cfg = parse_config(ControlNetConfig, argv, job="train_controlnet", description=__doc__)
    out = run_job(run_train_controlnet, cfg)
    print(f"ControlNet: {out} (ControlNetModel.from_pretrained)\nreport:     {out / 'controlnet.json'}\n"
          f"loss:       {out / 'loss.png'}")


if __name__ == "__main__":
    main()
