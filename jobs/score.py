"""Score the concept sensitivity of every attention projection and select the top k%.

    python jobs/score.py --model tiny --data toy --concept style --top-k-percent 2 --output DIR
    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/demo.yaml

Writes DIR/sensitivity.json (scores, selection, provenance) and DIR/sensitivity.png.
"""

from calora_ray.config import ScoreConfig, parse_config
from calora_ray.cli import run_job
from calora_ray.ray_train import run_scoring


def main(argv=None):
    cfg = parse_config(ScoreConfig, argv, job="score", description=__doc__)
    out = run_job(run_scoring, cfg)
    print(f"report: {out / 'sensitivity.json'}\nplot:   {out / 'sensitivity.png'}")


if __name__ == "__main__":
    main()
