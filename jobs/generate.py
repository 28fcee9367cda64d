"""Turn label maps into a synthetic segmentation dataset: Parquet shards, generated on a Ray Data actor pool.

    python jobs/generate.py --model toy-sd --lora outputs/finetune --controlnet outputs/controlnet \
        --masks toy --num-samples 1000 --output outputs/generated
    ray job submit --working-dir . -- python jobs/generate.py ... --output s3://bucket/generated
    python jobs/generate.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --controlnet models/control_v11p_sd15_seg --control-palette ade20k ...   # docs/public-controlnets.md

Writes OUTPUT/data/shard-*.parquet (--rows-per-shard rows each), manifest.json, README.md (the
dataset card) and preview.png. Running the same command again after a crash resumes: completed
shards are kept, and the result holds exactly --num-samples unique sample_ids.
"""

from calora_ray.cli import run_job
from calora_ray.config import GenerateConfig, parse_config
from calora_ray.ray_data import run_generate


def main(argv=None):
    cfg = parse_config(GenerateConfig, argv, job="generate", description=__doc__)
    s = run_job(run_generate, cfg)
    rate = f"{s['images_per_s']:.2f} images/s" if s["images_per_s"] else "nothing left to generate"
    print(f"samples: {s['samples']} ({s['generated_samples']} generated now, {s['resumed_shards']} shard(s) resumed; "
          f"{rate})\nshards:  {s['shards']} in {s['output']}/data\nskipped: {s['skipped']} mask(s) "
          f"(see manifest.json)\ncard:    {s['output']}/README.md\npreview: {s['output']}/preview.png")


if __name__ == "__main__":
    main()
