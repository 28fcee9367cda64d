"""The paper's ablation in the toy world (issue 14): which projections to tune, and what it costs.

One trial = (selection mode, k, concept, seed):

    none          the pretrained model, no LoRA                      (k, concept: None)
    all           LoRA on every candidate projection (full LoRA)     (k, concept: None)
    normalized    CA-LoRA: top-k % by normalized concept sensitivity
    unnormalized  top-k % by the raw (unnormalized) sensitivity
    random        k % drawn at random (the trial's seed)

Every trial trains on the same data for the same steps and is measured the same way
(`measure_trial`): samples under the clear prompt and under the conditions the few-shot target
set lacks (night, foggy, rainy, snowy), then the toy metrics of calora_ray.measure: domain
alignment (kernel MMD² of the clear-prompt samples to held-out target images, probe features: the
toy CMMD; also over every prompt), prompt adherence
to the condition (the toy CLIP-score), memorisation (distance to the nearest training image) and,
with a ControlNet, label fidelity of mask-conditioned samples. Each trial's record is one JSON
file (`write_trial`), the unit of resume; calora_ray.ablation_report turns a directory of them
into docs/ablation.md's tables and plots.

Plain functions, no Ray: calora_ray.ray_tune runs the grid as a Ray Tune experiment whose trials
are Ray Train runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .config import MeasureConfig, build_config
from .datasets import open_dataset
from .generation import MaskGenerator
from .measure import SampleSet, probe_metrics
from .errors import UserValueError
from .outputs import atomic_write_text
from .plots import image_grid
from .sampling import sample_images
from .selection import ABLATION_MODES as MODES, select_modules, select_top_k, spearman, top_k_overlap
from .toyworld.world import BASE_PROMPTS, CONDITION_PHRASES

CONCEPT_FREE = ("none", "all")  # modes whose trials depend on neither k nor the concept
CLEAR = BASE_PROMPTS[("photorealistic", "first-person")] + CONDITION_PHRASES["clear"]
UNSEEN_CONDITIONS = ("night", "foggy", "rainy", "snowy")  # the few-shot target set has only clear weather


class AblationMismatchError(UserValueError):
    """A finished trial of --output was made with other sweep settings than this run's."""


def trial_id(mode: str, k: float | None, concept: str | None, seed: int, timestep: int | None = None) -> str:
    """'normalized-k2-style-s0', 'all-s1', 'normalized-k2-style-t1-s0' (scored at another timestep than the
    sweep's): file names and Tune trial names."""
    if mode in CONCEPT_FREE:
        return f"{mode}-s{seed}"
    return f"{mode}-k{k:g}-{concept}" + (f"-t{timestep}" if timestep is not None else "") + f"-s{seed}"


def trial_grid(modes, ks, main_k: float, concepts, seeds, timesteps=(), main_timestep: int | None = None) -> list[dict]:
    """Every trial of the sweep, in a stable order: `normalized` at every k in `ks` and, at `main_k`, once per
    scoring timestep in `timesteps` other than `main_timestep` (the paper's Table 5; "timestep": that t, None =
    the sweep's); `unnormalized` and `random` at `main_k`; `none` and `all` once per seed (they depend on no
    concept)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown selection mode(s) {unknown}; one of {', '.join(MODES)}")
    other_timesteps = [t for t in dict.fromkeys(timesteps) if t != main_timestep]
    trials = []
    for seed in seeds:
        for mode in modes:
            if mode in CONCEPT_FREE:
                trials.append({"mode": mode, "k": None, "concept": None, "seed": seed, "timestep": None})
                continue
            for concept in concepts:
                for k in (ks if mode == "normalized" else [main_k]):
                    trials.append({"mode": mode, "k": float(k), "concept": concept, "seed": seed, "timestep": None})
                if mode == "normalized":
                    trials += [{"mode": mode, "k": float(main_k), "concept": concept, "seed": seed, "timestep": t}
                               for t in other_timesteps]
    for t in trials:
        t["trial"] = trial_id(t["mode"], t["k"], t["concept"], t["seed"], t["timestep"])
    return trials


def in_table3(trial: dict, main_k: float) -> bool:
    """Whether a trial is one of Table 3's groups (none, full LoRA, the selections at the main k and the
    sweep's timestep): the trials the downstream mIoU is measured for."""
    if trial.get("timestep") is not None:
        return False
    return trial["mode"] in CONCEPT_FREE or math.isclose(trial["k"], main_k)


