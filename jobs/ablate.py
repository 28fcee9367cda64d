"""The paper's ablation, re-tested: which attention projections should LoRA tune? One Ray Tune trial per
(selection mode, k, concept, seed), each a Ray Train fine-tuning run on the same few-shot target data
with the same budget, measured the same way (alignment to held-out target images, adherence to the
conditions the target lacks, memorisation, label fidelity); a report in the paper's shapes.

    python jobs/ablate.py --config jobs/configs/ablation.yaml --output docs/ablation      # the documented sweep
    python jobs/ablate.py --model tiny --modes none normalized --ks 2 --concepts style --seeds 0 \\
        --steps 4 --sample-images 2 --sample-steps 2 --controlnet none --output outputs/ablation-small
    ray job submit --working-dir . -- python jobs/ablate.py --config jobs/configs/ablation.yaml \\
        --use-gpu true --output /shared/ablation --work-dir /shared/ablation-work

Writes OUTPUT/trials/<trial>.json as each trial finishes (a rerun of the same command runs only the
missing trials; a trial killed while fine-tuning continues from its checkpoint), OUTPUT/grids/<trial>.png
(clear and night samples), and at the end OUTPUT/report.md, fig6.png and results.json.
"""

import os
import platform
import shlex
import sys

from calora_ray.cli import run_job
from calora_ray.config import AblateConfig, parse_config


def machine() -> str:
    """What the report says the sweep ran on."""
    import torch

    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "no GPU")
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(AblateConfig, argv, job="ablate", description=__doc__)
    from calora_ray.ray_tune import run_ablation  # after the flags: --help does not wait for Ray's import

    # the report shows the command that makes (or finishes) the whole sweep, whatever --stage this run is
    stage = [i for i, a in enumerate(argv) if a == "--stage"]
    shown = [a for i, a in enumerate(argv) if not any(i in (j, j + 1) for j in stage)]
    command = "python jobs/ablate.py " + " ".join(shlex.quote(a) for a in shown)
    report = run_job(run_ablation, cfg, command=command, machine=machine())
    print(f"report: {report}")


if __name__ == "__main__":
    main()
