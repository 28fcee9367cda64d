"""Measure generated samples: prompt adherence, domain alignment, memorisation, label fidelity.

    python jobs/sample.py --model toy-sd --prompt "Photorealistic first-person urban street view at night" \
        --num-images 16 --output outputs/night
    python jobs/measure.py --samples outputs/night --output outputs/night/measure.json
    python jobs/measure.py --samples s3://bucket/dataset --reference toy:target --output measure.json

In the toy world the metrics use the toy-world probe (calora_ray.probe: trained on renders, cached
in the venv the first time, a few minutes); for real models pass --clip (a CLIP hub id or local
directory) to get CMMD and CLIP-score instead. Writes a JSON report and prints one line per metric.
"""

from calora_ray.cli import run_job
from calora_ray.config import MeasureConfig, parse_config
from calora_ray.measure import run_measure, summary_lines


def main(argv=None):
    cfg = parse_config(MeasureConfig, argv, job="measure", description=__doc__)
    report = run_job(run_measure, cfg)
    print("\n".join(summary_lines(report)) + f"\nreport: {cfg.output}")


if __name__ == "__main__":
    main()
