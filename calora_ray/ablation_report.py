"""The ablation sweep's report (issue 14): the paper's Table 3 and Fig. 6, re-made in the toy world.

The sweep (one Ray Tune trial per selection mode, k, concept and seed) leaves one JSON per finished
trial in `<dir>/trials/`. This module only reads those files, so it runs anywhere, Ray or not:

- `load_trials` reads and checks them, `group_rows` averages each (mode, k, concept) over seeds
  (mean, sample std, n = seeds with a value), `table3` is the paper's Table 3 as markdown,
  `fig6` its Fig. 6 (alignment, adherence, label fidelity against k, one line per concept), and
  `write_report` writes report.md, fig6.png and results.json beside `trials/`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np

from .errors import UserFileNotFoundError, UserValueError
from .outputs import atomic_write_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("none", "all", "normalized", "unnormalized", "random")  # Table 3's row order
METRICS = ("alignment_mmd2", "adherence_mean", "memorisation", "label_fidelity", "miou_delta",
           "param_percent", "num_modules")
REQUIRED = ("trial", "mode", "k", "concept", "seed", *METRICS)
# Table 3's measured columns: (metric, header, decimals, signed).
COLUMNS = (("alignment_mmd2", "alignment MMD² ↓", 3, False), ("adherence_mean", "adherence ↑", 2, False),
           ("memorisation", "memorisation distance ↑", 3, False), ("label_fidelity", "label fidelity ↑", 2, False),
           ("miou_delta", "mIoU Δ ↑", 1, True))
FIG6_PANELS = (("alignment_mmd2", "alignment MMD² (lower = closer to target)"),
               ("adherence_mean", "prompt adherence"), ("label_fidelity", "label fidelity (mIoU, 0..1)"))
_CONCEPT_COLOURS = {"style": "#4C72B0", "viewpoint": "#C44E52"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_trials(directory: str | Path) -> list[dict]:
    """Every `<directory>/trials/*.json`, checked (the required keys, a known mode, finite numbers or
    null for the metrics, unique trial ids) and sorted by trial id."""
    folder = Path(directory) / "trials"
    if not folder.is_dir():
        raise UserFileNotFoundError(f"{folder}: no such directory (the sweep writes one JSON per finished trial there)")
    trials, seen = [], {}
    for path in sorted(folder.glob("*.json")):
        try:
            trial = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(trial, dict):
            raise UserValueError(f"{path}: expected a JSON object, got {type(trial).__name__}")
        missing = [key for key in REQUIRED if key not in trial]
        if missing:
            raise UserValueError(f"{path}: missing keys {missing}")
        if trial["mode"] not in MODES:
            raise UserValueError(f"{path}: mode {trial['mode']!r} is not one of {list(MODES)}")
        bad = [key for key in ("k", *METRICS) if trial[key] is not None and not _is_number(trial[key])]
        if bad:
            raise UserValueError(f"{path}: {bad} must be finite numbers or null")
        if not isinstance(trial["trial"], str) or not isinstance(trial["seed"], int) or isinstance(trial["seed"], bool):
            raise UserValueError(f"{path}: trial must be a string and seed an integer")
        if trial["trial"] in seen:
            raise UserValueError(f"{path}: trial id {trial['trial']!r} is also in {seen[trial['trial']]}")
        seen[trial["trial"]] = path
        trials.append(trial)
    return sorted(trials, key=lambda t: t["trial"])


def _stat(values: list) -> dict | None:
    """{"mean", "std" (sample, ddof=1; 0.0 for one value), "n"} over the non-null values; None if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def group_rows(trials: list[dict]) -> list[dict]:
    """One row per (mode, k, concept): its seeds, trial count and, per metric, `_stat` over the seeds.
    Rows in Table 3's mode order, then concept, then k. Two trials of one group with one seed are an error."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        key = (t["mode"], None if t["k"] is None else float(t["k"]), t["concept"])
        groups.setdefault(key, []).append(t)
    rows = []
    for (mode, k, concept), members in groups.items():
        seeds = Counter(t["seed"] for t in members)
        if max(seeds.values()) > 1:
            twice = [t["trial"] for t in members if seeds[t["seed"]] > 1]
            raise UserValueError(f"trials {twice} repeat one seed of ({mode}, k={k}, {concept})")
        rows.append({"mode": mode, "k": k, "concept": concept, "seeds": sorted(seeds), "trials": len(members),
                     **{m: _stat([t[m] for t in members]) for m in METRICS}})
    return sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["concept"] or "", r["k"] or 0.0))


def _group_label(row: dict) -> str:
    k = f"{row['k']:g}" if row["k"] is not None else "?"
    return {"none": "none (pretrained)", "all": "full LoRA", "normalized": f"CA-LoRA (normalized, top {k} %)",
            "random": f"random {k} %", "unnormalized": f"unnormalized {k} %"}[row["mode"]]


def _num(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _mean(stat: dict | None) -> float | None:
    return None if stat is None else stat["mean"]


def _cell(stat: dict | None, decimals: int, signed: bool, full_n: int) -> str:
    """'mean ± std'; one seed: 'mean (n=1)' (no misleading ± 0); fewer seeds than the table's most: '(n=…)'."""
    if stat is None:
        return "—"
    mean = f"{stat['mean']:{'+' if signed else ''}.{decimals}f}"
    if stat["n"] == 1:
        return f"{mean} (n=1)"
    return f"{mean} ± {stat['std']:.{decimals}f}" + (f" (n={stat['n']})" if stat["n"] != full_n else "")


