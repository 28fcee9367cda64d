"""The ablation sweep's report (issue 14): the paper's Table 3, Fig. 6 and Table 5, re-made in the toy world.

The sweep (one Ray Tune trial per selection mode, k, concept, seed and, for extra CA-LoRA trials, scoring
timestep) leaves one JSON per finished trial in `<dir>/trials/` and may leave `<dir>/scoring.json` (how
the projection ranking changes with the scoring timestep and samples). This module only reads those
files, so it runs anywhere, Ray or not:

- `load_trials` reads and checks the trials, `group_rows` averages each (mode, k, concept, timestep) over
  seeds (mean, sample std, n = seeds with a value; with the derived `miou_vs_none`), `table3` is the
  paper's Table 3 as markdown, `fig6` its Fig. 6 (alignment, adherence, label fidelity against k, one line
  per concept), `load_scoring` reads scoring.json, `table5` is the paper's Table 5 (the scoring
  timestep), `ranking_table` the ranking's stability against the number of scoring samples, and
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
OPTIONAL_METRICS = ("miou_real", "miou_real_synth")  # checked when present, null when absent
# Grouped over seeds: the file's metrics and the derived miou_vs_none (`miou_vs_none`).
GROUPED = (*METRICS, *OPTIONAL_METRICS, "miou_vs_none")
DEFAULT_TIMESTEP = 81  # the main scoring timestep when neither the caller nor scoring.json says
# Table 3's measured columns: (metric, header, decimals, signed).
COLUMNS = (("alignment_mmd2", "alignment MMD² ↓", 3, False), ("adherence_mean", "adherence ↑", 2, False),
           ("memorisation", "memorisation distance ↑", 3, False), ("label_fidelity", "label fidelity ↑", 2, False),
           ("miou_real_synth", "mIoU real+synth ↑", 1, False), ("miou_delta", "mIoU Δ vs real only ↑", 1, True),
           ("miou_vs_none", "mIoU Δ vs none ↑", 1, True))
# Table 5's measured columns: Table 3's, without the mIoU that needs a none trial of the same timestep.
TABLE5_COLUMNS = tuple(c for c in COLUMNS if c[0] not in ("miou_real_synth", "miou_vs_none"))
FIG6_PANELS = (("alignment_mmd2", "alignment MMD² (lower = closer to target)"),
               ("adherence_mean", "prompt adherence"), ("label_fidelity", "label fidelity (mIoU, 0..1)"))
_CONCEPT_COLOURS = {"style": "#4C72B0", "viewpoint": "#C44E52"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def load_trials(directory: str | Path) -> list[dict]:
    """Every `<directory>/trials/*.json`, checked (the required keys, a known mode, finite numbers or
    null for the metrics, an integer or null timestep, a list of names for modules, unique trial ids)
    and sorted by trial id."""
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
        bad = [key for key in ("k", *METRICS, *OPTIONAL_METRICS)
               if trial.get(key) is not None and not _is_number(trial[key])]
        if bad:
            raise UserValueError(f"{path}: {bad} must be finite numbers or null")
        if not isinstance(trial["trial"], str) or not _is_int(trial["seed"]):
            raise UserValueError(f"{path}: trial must be a string and seed an integer")
        if trial.get("timestep") is not None and not _is_int(trial["timestep"]):
            raise UserValueError(f"{path}: timestep must be an integer or null, got {trial['timestep']!r}")
        if trial.get("modules") is not None and not _is_names(trial["modules"]):
            raise UserValueError(f"{path}: modules must be a list of projection names")
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


def miou_vs_none(trials: list[dict]) -> list[float | None]:
    """Per trial, the paper's Table 3 mIoU delta: its miou_real_synth minus that of the `none` trial (at
    the main timestep) with the same seed; None if either is null, there is no such trial, or for the
    none trials themselves (the reference)."""
    none = {t["seed"]: t.get("miou_real_synth") for t in trials
            if t["mode"] == "none" and t.get("timestep") is None}
    return [None if t["mode"] == "none" or t.get("miou_real_synth") is None or none.get(t["seed"]) is None
            else t["miou_real_synth"] - none[t["seed"]] for t in trials]


def _timestep_key(timestep: int | None) -> tuple:
    return (timestep is not None, timestep or 0)  # the main timestep (None) first


def group_rows(trials: list[dict]) -> list[dict]:
    """One row per (mode, k, concept, timestep): its seeds, trial count and, per metric of GROUPED (with
    `miou_vs_none`), `_stat` over the seeds. Rows in Table 3's mode order, then concept, k, timestep
    (None = the main one, first). Two trials of one group with one seed are an error."""
    groups: dict[tuple, list[dict]] = {}
    for t, vs_none in zip(trials, miou_vs_none(trials)):
        key = (t["mode"], None if t["k"] is None else float(t["k"]), t["concept"], t.get("timestep"))
        groups.setdefault(key, []).append({**t, "miou_vs_none": vs_none})
    rows = []
    for (mode, k, concept, timestep), members in groups.items():
        seeds = Counter(t["seed"] for t in members)
        if max(seeds.values()) > 1:
            twice = [t["trial"] for t in members if seeds[t["seed"]] > 1]
            at = "" if timestep is None else f", t={timestep}"
            raise UserValueError(f"trials {twice} repeat one seed of ({mode}, k={k}, {concept}{at})")
        rows.append({"mode": mode, "k": k, "concept": concept, "timestep": timestep, "seeds": sorted(seeds),
                     "trials": len(members), **{m: _stat([t.get(m) for t in members]) for m in GROUPED}})
    return sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["concept"] or "", r["k"] or 0.0,
                                       *_timestep_key(r["timestep"])))


def _main(rows: list[dict]) -> list[dict]:
    """The rows scored at the main timestep (Table 3's and Fig. 6's)."""
    return [r for r in rows if r.get("timestep") is None]


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
    unnormalized at the sweep's main k and main timestep; mean ± sample std over seeds, with a caption line."""
    rows = _main(rows)
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
                   "sample's RMS pixel distance to its nearest training image (larger = less copying). mIoU in "
                   "points: real+synth is the segmenter trained on the real images plus the group's synthetic "
                   "set; Δ vs real only subtracts the segmenter trained on the real images alone; Δ vs none "
                   "subtracts real+synth of the none (pretrained) trial with the same seed, the paper's Table 3 "
                   "delta (— in the none row, the reference itself).")]
    return "\n".join(lines) + "\n"


