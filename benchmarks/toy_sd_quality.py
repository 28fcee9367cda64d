"""The quality bars of a toy model, measured with jobs/measure.py's code, optionally written into its card.

    python benchmarks/toy_sd_quality.py --model models/toy-sd --update-card

Samples every style x viewpoint x condition prompt of the toy world (--samples-per-prompt images
each, DDIM --steps, guidance --guidance; seeds 0..n-1), then measures prompt adherence per
attribute with the toy-world probe, the kernel MMD to toy:world's val split and memorisation
against toy:world's 8000 training renders. The bar (the toy world issue): adherence >= 0.9 for
style, viewpoint and condition each. --update-card writes the numbers and the command into the
"Quality" section of MODEL_CARD.md (between its quality markers; appended if absent).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path


from calora_ray.measure import measure_model, summary_lines

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
BAR = 0.9


def section(report: dict, args, command: str) -> str:
    adh = report["prompt_adherence"]
    rows = "\n".join(f"| {name} | {a['adherence']:.3f} | {'yes' if a['adherence'] >= BAR else '**no**'} | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in a["by_value"].items()) + " |"
                     for name, a in adh.items())
    d, m = report["domain_alignment"], report["memorisation"]
    return f"""{BEGIN}
## Quality (measured by `benchmarks/toy_sd_quality.py`, jobs/measure.py's metrics)
`{command}`: {report['num_samples']} samples, {args.samples_per_prompt} per prompt over the 20 prompts
(every style x viewpoint x condition, conditions phrased as in the captions), DDIM {args.steps} steps,
guidance {args.guidance}, seeds 0..{args.samples_per_prompt - 1}. Adherence = the fraction of samples whose
toy-world probe prediction matches what the prompt asked (bar: >= {BAR}).

| attribute | adherence | bar met | by value |
|---|---|---|---|
{rows}

Kernel MMD^2 (probe features) to {d['reference_images']} toy:world val renders: {d['kernel_mmd2']:.4f}
(bandwidth {d['bandwidth']:.2f}). Memorisation: mean RMS pixel distance of a sample to its nearest
of {m['train_images']} training renders {m['mean_nn_rmse']:.4f} (min {m['min_nn_rmse']:.4f}).
How adherence grows with pretraining time: docs/benchmarks.md, "Pretraining time against adherence".
{END}
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/toy-sd")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--output", default="/tmp/toy_sd_quality")
    parser.add_argument("--update-card", action="store_true")
    args = parser.parse_args(argv)
    report = measure_model(args.model, args.output, num_images=args.samples_per_prompt, steps=args.steps,
                           guidance=args.guidance)
    print("\n".join(summary_lines(report)))
    if args.update_card:
        card = Path(args.model) / "MODEL_CARD.md"
        command = shlex.join(["python", "benchmarks/toy_sd_quality.py", *(argv if argv is not None else sys.argv[1:])])
        text, new = card.read_text(), section(report, args, command)
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
        card.write_text(pattern.sub(new, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + new)
        print(f"card: {card}")


if __name__ == "__main__":
    main()
