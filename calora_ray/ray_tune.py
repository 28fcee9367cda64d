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
import shutil
import time
from pathlib import Path

from .ablation import (CONCEPT_FREE, finished_trials, in_table3, lora_param_percent, measure_trial, ranking_rows,
                       trial_grid, trial_modules, trial_twins, write_trial)
from .ablation_report import write_report
from .config import AblateConfig, EvaluateConfig, FinetuneConfig, GenerateConfig, ScoreConfig, build_config
from .distributed import ensure_ray, resolve_resources
from .models import load_unet_skeleton
from .outputs import atomic_write_text, for_workers, run_identity
from .ray_data import run_generate
from .ray_train import run_finetune, run_scoring


TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes: the trial function's process (no model in it)


def score_run(cfg: AblateConfig, concept: str, timestep: int, samples: int, seed: int) -> dict:
    """One jobs/score.py run (kept in --work-dir/scores/<concept>-t<t>-n<samples>-s<seed>, reused by reruns
    made with the same model and scoring settings): its report. Scored with the paper's estimator
    (every augmented prompt per sample, `--augmented-per-sample all`), which the ablation re-tests; a
    report written before that option existed was made with it."""
    out = Path(cfg.work_dir) / "scores" / f"{concept}-t{timestep}-n{samples}-s{seed}"
    settings = {"model": cfg.model, "model_seed": cfg.model_seed, "data": cfg.data, "resolution": cfg.resolution,
                "concept": concept, "timestep": timestep, "num_samples": samples, "x0_steps": cfg.score_x0_steps,
                "top_k_percent": cfg.main_k, "seed": seed, "augmented_per_sample": "all"}
    path = out / "sensitivity.json"
    if path.is_file():
        report = json.loads(path.read_text())
        recorded = {"augmented_per_sample": "all", **report.get("config", {})}
        if all(recorded.get(key) == value for key, value in settings.items()):
            return report
    run_scoring(build_config(ScoreConfig, {
        **settings, "output": str(out), "overwrite": True, "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu,
        "cpus_per_worker": cfg.cpus_per_worker, "address": cfg.address,
        "ray_connect_timeout_s": cfg.ray_connect_timeout_s, "verbose": cfg.verbose}))
    return json.loads(path.read_text())


def report_key(concept: str, timestep: int) -> str:
    return f"{concept}@t{timestep}"


def selection_of(trial: dict, reports: dict[str, dict], main_timestep: int) -> list[str] | None:
    """The projections a trial tunes, from its concept's scoring run at its timestep (None: no LoRA)."""
    if trial["mode"] in CONCEPT_FREE:  # `all` takes the candidate list, the same in every report
        return trial_modules(trial, next(iter(reports.values())))
    timestep = main_timestep if trial.get("timestep") is None else trial["timestep"]
    return trial_modules(trial, reports[report_key(trial["concept"], timestep)])