def fig6(rows: list[dict], path: str | Path) -> None:
    """Fig. 6: alignment, adherence and label fidelity of CA-LoRA (normalized) against k, one line per
    concept with std error bars, dashed lines for none and full LoRA; a panel without data says so.
    Only the main timestep's rows."""
    rows = _main(rows)
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
TRIAL_COLUMNS = (("k", "k", "g"), ("timestep", "t", "d"), ("num_modules", "modules", "g"), ("param_percent", "params %", ".3f"),
                 ("steps", "steps", "g"), ("final_loss", "final loss", ".4f"),
                 ("alignment_mmd2", "alignment MMD²", ".3f"), ("adherence_mean", "adherence", ".2f"),
                 ("memorisation", "memorisation", ".3f"), ("label_fidelity", "label fidelity", ".2f"),
                 ("miou_real", "mIoU real", ".1f"), ("miou_real_synth", "mIoU real+synth", ".1f"),
                 ("miou_delta", "mIoU Δ", "+.1f"), ("elapsed_s", "time (s)", ".0f"))


def _trial_table(trials: list[dict]) -> list[str]:
    """One row per trial, in Table 3's order (mode, concept, k, timestep, seed)."""
    lines = ["| trial | mode | concept | seed | " + " | ".join(c[1] for c in TRIAL_COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(TRIAL_COLUMNS)]
    for t in sorted(trials, key=lambda t: (MODES.index(t["mode"]), t["concept"] or "", t["k"] or 0.0,
                                           *_timestep_key(t.get("timestep")), t["seed"])):
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


def _fail(path: Path, message: str):
    raise UserValueError(f"{path}: {message}")


def _check_run(path: Path, where: str, run) -> None:
    """A run's identity in scoring.json: {"timestep", "samples", "seed"}, integers."""
    if not isinstance(run, dict):
        _fail(path, f"{where} must be an object with timestep, samples and seed")
    missing = [key for key in ("timestep", "samples", "seed") if key not in run]
    if missing:
        _fail(path, f"{where}: missing keys {missing}")
    bad = [key for key in ("timestep", "samples", "seed") if not _is_int(run[key])]
    if bad:
        _fail(path, f"{where}: {bad} must be integers")


SCORING_KEYS = ("main_timestep", "main_samples", "reference", "ks", "rows")
SCORING_ROW_KEYS = ("concept", "study", "timestep", "samples", "seed", "against", "spearman", "overlap", "selected")


def load_scoring(directory: str | Path) -> dict | None:
    """`<directory>/scoring.json` (how the projection ranking moves with the scoring timestep and the
    number of samples), checked; None when the sweep did not write one."""
    path = Path(directory) / "scoring.json"
    if not path.exists():
        return None
    try:
        scoring = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(scoring, dict):
        _fail(path, f"expected a JSON object, got {type(scoring).__name__}")
    missing = [key for key in SCORING_KEYS if key not in scoring]
    if missing:
        _fail(path, f"missing keys {missing}")
    if not _is_int(scoring["main_timestep"]) or not _is_int(scoring["main_samples"]):
        _fail(path, "main_timestep and main_samples must be integers")
    _check_run(path, "reference", scoring["reference"])
    if not isinstance(scoring["ks"], list) or not all(_is_number(k) for k in scoring["ks"]):
        _fail(path, "ks must be a list of numbers")
    if not isinstance(scoring["rows"], list):
        _fail(path, "rows must be a list")
    for i, row in enumerate(scoring["rows"]):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            _fail(path, f"{where} must be an object")
        missing = [key for key in SCORING_ROW_KEYS if key not in row]
        if missing:
            _fail(path, f"{where}: missing keys {missing}")
        if not isinstance(row["concept"], str) or row["study"] not in ("timestep", "samples"):
            _fail(path, f"{where}: concept must be a string and study 'timestep' or 'samples'")
        _check_run(path, where, {key: row[key] for key in ("timestep", "samples", "seed")})
        _check_run(path, f"{where}.against", row["against"])
        if row["spearman"] is not None and not (_is_number(row["spearman"]) and -1 <= row["spearman"] <= 1):
            _fail(path, f"{where}: spearman must be a number in [-1, 1] or null")
        overlap = row["overlap"]
        if not isinstance(overlap, dict) or not all(_is_number(v) and 0 <= v <= 1 for v in overlap.values()):
            _fail(path, f"{where}: overlap must map k to a fraction in [0, 1]")
        if not _is_names(row["selected"]):
            _fail(path, f"{where}: selected must be a list of projection names")
    return scoring


def _agreement(values: list) -> str:
    """Spearman or overlap over the matching runs: 'x.xx' for one, 'mean ± std (n=…)' for several."""
    stat = _stat(values)
    if stat is None:
        return "—"
    if stat["n"] == 1:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} (n={stat['n']})"


