"""jobs/generate.py on Ray Data: label maps -> Parquet shards, on an actor pool that grows with the
cluster, committed shard by shard and resumable.

- `generation_resources`: how many actors, with a GPU each or how many CPUs, the cluster can host.
- `prepare_generate`: the driver's work before Ray — check the inputs, list the masks (nothing is
  decoded: the actors check each mask as they use it, so this does not grow with the number of
  masks beyond the listing; --strict checks them all here), start or resume the run
  (outputs.prepare_run's rule).
- `run_generate`: the driver — `prepare_generate`, then `generation.ShardGenerator` on a Ray Data
  actor pool (fixed --num-actors, or autoscaling between --min-actors and --max-actors) for the
  missing shards, then manifest.json (with the bad masks the shards met), the dataset card
  (README.md) and preview.png.
- `probe_measures`: the toy-world probe's label fidelity and prompt adherence on the card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import ray  # this module is the Ray Data adapter: it always needs Ray
import torch
from tqdm import tqdm

from . import __version__
from .config import GenerateConfig, MeasureConfig, build_config, size_identity
from .distributed import ensure_ray, resolve_resources
from .errors import UserValueError
from .generation import ShardGenerator, check_generate_inputs
from .masks import check_masks, list_masks
from .measure import probe_metrics, read_samples
from .models import TOY_SD_DIR, resolve_dtype
from .outputs import for_workers, run_identity
from .shards import MANIFEST, ShardStore, dataset_card, dataset_stats, preview_image, shard_ranges, update_card_measures


def generation_resources(cfg: GenerateConfig, wait_s: float = 60.0) -> tuple[tuple[int, int], bool, int]:
    """((min, max) actors, a GPU each?, CPUs each) that the cluster can host (distributed.resolve_resources
    for the minimum).

    Default: one actor per GPU of the cluster, else one actor; --min-actors / --max-actors make the
    pool autoscale between them (Ray Data adds actors while shards wait and the cluster, or its
    autoscaler, offers the resources). Without GPUs the actors share the cluster's CPUs (one actor
    gets them all); the pipeline has no other task that needs a CPU (the input rows come from the
    driver and the actors write their own shards), so a pool that reserves every CPU cannot starve
    a writer (on 2 CPUs an actor pool plus Ray Data's write_parquet tasks can hang, the writers
    waiting for a CPU the actors hold).
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.max_actors is not None:
        low, high = cfg.min_actors or 1, cfg.max_actors
    else:
        low = high = cfg.num_actors or (gpus if gpus and cfg.use_gpu != "false" else 1)
    gpu, per_actor = resolve_resources(low, cfg.use_gpu, cfg.cpus_per_actor, wait_s)
    return (low, high), gpu, per_actor


PROBE_MASKS = 16  # masks the driver checks itself (without --strict): a source of only bad ones fails early


def is_toy_model(model: str) -> bool:
    """The models the toy-world probe can judge: the presets and the committed toy-sd directory."""
    return model in ("tiny", "toy-sd") or (Path(model).is_dir() and Path(model).resolve() == Path(TOY_SD_DIR).resolve())


def probe_measures(uri: str, max_rows: int) -> dict:
    """Label fidelity and prompt adherence of the first `max_rows` rows of a generate output, with the
    toy-world probe (jobs/measure.py's metrics, no reference set): what the dataset card reports."""
    samples = read_samples(uri.rstrip("/") + "/data", max_rows)
    report = probe_metrics(samples, build_config(MeasureConfig, {"samples": uri, "reference": None,
                                                                  "train_data": None}))
    return {"rows_measured": int(len(samples.images)), "measured_with": "toy-world probe (calora_ray.probe)",
            "label_fidelity_miou": report["label_fidelity"]["miou"] if "label_fidelity" in report else None,
            **{f"prompt_adherence_{k}": v["adherence"] for k, v in report["prompt_adherence"].items()}}


def prepare_generate(cfg: GenerateConfig) -> dict:
    """The driver's work before Ray starts: check the inputs, list the masks, start or resume the output.
    Returns {checked, refs, store, completed, shards, pending}. Masks are decoded here only with
    --strict (all of them, failing on the first bad one) and, otherwise, the first PROBE_MASKS."""
    checked = check_generate_inputs(cfg)
    resolution = checked["resolution"]
    refs = list_masks(cfg.masks, cfg.split, cfg.num_masks, resolution)
    if cfg.strict:
        check_masks(refs, resolution, strict=True)  # every mask decoded here: fails fast, naming the first bad one
    else:  # the first few, so a source of nothing but bad masks fails here rather than in every shard
        head, skipped = check_masks(refs[:PROBE_MASKS], resolution)
        if not head and len(refs) <= PROBE_MASKS:
            raise UserValueError(f"--masks {cfg.masks}: none of its {len(refs)} masks is usable; e.g. "
                                 f"{skipped[0]['reason']}")
    store = ShardStore(cfg.output)
    identity = run_identity(cfg, resolution=size_identity(resolution), lora_sha256=checked["lora_sha256"],
                            controlnet_sha256=checked["controlnet_sha256"],
                            masks_sha256=hashlib.sha256("\n".join(map(str, refs)).encode()).hexdigest())
    completed = store.prepare(identity, cfg.overwrite)
    shards = shard_ranges(cfg.num_samples, cfg.rows_per_shard)
    pending = [k for k in range(len(shards)) if k not in completed]
    return {"checked": checked, "refs": refs, "store": store, "completed": completed, "shards": shards,
            "pending": pending}