def trial_modules(trial: dict, report: dict | None, k_by: str = "count") -> list[str] | None:
    """The projections a trial tunes: None for `none`, from a jobs/score.py report (sensitivity.json of
    the trial's concept) otherwise."""
    if trial["mode"] == "none":
        return None
    return select_modules("all" if trial["mode"] == "all" else trial["mode"], report["scores_normalized"],
                          report["scores_unnormalized"], trial["k"] or 100.0, k_by, report["param_counts"],
                          seed=trial["seed"])


def trial_twins(grid: list[dict], modules: dict[str, list[str] | None]) -> dict[str, str]:
    """trial id -> the first trial of `grid` that tunes the same set of projections with the same seed, for
    every trial that has such an earlier twin. Every trial has the same data, budget and sampling, so twins
    train and measure exactly alike: the sweep runs the first and copies its record (e.g. `random` selects
    the same projections for both concepts; k = 2 % and 3 % of 56 candidates are both 2). `modules`: each
    trial's selection by id (None: no LoRA)."""
    first, twins = {}, {}
    for trial in grid:
        selected = modules[trial["trial"]]
        key = (None if selected is None else frozenset(selected), trial["seed"])
        if key in first:
            twins[trial["trial"]] = first[key]
        else:
            first[key] = trial["trial"]
    return twins


def trial_prompts() -> list[str]:
    """The clear prompt, then one per condition the target set lacks."""
    base = BASE_PROMPTS[("photorealistic", "first-person")]
    return [CLEAR] + [base + CONDITION_PHRASES[c] for c in UNSEEN_CONDITIONS]


def measure_trial(model: str, lora: str | None, *, seed: int, num_images: int, steps: int, guidance: float,
                  resolution: int, reference: str, reference_images: int, train_data: str, train_images: int,
                  controlnet: str | None = None, fidelity_masks: int = 0, probe: str | None = None,
                  model_seed: int = 0, grid_path: str | Path | None = None) -> dict:
    """A trial's metrics: `num_images` samples per prompt (clear + the unseen conditions, seeds seed..),
    probe metrics against the held-out target (`reference`, split val) and the training images; with a
    `controlnet`, label fidelity on `fidelity_masks` held-out target masks. Writes the clear / night
    rows as a grid to `grid_path`. Deterministic for a seed on CPU."""
    generator = MaskGenerator(model, lora=lora, controlnet=controlnet, model_seed=model_seed)
    components = generator.components
    prompts = trial_prompts()
    rows = sample_images(components, prompts, num_images, seed, steps, guidance, resolution)
    images = np.stack([np.asarray(im.convert("RGB")) for row in rows for im in row])
    asked = [p for p in prompts for _ in range(num_images)]
    cfg = build_config(MeasureConfig, {"samples": "-", "reference": reference, "reference_split": "val",
                                       "reference_images": reference_images, "train_data": train_data,
                                       "train_images": train_images, "probe": probe, "resolution": 64,
                                       "seed": seed, "output": "-"})
    report = probe_metrics(SampleSet(images, asked), cfg)
    by_condition = report["prompt_adherence"]["condition"]["by_value"]
    adherence = {c: by_condition.get(c) for c in UNSEEN_CONDITIONS}
    known = [v for v in adherence.values() if v is not None]
    # alignment as the paper measures it: samples of the base (clear) prompt against the target's held-out
    # images, which are clear too; over every prompt it would mostly measure the conditions' own look
    clear = probe_metrics(SampleSet(images[:num_images], asked[:num_images]),
                          dataclasses.replace(cfg, train_data=None))
    record = {"alignment_mmd2": clear["domain_alignment"]["kernel_mmd2"],
              "alignment_all_prompts_mmd2": report["domain_alignment"]["kernel_mmd2"], "adherence": adherence,
              "adherence_mean": float(np.mean(known)) if known else None,
              "memorisation": report["memorisation"]["mean_nn_rmse"], "label_fidelity": None}
    if controlnet is not None and fidelity_masks > 0:
        masks = open_dataset(reference, split="val", num_images=fidelity_masks, resolution=resolution)
        labels = [masks[i]["label"] for i in range(min(fidelity_masks, len(masks)))]
        generated = generator.generate(labels, [CLEAR] * len(labels), [seed + i for i in range(len(labels))],
                                       steps=steps, guidance=guidance)
        fidelity = probe_metrics(SampleSet(np.stack(generated), [CLEAR] * len(labels), np.stack(labels)),
                                 dataclasses.replace(cfg, reference=None, train_data=None))
        record["label_fidelity"] = fidelity["label_fidelity"]["miou"]
    if grid_path is not None:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        night = 1 + UNSEEN_CONDITIONS.index("night")
        image_grid([rows[0], rows[night]], [prompts[0], prompts[night]]).save(grid_path)
    return record