def score_concepts(cfg: AblateConfig, concepts: list[str]) -> dict[str, dict]:
    """Every scoring run of the sweep; returns the reports the trials select from, by report_key(concept, t),
    and writes OUTPUT/scoring.json: each timestep's ranking against --timestep's, and (with
    --stability-samples) each sample count's against a run of 4 x --score-samples at seed 1."""
    reports, rows = {}, []
    reference_samples = 4 * cfg.score_samples
    ks = sorted({cfg.main_k, max(cfg.ks)})  # the overlaps reported: Table 3's k and the grid's largest
    for concept in concepts:
        by_timestep = {t: score_run(cfg, concept, t, cfg.score_samples, 0)
                       for t in sorted({cfg.timestep, *cfg.timesteps})}
        main = by_timestep[cfg.timestep]
        reports.update({report_key(concept, t): r for t, r in by_timestep.items()})
        by_samples, reference = {}, main
        if cfg.stability_samples:
            reference = score_run(cfg, concept, cfg.timestep, reference_samples, 1)
            by_samples = {n: main if n == cfg.score_samples else score_run(cfg, concept, cfg.timestep, n, 0)
                          for n in sorted({*cfg.stability_samples, cfg.score_samples})}
        rows += ranking_rows(concept, main, by_timestep, by_samples, reference, ks, cfg.main_k)
    study = {"main_timestep": cfg.timestep, "main_samples": cfg.score_samples,
             "reference": {"samples": reference_samples, "seed": 1, "timestep": cfg.timestep}
             if cfg.stability_samples else None,
             "ks": ks, "rows": rows}
    atomic_write_text(Path(cfg.output) / "scoring.json", json.dumps(study, indent=2) + "\n")
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
    modules = selection_of(trial, config["reports"], cfg.timestep)
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
    record = {**trial, "modules": modules or [], "num_modules": len(modules or []),
              "num_candidates": config["num_candidates"],
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


def downstream_miou(cfg: AblateConfig, output: Path, grid: set[str], twins: dict[str, str]) -> list[str]:
    """Downstream mIoU of the `grid`'s finished Table 3 trials that lack it (`in_table3`): per trial, --eval-pairs
    pairs generated with its model (jobs/generate.py: --controlnet, the trial's LoRA, the clear prompt, the
    training masks, the trial's seed) into --work-dir/synthetic/<trial>; then one jobs/evaluate.py run over all of them (the
    real-only run shared, segmenter seed 0, --eval-iters) in --work-dir/evaluate; each trial record gets
    miou_real, miou_real_synth and miou_delta. A trial with a twin (`trial_twins`) takes its twin's set. Both
    jobs resume, so a rerun redoes nothing finished. Returns the trials measured now."""
    from .evaluation import REAL_SET, set_names  # here: it imports mmsegmentation, the optional seg extra
    from .ray_eval import run_evaluate  # here: it imports mmsegmentation, the optional seg extra

    trials = [json.loads(p.read_text()) for p in sorted((output / "trials").glob("*.json"))]
    todo = [t for t in trials if t["trial"] in grid and in_table3(t, cfg.main_k) and t.get("miou_real_synth") is None]
    if not todo:
        return []
    # the trial whose model makes each set (twins have one seed and one selection: either one's trial dict serves)
    sources = {twins.get(t["trial"], t["trial"]): t for t in sorted(todo, key=lambda t: t["trial"])}
    sets = {}
    for i, (source, trial) in enumerate(sorted(sources.items())):
        uri = str(Path(cfg.work_dir) / "synthetic" / source)
        lora = None if trial["mode"] == "none" else str(Path(cfg.work_dir) / "runs" / source)
        print(f"ablation: downstream [{i + 1}/{len(sources)}] {source}: generating {cfg.eval_pairs} pairs", flush=True)
        started = time.perf_counter()
        run_generate(build_config(GenerateConfig, {
            "model": cfg.model, "model_seed": cfg.model_seed, "lora": lora, "controlnet": cfg.controlnet,
            "masks": cfg.data, "split": "train", "num_masks": cfg.num_images, "num_samples": cfg.eval_pairs,
            "seed": trial["seed"], "resolution": cfg.resolution, "steps": cfg.sample_steps,
            "guidance": cfg.guidance, "conditions": ["clear"], "rows_per_shard": max(1, cfg.eval_pairs),
            "measure_samples": 0, "output": uri, "address": cfg.address,
            "ray_connect_timeout_s": cfg.ray_connect_timeout_s, "verbose": cfg.verbose}), progress=False)
        sets[source] = (uri, time.perf_counter() - started)
    uris = [uri for uri, _ in sets.values()]
    evaluated = run_evaluate(build_config(EvaluateConfig, {
        "real": cfg.data, "real_images": cfg.num_images, "val": cfg.data, "synthetic": uris, "seeds": 1,
        "iters": cfg.eval_iters, "model_config": cfg.eval_model_config,
        "output": str(Path(cfg.work_dir) / "evaluate"), "address": cfg.address,
        "ray_connect_timeout_s": cfg.ray_connect_timeout_s, "verbose": cfg.verbose}))
    runs = {row["set"]: row for row in json.loads(Path(evaluated["metrics"]).read_text())["runs"]}
    names = dict(zip(sets, set_names(uris)))
    for trial in todo:
        source = twins.get(trial["trial"], trial["trial"])
        (uri, generate_s), run = sets[source], runs[names[source]]
        write_trial(output, {**trial, "miou_real": runs[REAL_SET]["mIoU"], "miou_real_synth": run["mIoU"],
                             "miou_delta": run["mIoU"] - runs[REAL_SET]["mIoU"],
                             "downstream": {"pairs": cfg.eval_pairs, "iters": cfg.eval_iters,
                                            "segmenter": cfg.eval_model_config, "segmenter_seed": 0, "synthetic": uri,
                                            "generate_s": round(generate_s, 1) if source == trial["trial"] else 0.0,
                                            "segmenter_s": round(run.get("wall_time_s", 0.0), 1)
                                            if source == trial["trial"] else 0.0}})
    return [t["trial"] for t in todo]


def trial_time(record: dict) -> float:
    """Seconds a trial took: fine-tuning and measuring, and its downstream generation and segmenter run
    (the shared real-only segmenter run and the scoring runs are not counted)."""
    downstream = record.get("downstream") or {}
    return (record.get("elapsed_s") or 0) + (downstream.get("generate_s") or 0) + (downstream.get("segmenter_s") or 0)


def left_out(cfg: AblateConfig) -> list[str]:
    """What this sweep did not measure, for the report to say (issue 14's full design minus this run)."""
    out = []
    if not cfg.eval_pairs:
        out.append("Downstream mIoU (jobs/evaluate.py on each trial's generated set): --eval-pairs 0, so the "
                   "miou_* fields are null.")
    if cfg.controlnet is None:
        out.append("Label fidelity: no --controlnet, so no mask-conditioned samples were measured.")
    if not cfg.stability_samples:
        out.append("Ranking stability against the number of scoring samples: --stability-samples is empty.")
    full = {"modes": ["none", "all", "normalized", "unnormalized", "random"], "ks": [1.0, 2.0, 3.0, 5.0, 10.0],
            "concepts": ["style", "viewpoint"], "seeds": [0, 1, 2], "timesteps": [1, 81, 201, 481]}
    for name, values in full.items():
        mine = [float(v) if name == "ks" else v for v in getattr(cfg, name)]
        if name == "timesteps":
            mine.append(cfg.timestep)
        missing = [v for v in values if v not in mine]
        if missing:
            out.append(f"--{name}: {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in missing)} "
                       "of the full grid did not run.")
    return out


def run_ablation(cfg: AblateConfig, *, command: str, machine: str) -> Path:
    """jobs/ablate.py: score each concept (every timestep, the stability runs), run the missing trials with
    Ray Tune, measure the downstream mIoU of Table 3's trials (--eval-pairs), write the report. Returns the
    report's path."""
    from ray import tune  # delayed: importing Ray takes seconds

    grid = trial_grid(cfg.modes, cfg.ks, cfg.main_k, cfg.concepts, cfg.seeds, cfg.timesteps, cfg.timestep)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "grid.json", json.dumps([t["trial"] for t in grid], indent=2) + "\n")
    identity = run_identity(cfg)  # as the user gave it; the trials get absolute paths (below)
    done = finished_trials(output, identity)
    remaining = [t for t in grid if t["trial"] not in done]
    # Tune runs each trial in its own directory, and its tasks in their node's: local paths made absolute
    cfg = for_workers(cfg, outputs=("output", "work_dir"), inputs=("model", "data", "controlnet"))
    runs_trials = cfg.stage in ("all", "trials")
    print(f"ablation: {len(grid)} trials, {len(grid) - len(remaining)} finished before, "
          f"{len(remaining) if runs_trials else 0} to run", flush=True)
    if cfg.stage == "report":
        return report_of(cfg, output, command, machine)
    reports = score_concepts(cfg, cfg.concepts)  # reruns reuse the scoring runs of --work-dir
    # a trial that tunes what an earlier trial of the grid tunes, with its seed, would train and measure exactly
    # like it: the twin runs, the trial gets its record
    modules = {t["trial"]: selection_of(t, reports, cfg.timestep) for t in grid}
    twins = trial_twins(grid, modules)
    copies = {t["trial"]: twins[t["trial"]] for t in remaining if t["trial"] in twins} if runs_trials else {}
    remaining = [t for t in remaining if t["trial"] not in copies] if runs_trials else []
    if copies:
        print(f"ablation: {len(copies)} of them tune what an earlier trial tunes (same seed): their records are "
              f"copies ({', '.join(f'{a} = {b}' for a, b in copies.items())})", flush=True)
    if remaining:
        ensure_ray(cfg.address, cfg.ray_connect_timeout_s, verbose=cfg.verbose)
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
    for trial_name, same in copies.items():
        twin = json.loads((output / "trials" / f"{same}.json").read_text())
        trial = next(t for t in grid if t["trial"] == trial_name)
        grid_png = output / "grids" / f"{same}.png"
        if grid_png.is_file():
            shutil.copyfile(grid_png, output / "grids" / f"{trial_name}.png")  # the same samples
        write_trial(output, {**twin, **trial, "modules": modules[trial_name], "same_as": same, "elapsed_s": 0.0,
                             **{k: None for k in ("miou_real", "miou_real_synth", "miou_delta", "downstream")}})
    if cfg.eval_pairs and cfg.stage in ("all", "downstream"):
        downstream_miou(cfg, output, {t["trial"] for t in grid}, twins)
    return report_of(cfg, output, command, machine)


def report_of(cfg: AblateConfig, output: Path, command: str, machine: str) -> Path:
    """The sweep's report.md (and fig6.png, results.json) from the records in `output`."""
    trials = [json.loads(p.read_text()) for p in sorted((output / "trials").glob("*.json"))]
    return write_report(output, title=f"Ablation: which projections to tune ({cfg.model})", command=command,
                        machine=machine, run_time_s=sum(trial_time(t) for t in trials),
                        left_out=left_out(cfg), k=cfg.main_k, timestep=cfg.timestep)
