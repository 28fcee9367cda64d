"""Does a synthetic dataset help a segmenter? Train mmsegmentation on the few real images alone and on
real + each synthetic set (mixed 1:1 in every batch), same schedule, crops and seeds; mIoU on held-out
real images.

    python jobs/evaluate.py --real toy:target --real-images 30 --val toy:target \\
        --synthetic outputs/generated --seeds 3 --output outputs/evaluate
    ray job submit --working-dir . -- python jobs/evaluate.py --model-config cityscapes-segformer-b5 \\
        --real /data/cityscapes --real-images 9 --val /data/cityscapes --synthetic s3://bucket/generated \\
        --seeds 3 --output /shared/evaluate

One Ray task per (set, seed), a GPU each when the cluster has GPUs. Writes OUTPUT/metrics.json,
report.md (mean ± std over seeds, delta over real only), per_class_iou.png and each run's mmseg work
dir under OUTPUT/runs/. Running the same command again skips the runs whose metrics are complete.
Needs the seg extra (make install-seg).
"""

import sys

from calora_ray.cli import run_job
from calora_ray.config import EvaluateConfig, parse_config


def main(argv=None):
    cfg = parse_config(EvaluateConfig, argv, job="evaluate", description=__doc__)
    try:  # after the flags: --help and a bad flag do not wait for mmseg's import
        from calora_ray.ray_eval import run_evaluate
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("mmseg", "mmengine", "mmcv"):
            print(f"error: jobs/evaluate.py needs the seg extra (mmsegmentation, mmengine, full mmcv; {e.name} is "
                  "missing): make install-seg", file=sys.stderr)
            sys.exit(2)
        raise
    s = run_job(run_evaluate, cfg)
    for row in s["summary"]:
        delta = "" if row["synthetic"] is None else f"  (delta {row['delta_mIoU']:+.2f})"
        print(f"{row['set']:<32} mIoU {row['mIoU_mean']:6.2f} ± {row['mIoU_std']:.2f} over {row['runs']} seed(s){delta}")
    print(f"runs:    {s['runs']} ({s['trained_now']} trained now, {s['skipped']} complete already)\n"
          f"metrics: {s['metrics']}\nreport:  {s['report']}\nplot:    {s['plot']}")


if __name__ == "__main__":
    main()
