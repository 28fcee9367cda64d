"""Train a segmentation ControlNet on target (image, label) pairs, on top of the CA-LoRA UNet.

    python jobs/train_controlnet.py --model toy-sd --lora outputs/finetune --data toy:target \
        --steps 2000 --output outputs/controlnet

The ControlNet starts as a copy of the UNet's encoder (ControlNetModel.from_unet) and learns to
steer the frozen UNet (with the LoRA applied) from the colour-coded label map. Writes OUTPUT/
config.json + diffusion_pytorch_model.safetensors (ControlNetModel.from_pretrained(OUTPUT); a
stock StableDiffusionControlNetPipeline, or StableDiffusionXLControlNetPipeline for an SDXL
model, runs with it), controlnet.json, loss.csv and loss.png.
Checkpoints and resume work as for jobs/finetune.py.
"""

from calora_ray.cli import run_job
from calora_ray.config import ControlNetConfig, parse_config
from calora_ray.ray_train import run_train_controlnet


def main(argv=None):
    cfg = parse_config(ControlNetConfig, argv, job="train_controlnet", description=__doc__)
    out = run_job(run_train_controlnet, cfg)
    print(f"ControlNet: {out} (ControlNetModel.from_pretrained)\nreport:     {out / 'controlnet.json'}\n"
          f"loss:       {out / 'loss.png'}")


if __name__ == "__main__":
    main()
