"""Sample images from a model (and a LoRA): the first thing to run to see what they do.

    python jobs/sample.py --model tiny --prompt "Photorealistic first-person urban street view" \
        "Sketch of urban street in top-down view at night" --num-images 4 --seed 0 --output DIR
    python jobs/sample.py --model toy-sd --lora outputs/demo/finetune --output DIR

Writes one PNG per image, grid.png (a row per prompt) and samples.json.
"""

from calora_ray.cli import run_job
from calora_ray.config import SampleConfig, parse_config
from calora_ray.sampling import run_sampling


def main(argv=None):
    cfg = parse_config(SampleConfig, argv, job="sample", description=__doc__)
    out = run_job(run_sampling, cfg)
    print(f"grid:   {out / 'grid.png'}\nimages: {out}")


if __name__ == "__main__":
    main()
