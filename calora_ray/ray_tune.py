"""jobs/ablate.py on Ray: the ablation grid (calora_ray.ablation) as a Ray Tune experiment.

Each Tune trial is a function trial that builds and fits a Ray Train `TorchTrainer` (the fine-tuning
of jobs/finetune.py, `run_finetune`), then measures the adapter in a Ray task holding the resources
of one training worker (a GPU when the trainer had one). This is Ray Train V2's way to tune: the
Tuner runs `ablation_trial`, the trial runs the trainer; Tune itself reserves no CPU for the trial
function (it only waits on its trainer), and `max_concurrent_trials` keeps as many trainers running
as the cluster holds.

Resume: a finished trial is a JSON file in `--output`/trials; a rerun of the same command runs only
the missing trials, and a trial killed during fine-tuning continues from its last checkpoint (its run
directory under `--work-dir`/runs is a jobs/finetune.py output).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .ablation import (CONCEPT_FREE, finished_trials, lora_param_percent, measure_trial, trial_grid, trial_modules,
                       write_trial)
from .ablation_report import write_report
from .config import AblateConfig, FinetuneConfig, ScoreConfig, build_config
from .distributed import ensure_ray, resolve_resources
from .models import load_unet_skeleton
from .outputs import atomic_write_text, for_workers, run_identity
from .ray_train import run_finetune, run_scoring


TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes: the trial function's process (no model in it)


def score_concepts(cfg: AblateConfig, concepts: list[str]) -> dict[str, dict]:
    """One jobs/score.py run per concept (kept in --work-dir/scores; reused by reruns): its report."""
    reports = {}
    for concept in concepts:
        out = Path(cfg.work_dir) / "scores" / concept
        if not (out / "sensitivity.json").is_file():
            run_scoring(build_config(ScoreConfig, {
                "model": cfg.model, "model_seed": cfg.model_seed, "data": cfg.data, "resolution": cfg.resolution,
                "concept": concept, "timestep": cfg.timestep, "num_samples": cfg.score_samples,
                "x0_steps": cfg.score_x0_steps, "top_k_percent": cfg.main_k, "seed": 0, "output": str(out),
                "overwrite": True, "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu,
                "cpus_per_worker": cfg.cpus_per_worker, "address": cfg.address,
                "ray_connect_timeout_s": cfg.ray_connect_timeout_s}))
        reports[concept] = json.loads((out / "sensitivity.json").read_text())
    return reports


def finetune_config(cfg: AblateConfig, trial: dict, selection: str, output: Path) -> FinetuneConfig:
    """jobs/finetune.py's config of one trial: the sweep's data, budget and LoRA shape, the trial's seed."""
    return build_config(FinetuneConfig, {
        "model": cfg.model, "model_seed": cfg.model_seed, "mixed_precision": cfg.mixed_precision,
        "data": cfg.data, "num_images": cfg.num_images, "resolution": cfg.resolution, "selection": selection,
        "rank": cfg.rank, "steps": cfg.steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
        "seed": trial["seed"], "log_every": max(1, cfg.steps // 50), "checkpoint_every": cfg.checkpoint_every,
        "output": str(output), "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu,
        "cpus_per_worker": cfg.cpus_per_worker, "max_failures": cfg.max_failures,
        "address": cfg.address, "ray_connect_timeout_s": cfg.ray_connect_timeout_s})


def ablation_trial(config: dict) -> None:
    """One Tune trial: fine-tune (a Ray Train run), measure (a Ray task), write the trial's JSON record."""
    import ray  # delayed: importing Ray takes seconds
    from ray import tune  # delayed: importing Ray takes seconds

    cfg: AblateConfig = config["cfg"]
    trial: dict = config["trial"]
    started = time.perf_counter()
    run_dir = Path(cfg.work_dir) / "runs" / trial["trial"]
    report = None if trial["mode"] in CONCEPT_FREE else config["reports"][trial["concept"]]
    modules = trial_modules(trial, report if report is not None else next(iter(config["reports"].values()), None))
    finetune: dict = {}
    lora = None
    if modules is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        selection = run_dir.parent / f"{trial['trial']}.selection.json"  # beside the run: the run dir is the job's
        atomic_write_text(selection, json.dumps({"selected": modules, "trial": trial}, indent=2) + "\n")
        run_finetune(finetune_config(cfg, trial, str(selection), run_dir))  # TorchTrainer.fit; resumes its run
        finetune = json.loads((run_dir / "finetune.json").read_text())
        lora = str(run_dir)
    gpu, cpus = config["resources"]
    # scheduling_strategy "DEFAULT": outside the trial's placement group (Tune would capture the task into it,
    # and it holds no CPU); the task takes one training worker's resources, freed by the trainer by now
    measure = ray.remote(measure_trial).options(num_cpus=cpus, num_gpus=1 if gpu else 0, scheduling_strategy="DEFAULT")
    metrics = ray.get(measure.remote(
        cfg.model, lora, seed=trial["seed"], num_images=cfg.sample_images, steps=cfg.sample_steps,
        guidance=cfg.guidance, resolution=cfg.resolution, reference=cfg.data, reference_images=cfg.reference_images,
        train_data=cfg.data, train_images=cfg.num_images or 30, controlnet=cfg.controlnet,
        fidelity_masks=cfg.fidelity_masks, model_seed=cfg.model_seed,
        grid_path=str(Path(cfg.output) / "grids" / f"{trial['trial']}.png")))
    lora_params = finetune.get("trainable_params", 0)
    record = {**trial, "num_modules": len(modules or []), "num_candidates": config["num_candidates"],
              "lora_params": lora_params, "param_percent": lora_param_percent(lora_params, config["unet_params"]),
              "steps": finetune.get("steps"), "final_loss": finetune.get("final_loss"), **metrics,
              "miou_real": None, "miou_real_synth": None, "miou_delta": None,
              "elapsed_s": round(time.perf_counter() - started, 1),
              "identity": config["identity"],  # what makes trials comparable (a rerun checks it)
              "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("address",)}}
    write_trial(cfg.output, record)
    tune.report({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None})


def concurrent_trials(cfg: AblateConfig, gpu: bool, cpus_per_worker: int) -> int:
    """As many trials at once as the cluster holds trainers (--max-concurrent-trials overrides)."""
    import ray  # delayed: importing Ray takes seconds

    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    total = ray.cluster_resources()
    if gpu:
        return max(1, int(total.get("GPU", 0)) // cfg.num_workers)
    return max(1, int(total.get("CPU", 0)) // (cfg.num_workers * cpus_per_worker))


def left_out(cfg: AblateConfig) -> list[str]:
    """What this sweep did not measure, for the report to say (issue 14's full design minus this run)."""
    out = ["Downstream mIoU per trial (jobs/evaluate.py on each trial's generated set) is not part of the sweep "
           "yet: the miou_* fields are null. docs/evaluation.md has the measured effect of one CA-LoRA set."]
    if cfg.controlnet is None:
        out.append("Label fidelity: no --controlnet, so no mask-conditioned samples were measured.")
    full = {"modes": ["none", "all", "normalized", "unnormalized", "random"], "ks": [1.0, 2.0, 3.0, 5.0, 10.0],
            "concepts": ["style", "viewpoint"], "seeds": [0, 1, 2]}
    for name, values in full.items():
        mine = [float(v) if name == "ks" else v for v in getattr(cfg, name)]
        missing = [v for v in values if v not in mine]
        if missing:
            out.append(f"--{name}: {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in missing)} "
                       "of the full grid did not run.")
    return out


def run_ablation(cfg: AblateConfig, *, command: str, machine: str) -> Path:
    """jobs/ablate.py: score each concept once, run the missing trials with Ray Tune, write the report.
    Returns the report's path."""
    from ray import tune  # delayed: importing Ray takes seconds

    grid = trial_grid(cfg.modes, cfg.ks, cfg.main_k, cfg.concepts, cfg.seeds)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "grid.json", json.dumps([t["trial"] for t in grid], indent=2) + "\n")
    identity = run_identity(cfg)  # as the user gave it; the trials get absolute paths (below)
    done = finished_trials(output, identity)
    remaining = [t for t in grid if t["trial"] not in done]
    # Tune runs each trial in its own directory, and its tasks in their node's: local paths made absolute
    cfg = for_workers(cfg, outputs=("output", "work_dir"), inputs=("model", "data", "controlnet"))
    print(f"ablation: {len(grid)} trials, {len(grid) - len(remaining)} finished before, {len(remaining)} to run",
          flush=True)
    if remaining:
        ensure_ray(cfg.address, cfg.ray_connect_timeout_s, verbose=cfg.verbose)
        concepts = sorted({t["concept"] for t in remaining if t["concept"] is not None})
        reports = score_concepts(cfg, concepts or cfg.concepts[:1])  # `all` takes the candidate list of one
        unet = load_unet_skeleton(cfg.model, cfg.model_seed)
        resources = resolve_resources(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker, cfg.resource_wait_s)
        tuner = tune.Tuner(
            # The trial function only waits on its trainer and its measuring task, which hold the CPUs/GPUs;
            # Tune needs a non-empty request, so it asks for memory alone.
            tune.with_resources(ablation_trial, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}),
            param_space={"cfg": cfg, "identity": identity, "trial": tune.grid_search(remaining), "reports": reports,
                         "resources": resources, "num_candidates": len(next(iter(reports.values()))["scores"]),
                         "unet_params": sum(p.numel() for p in unet.parameters())},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(cfg, *resources),
                                        trial_name_creator=lambda t: t.config["trial"]["trial"],
                                        trial_dirname_creator=lambda t: t.config["trial"]["trial"]),
            run_config=tune.RunConfig(name=f"ablation-{int(time.time())}",
                                      storage_path=str(Path(cfg.work_dir).resolve() / "tune"), verbose=0))
        results = tuner.fit()
        failed = [r for r in results if r.error is not None]
        if failed:
            raise failed[0].error
    trials = [json.loads(p.read_text()) for p in sorted((output / "trials").glob("*.json"))]
    return write_report(output, title=f"Ablation: which projections to tune ({cfg.model})", command=command,
                        machine=machine, run_time_s=sum(t.get("elapsed_s") or 0 for t in trials),
                        left_out=left_out(cfg), k=cfg.main_k)