def run_generate(cfg: GenerateConfig, progress: bool = True) -> dict:
    """jobs/generate.py: check the inputs, list the masks, generate the missing shards on a Ray Data
    actor pool (the actors check each mask they use), then write manifest.json, README.md and
    preview.png. Returns the run summary.

    Rerunning the same command resumes: shards with a commit record are kept, every other file
    under data/ is deleted, and only the missing shards are generated.
    """
    plan = prepare_generate(cfg)
    checked, refs, store, completed = plan["checked"], plan["refs"], plan["store"], plan["completed"]
    shards, pending = plan["shards"], plan["pending"]
    resolution = checked["resolution"]

    started = time.perf_counter()
    new_samples = sum(len(shards[k]) for k in pending)
    actors = gpu = per_actor = None
    actor_peak_rss_mb = 0.0
    if pending:
        ensure_ray(cfg.address, cfg.ray_connect_timeout_s, verbose=cfg.verbose)
        (low, high), gpu, per_actor = generation_resources(cfg)
        resolve_dtype(cfg.mixed_precision, torch.device("cuda" if gpu else "cpu"), cpu_bf16=True)  # fp16 on CPU actors fails here
        low, high = min(low, len(pending)), min(high, len(pending))
        actors = low if low == high else f"{low}-{high}"
        ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            ShardGenerator, batch_size=1,
            fn_constructor_kwargs={"cfg": for_workers(cfg, ("output",), ("model", "lora", "controlnet")),
                                   "masks": refs, "resolution": resolution,
                                   "threads": None if gpu else int(per_actor)},
            # one shard in flight per actor: shards are long, so queueing them would only unbalance the pool
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=1),
            num_cpus=per_actor, num_gpus=1 if gpu else 0)
        bar = None
        if progress:
            bar = tqdm(total=cfg.num_samples, initial=cfg.num_samples - new_samples, unit="img", desc="generate",
                       file=sys.stderr)
        errors = {}
        try:
            for row in ds.iter_rows():  # one small commit record per shard: the rows stay in the shards
                record = json.loads(row["record"])
                if "error" in record:
                    errors[record["shard"]] = record["error"]
                else:
                    completed[record["shard"]] = record
                actor_peak_rss_mb = max(actor_peak_rss_mb, float(row["peak_rss_mb"]))
                if bar is not None:
                    bar.update(int(row["rows"]))
        finally:
            if bar is not None:
                bar.close()
        if errors:
            first = min(errors)
            raise RuntimeError(f"{len(errors)} shard(s) failed ({', '.join(map(str, sorted(errors)[:10]))}); the "
                               f"others are committed, so running the same command again generates only these. "
                               f"Shard {first}:\n{errors[first]}")
    elapsed = time.perf_counter() - started

    completed = store.completed()
    missing = [k for k in range(len(shards)) if k not in completed]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) were not committed ({', '.join(map(str, missing[:10]))}); "
                           "run the same command again to generate them")
    records = [completed[k] for k in range(len(shards))]
    skipped = sorted({s["mask"]: s for r in records for s in r.get("skipped", [])}.values(), key=lambda s: s["mask"])
    records = [{k: v for k, v in r.items() if k != "skipped"} for r in records]  # gathered in manifest["skipped"]
    stats = dataset_stats(store, records)
    example_prompt = store.read_shard(records[0]["file"], ["prompt"]).column(0)[0].as_py()
    manifest = {
        "format": "calora_ray generate shards v1",
        "num_samples": cfg.num_samples,
        "num_shards": len(records),
        "rows_per_shard": cfg.rows_per_shard,
        "resolution": size_identity(resolution),  # 512 (a square) or "512x1024" (height x width)
        "height": resolution[0],
        "width": resolution[1],
        "shards": records,
        "stats": stats,
        "num_masks": len(refs),
        "skipped": skipped,  # the bad masks the samples met (each moved to the next usable mask)
        "lora_sha256": checked["lora_sha256"],
        "controlnet_sha256": checked["controlnet_sha256"],
        "control_palette": cfg.control_palette,  # the colours the ControlNet saw (the labels are train ids)
        "example_prompt": example_prompt,
        "this_run": {"generated_samples": new_samples, "generated_shards": len(pending),
                     "resumed_shards": len(records) - len(pending), "elapsed_s": round(elapsed, 3),
                     "images_per_s": round(new_samples / elapsed, 3) if new_samples and elapsed > 0 else None,
                     "actors": actors, "gpu_per_actor": gpu, "cpus_per_actor": per_actor,
                     "actor_peak_rss_mb": round(actor_peak_rss_mb, 1) or None},
        "calora_ray_version": __version__,
        "config": dataclasses.asdict(cfg),
    }
    measures = (store.read_json(MANIFEST) or {}).get("measures")  # added later (shards.update_card_measures)
    if measures:
        manifest["measures"] = measures
    store.write_text(MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    store.write_text("README.md", dataset_card(manifest, measures))
    grid = preview_image(store, records, cfg.preview_samples)
    if grid is not None:
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        store.put("preview.png", buf.getvalue())
    if cfg.measure_samples and is_toy_model(cfg.model):
        measures = probe_measures(store.uri, cfg.measure_samples)
        update_card_measures(store.uri, measures)
    return {"output": store.uri, "samples": stats["rows"], "unique_sample_ids": stats["unique_sample_ids"],
            "shards": len(records), "generated_samples": new_samples, "resumed_shards": len(records) - len(pending),
            "elapsed_s": elapsed, "images_per_s": manifest["this_run"]["images_per_s"], "skipped": len(skipped),
            "actor_peak_rss_mb": manifest["this_run"]["actor_peak_rss_mb"]}