def ranking_rows(concept: str, main: dict, by_timestep: dict[int, dict], by_samples: dict[int, dict],
                 reference: dict, ks: list[float], main_k: float) -> list[dict]:
    """scoring.json's rows for one concept, from jobs/score.py reports (sensitivity.json): each timestep's
    ranking against `main`'s (the sweep's timestep and samples, seed 0), and each sample count's against
    `reference` (4x the samples, another seed: no sample in common). Rankings by normalized score (CA-LoRA's);
    overlap at each k of `ks` (count), `selected` at `main_k`."""
    rows = []
    for study, runs, against in (("timestep", by_timestep, main), ("samples", by_samples, reference)):
        for key in sorted(runs):
            run = runs[key]
            if study == "timestep" and run is main:
                continue
            rho = spearman(run["scores_normalized"], against["scores_normalized"])
            rows.append({
                "concept": concept, "study": study, "timestep": run["timestep"], "samples": run["num_samples"],
                "seed": run["seed"],
                "against": {"timestep": against["timestep"], "samples": against["num_samples"], "seed": against["seed"]},
                "spearman": None if math.isnan(rho) else rho,  # nan: a constant ranking (JSON has no nan)
                "overlap": {f"{k:g}": top_k_overlap(run["scores_normalized"], against["scores_normalized"], k)
                            for k in ks},
                "selected": select_top_k(run["scores_normalized"], main_k)})
    return rows


def lora_param_percent(lora_params: int, unet_params: int) -> float:
    """Trained LoRA parameters as a % of the UNet's (the paper's 'parameter %')."""
    return 100.0 * lora_params / unet_params if unet_params else math.nan


def write_trial(directory: str | Path, record: dict) -> Path:
    """`<directory>/trials/<trial>.json`, written atomically: a trial either finished or did not."""
    path = Path(directory) / "trials" / f"{record['trial']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def finished_trials(directory: str | Path, identity: dict | None = None) -> set[str]:
    """Trial ids with a record in `<directory>/trials` (what a rerun skips). With `identity` (the sweep's
    settings that every trial shares: outputs.run_identity), a record made with other settings is an
    error naming the first difference: its numbers would not be comparable with this run's."""
    done = set()
    for path in sorted((Path(directory) / "trials").glob("*.json")):
        if identity is not None:
            theirs = json.loads(path.read_text()).get("identity")
            if theirs != identity:
                keys = sorted(set(identity) | set(theirs or {}))
                diff = next((k for k in keys if (theirs or {}).get(k) != identity.get(k)), "identity")
                raise AblationMismatchError(
                    f"{path} was made with {diff}={(theirs or {}).get(diff)!r}, this run has {identity.get(diff)!r}: "
                    "use another --output for other settings (only --modes, --ks, --concepts, --seeds and "
                    "run-time knobs may change between runs of one sweep)")
        done.add(path.stem)
    return done


__all__ = ["CLEAR", "MODES", "UNSEEN_CONDITIONS", "finished_trials", "in_table3", "lora_param_percent",
           "measure_trial", "ranking_rows", "trial_grid", "trial_id", "trial_modules", "trial_twins", "write_trial"]