def _study(scoring: dict | None, study: str) -> list[dict]:
    return [s for s in (scoring or {}).get("rows", []) if s["study"] == study]


def table5(rows: list[dict], scoring: dict | None, k: float = 2.0, main_timestep: int = DEFAULT_TIMESTEP) -> str:
    """The paper's Table 5 as markdown: per concept, one line per scoring timestep t (the main one and
    every other t with CA-LoRA trials at `k` or rows in scoring.json): the Spearman correlation and top-k
    overlap with t = main (scoring.json), then CA-LoRA's measured means ± std as in Table 3."""
    ca = [r for r in rows if r["mode"] == "normalized" and r["k"] is not None and math.isclose(r["k"], k)]
    runs = _study(scoring, "timestep")
    other = {(r["concept"], r["timestep"]) for r in ca if r.get("timestep") not in (None, main_timestep)}
    other |= {(s["concept"], s["timestep"]) for s in runs if s["timestep"] != main_timestep}
    picked = []  # (concept, t label, the trial group or None, Spearman, overlap)
    for concept in sorted({c for c, _ in other}, key=str):
        def group(t, concept=concept):
            return next((r for r in ca if r["concept"] == concept and r.get("timestep") == t), None)
        picked.append((concept, f"{main_timestep} (main)", group(None) or group(main_timestep), "1.00", "1.00"))
        for t in sorted(t for c, t in other if c == concept):
            matching = [s for s in runs if s["concept"] == concept and s["timestep"] == t]
            picked.append((concept, str(t), group(t), _agreement([s["spearman"] for s in matching]),
                           _agreement([s["overlap"].get(f"{k:g}") for s in matching])))
    full_n = max((r[m]["n"] for _, _, r, _, _ in picked if r is not None for m, *_ in TABLE5_COLUMNS
                  if r[m] is not None), default=0)
    lines = [f"| concept | t | Spearman vs t = {main_timestep} | top-{k:g} % overlap with t = {main_timestep} | "
             + " | ".join(c[1] for c in TABLE5_COLUMNS) + " |", "|---|---|---|---|" + "---|" * len(TABLE5_COLUMNS)]
    for concept, t, r, spearman, overlap in picked:
        cells = ["—" if r is None else _cell(r[m], d, sg, full_n) for m, _, d, sg in TABLE5_COLUMNS]
        lines.append(f"| {concept} | {t} | {spearman} | {overlap} | " + " | ".join(cells) + " |")
    lines += ["", (f"Spearman: rank correlation of the candidate projections' scores at t with those at "
                   f"t = {main_timestep} (same samples and seed); overlap: the fraction of the top-{k:g} % "
                   f"projections selected at t that t = {main_timestep} selects too (several runs: mean ± std "
                   f"(n=…)). A timestep whose selection equals t = {main_timestep}'s (overlap 1.00) trains exactly "
                   f"the same projections. The measured columns are CA-LoRA (normalized, top {k:g} %) scored at "
                   f"t: mean ± sample std over seeds as in Table 3; — : that trial group did not run or was not "
                   "measured.")]
    return "\n".join(lines) + "\n"