def table3(rows: list[dict], k: float = 2.0) -> str:
    """The paper's Table 3 as markdown: none, full LoRA, then per concept CA-LoRA, random and
    unnormalized at the sweep's main k; mean ± sample std over seeds, with a caption line."""
    picked = [r for r in rows if r["mode"] in ("none", "all")]
    for concept in sorted({r["concept"] for r in rows if r["concept"] is not None}):
        for mode in ("normalized", "random", "unnormalized"):
            picked += [r for r in rows if r["mode"] == mode and r["concept"] == concept
                       and r["k"] is not None and math.isclose(r["k"], k)]
    ns = [r[m]["n"] for r in picked for m, *_ in COLUMNS if r[m] is not None]
    full_n = max(ns, default=0)
    lines = ["| tuned group | concept | modules | params % | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for r in picked:
        lines.append(f"| {_group_label(r)} | {r['concept'] or '—'} | {_num(_mean(r['num_modules']), 'g')} | "
                     f"{_num(_mean(r['param_percent']))} | "
                     + " | ".join(_cell(r[m], d, s, full_n) for m, _, d, s in COLUMNS) + " |")
    seeds = (f"over {full_n} seeds" if len(set(ns)) == 1 else "over seeds" if not ns
             else f"over seeds; (n=…) marks a cell with fewer than {full_n} seeds")
    lines += ["", (f"Mean ± sample standard deviation {seeds}; — : not measured. Memorisation distance is each "
                   "sample's RMS pixel distance to its nearest training image (larger = less copying); mIoU Δ in "
                   "points over the segmenter trained without synthetic data.")]
    return "\n".join(lines) + "\n"


def fig6(rows: list[dict], path: str | Path) -> None:
    """Fig. 6: alignment, adherence and label fidelity of CA-LoRA (normalized) against k, one line per
    concept with std error bars, dashed lines for none and full LoRA; a panel without data says so."""
    normalized = [r for r in rows if r["mode"] == "normalized" and r["k"] is not None]
    ks = sorted({r["k"] for r in normalized})
    refs = [(r, ":" if r["mode"] == "none" else "--", "0.4" if r["mode"] == "none" else "0.0")
            for r in rows if r["mode"] in ("none", "all")]
    concepts = sorted({r["concept"] for r in normalized}, key=str)
    fig, axes = plt.subplots(1, len(FIG6_PANELS), figsize=(13, 3.8), dpi=110)
    for ax, (metric, label) in zip(axes, FIG6_PANELS):
        drawn = False
        for i, concept in enumerate(concepts):
            points = sorted((r["k"], r[metric]) for r in normalized
                            if r["concept"] == concept and r[metric] is not None)
            shift = 0.06 * (i - (len(concepts) - 1) / 2)  # concepts side by side: error bars stay visible
            if points:
                ax.errorbar([ks.index(k) + shift for k, _ in points], [s["mean"] for _, s in points],
                            yerr=[s["std"] for _, s in points], marker="o", capsize=3, label=f"CA-LoRA, {concept}",
                            color=_CONCEPT_COLOURS.get(concept, f"C{i + 2}"))
                drawn = True
        for r, style, colour in refs:
            if r[metric] is not None:
                ax.axhline(r[metric]["mean"], linestyle=style, color=colour, linewidth=1.2,
                           label=_group_label(r) + (f", {r['concept']}" if r["concept"] else ""))
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_yticks([])
        else:
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(ks)), [f"{k:g} %" for k in ks])
        ax.set_xlim(-0.5, max(len(ks), 1) - 0.5)
        ax.set_xlabel("k (top-k % of candidate projections)")
        ax.set_title(label, fontsize=9)
    fig.suptitle("Fig. 6 (toy world): CA-LoRA against k, per concept (error bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# The per-trial table: (key, header, format); the keys beyond REQUIRED may be absent (shown as —).
TRIAL_COLUMNS = (("k", "k", "g"), ("num_modules", "modules", "g"), ("param_percent", "params %", ".3f"),
                 ("steps", "steps", "g"), ("final_loss", "final loss", ".4f"),
                 ("alignment_mmd2", "alignment MMD²", ".3f"), ("adherence_mean", "adherence", ".2f"),
                 ("memorisation", "memorisation", ".3f"), ("label_fidelity", "label fidelity", ".2f"),
                 ("miou_real", "mIoU real", ".1f"), ("miou_real_synth", "mIoU real+synth", ".1f"),
                 ("miou_delta", "mIoU Δ", "+.1f"), ("elapsed_s", "time (s)", ".0f"))


def _trial_table(trials: list[dict]) -> list[str]:
    """One row per trial, in Table 3's order (mode, concept, k, seed)."""
    lines = ["| trial | mode | concept | seed | " + " | ".join(c[1] for c in TRIAL_COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(TRIAL_COLUMNS)]
    for t in sorted(trials, key=lambda t: (MODES.index(t["mode"]), t["concept"] or "", t["k"] or 0.0, t["seed"])):
        lines.append(f"| {t['trial']} | {t['mode']} | {t['concept'] or '—'} | {t['seed']} | "
                     + " | ".join(_num(t.get(key), spec) for key, _, spec in TRIAL_COLUMNS) + " |")
    return lines


def _read_grid(directory: Path) -> list[str] | None:
    path = directory / "grid.json"
    if not path.exists():
        return None
    try:
        grid = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(grid, list) or not all(isinstance(x, str) for x in grid):
        raise UserValueError(f"{path}: expected a JSON list of trial ids")
    return grid


def write_report(directory: str | Path, *, title: str, command: str, machine: str, run_time_s: float,
                 left_out: list[str], k: float = 2.0) -> Path:
    """report.md (how it was run, trials finished of the grid, Table 3 at `k`, Fig. 6, every trial,
    what was left out), fig6.png and results.json (the grouped rows) in `directory`; returns report.md."""
    directory = Path(directory)
    trials = load_trials(directory)
    rows = group_rows(trials)
    grid = _read_grid(directory)
    done = {t["trial"] for t in trials}
    missing = [] if grid is None else [t for t in grid if t not in done]
    h, rest = divmod(round(run_time_s), 3600)
    lines = [f"# {title}", "", "Command:", "", "```", command, "```", "", f"- machine: {machine}",
             f"- run time: {run_time_s:.0f} s ({h}:{rest // 60:02d}:{rest % 60:02d})"]
    if grid is None:
        lines.append(f"- trials finished: {len(trials)} (no grid.json: the planned grid is unknown)")
    else:
        lines.append(f"- trials finished: {len(trials)} of {len(grid)} in the grid (grid.json)")
        if missing:
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            shown = ", ".join(f"`{t}`" for t in missing[:20]) + more
            lines.append(f"- not finished: {shown}")
        extra = sorted(done - set(grid))
        if extra:
            lines.append(f"- finished but not in grid.json: {', '.join(f'`{t}`' for t in extra)}")
    lines += ["", f"## Table 3 (toy world): selection modes at k = {k:g} %", "", table3(rows, k),
              "## Fig. 6 (toy world): CA-LoRA against k", "",
              "![Fig. 6: alignment, adherence and label fidelity against k, per concept](fig6.png)", "",
              "## Every trial", "", *_trial_table(trials), "",
              "## What was left out", "", *([f"- {item}" for item in left_out] or ["- nothing"])]
    tmp = directory / f".fig6.{uuid.uuid4().hex[:6]}.png"
    fig6(rows, tmp)
    tmp.replace(directory / "fig6.png")
    results = {"table3_k": k, "trials_finished": len(trials), "grid_size": None if grid is None else len(grid),
               "not_finished": missing, "rows": rows}
    atomic_write_text(directory / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(directory / "report.md", "\n".join(lines) + "\n")
    return directory / "report.md"
