"""Fine-tune LoRA on exactly the projections a sensitivity report selected (CA-LoRA).

    python jobs/finetune.py --model tiny --data toy:target --selection DIR/sensitivity.json \
        --steps 100 --output DIR2
    python jobs/finetune.py ... --selection all        # plain LoRA on every projection (baseline)

Writes DIR2/pytorch_lora_weights.safetensors (diffusers format: a stock pipeline loads it with
pipe.load_lora_weights(DIR2)), finetune.json, loss.csv and loss.png.
"""

from calora_ray.cli import run_job
from calora_ray.config import FinetuneConfig, parse_config
from calora_ray.ray_train import run_finetune


def main(argv=None):
    cfg = parse_config(FinetuneConfig, argv, job="finetune", description=__doc__)
    out = run_job(run_finetune, cfg)
    print(f"LoRA:   {out / 'pytorch_lora_weights.safetensors'}\nreport: {out / 'finetune.json'}\n"
          f"loss:   {out / 'loss.png'}")


if __name__ == "__main__":
    main()