def ranking_table(scoring: dict, k: float = 2.0) -> str:
    """The ranking's stability against the number of scoring samples as markdown: per concept, one line per
    n (scoring.json's samples rows): Spearman and top-k overlap (every k of scoring["ks"] and `k`) against
    the reference run."""
    runs = _study(scoring, "samples")
    ks = sorted({float(x) for x in scoring["ks"]} | {float(k)})
    ref = scoring["reference"]
    lines = ["| concept | samples n | seed | Spearman vs reference | "
             + " | ".join(f"top-{x:g} % overlap" for x in ks) + " |", "|---|---|---|---|" + "---|" * len(ks)]
    for concept in sorted({s["concept"] for s in runs}):
        for n in sorted({s["samples"] for s in runs if s["concept"] == concept}):
            matching = [s for s in runs if s["concept"] == concept and s["samples"] == n]
            label = f"{n} (main)" if n == scoring["main_samples"] else str(n)
            seeds = ", ".join(str(x) for x in sorted({s["seed"] for s in matching}))
            lines.append(f"| {concept} | {label} | {seeds} | {_agreement([s['spearman'] for s in matching])} | "
                         + " | ".join(_agreement([s["overlap"].get(f"{x:g}") for s in matching]) for x in ks)
                         + " |")
    shared = sorted({s["seed"] for s in runs if s["seed"] == ref["seed"]})
    apart = ("The compared runs share no samples with it (different seeds), so agreement is the ranking's "
             "stability, not a repeat of the same draws." if not shared else
             f"Runs with seed {ref['seed']} share samples with it: their agreement is inflated.")
    lines += ["", (f"Spearman and top-k overlap of each run's projection ranking against the reference run "
                   f"(n = {ref['samples']} samples, seed {ref['seed']}, t = {ref['timestep']}); overlap: the "
                   f"fraction of the run's top-k % projections that the reference selects too. {apart}")]
    return "\n".join(lines) + "\n"


def write_report(directory: str | Path, *, title: str, command: str, machine: str, run_time_s: float,
                 left_out: list[str], k: float = 2.0, timestep: int | None = None) -> Path:
    """report.md (how it was run, trials finished of the grid, Table 3 at `k`, Fig. 6, Table 5 and the
    ranking's stability when their data exist, every trial, what was left out), fig6.png and results.json
    (the grouped rows, scoring.json's content) in `directory`; returns report.md. `timestep`: the main
    scoring timestep (None: scoring.json's main_timestep, else 81)."""
    directory = Path(directory)
    trials = load_trials(directory)
    rows = group_rows(trials)
    grid = _read_grid(directory)
    scoring = load_scoring(directory)
    if timestep is None:
        timestep = DEFAULT_TIMESTEP if scoring is None else scoring["main_timestep"]
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
              "![Fig. 6: alignment, adherence and label fidelity against k, per concept](fig6.png)", ""]
    if any(t.get("timestep") is not None for t in trials) or _study(scoring, "timestep"):
        lines += ["## Table 5 (toy world): the scoring timestep", "", table5(rows, scoring, k, timestep)]
    if _study(scoring, "samples"):
        lines += ["## Ranking stability: scoring samples", "", ranking_table(scoring, k)]
    lines += ["## Every trial", "", *_trial_table(trials), "",
              "## What was left out", "", *([f"- {item}" for item in left_out] or ["- nothing"])]
    tmp = directory / f".fig6.{uuid.uuid4().hex[:6]}.png"
    fig6(rows, tmp)
    tmp.replace(directory / "fig6.png")
    results = {"table3_k": k, "main_timestep": timestep, "trials_finished": len(trials),
               "grid_size": None if grid is None else len(grid), "not_finished": missing, "rows": rows,
               "scoring": scoring}
    atomic_write_text(directory / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(directory / "report.md", "\n".join(lines) + "\n")
    return directory / "report.md"
