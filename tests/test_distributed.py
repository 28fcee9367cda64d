"""Ray Train: sharded scoring equals single-worker scoring; fine-tuning checkpoints, survives a
worker failure, resumes after a restart, and refuses bad input without hanging."""

import json

import pytest
import torch

from calora_ray.config import build_config, ConfigError, FinetuneConfig, ScoreConfig
from calora_ray.datasets import open_dataset
from calora_ray.distributed import ClusterResourceError
from calora_ray.models import build_tiny
from calora_ray.ray_train import run_finetune, run_scoring
from calora_ray.scoring import shard_indices


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def score(tmp_path, name, **values):
    cfg = build_config(ScoreConfig, {"num_samples": 4, "x0_steps": 2, "batch_size": 1,
                                     "output": str(tmp_path / name), **values})
    return json.loads((run_scoring(cfg) / "sensitivity.json").read_text())


def finetune(output, **values):
    cfg = build_config(FinetuneConfig, {"rank": 4, "num_images": 4, "batch_size": 2, "log_every": 1,
                                        "learning_rate": 3e-3, "output": str(output), **values})
    run_finetune(cfg)
    return json.loads((output / "finetune.json").read_text())


def lora_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "pytorch_lora_weights.safetensors"))


def test_shards_are_whole_batches_dealt_round_robin():
    assert shard_indices(7, 2, 0, 2) == [0, 1, 4, 5]
    assert shard_indices(7, 2, 1, 2) == [2, 3, 6]
    assert sorted(shard_indices(7, 2, 0, 3) + shard_indices(7, 2, 1, 3) + shard_indices(7, 2, 2, 3)) == list(range(7))


def test_two_workers_score_like_one(tmp_path):
    one = score(tmp_path, "one", num_workers=1)
    two = score(tmp_path, "two", num_workers=2)
    assert one["num_workers"] == 1 and two["num_workers"] == 2
    # the default estimator scores each sample against one augmented prompt drawn from its own seed, so
    # the two workers' shards draw what the one worker draws: 4 (sample, prompt) pairs, the same scores
    assert one["num_samples"] == two["num_samples"] == 4 and two["num_pairs"] == 4
    for name, value in one["scores"].items():
        assert two["scores"][name] == pytest.approx(value, abs=1e-6), name
    assert one["selected"] == two["selected"]


def test_two_workers_finetune_and_the_loss_decreases(tmp_path, fixed_batch_loss):
    report = finetune(tmp_path / "ft2", num_workers=2, steps=20, checkpoint_every=10)
    assert report["num_workers"] == 2 and report["steps"] == 20
    lines = (tmp_path / "ft2" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,elapsed_s" and len(lines) == 21
    # the adapter, loaded into a stock pipeline of the same base, lowers L_diff on the training images
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    base = build_tiny(0)
    before = fixed_batch_loss(base, dataset)
    pipe = base.pipeline()
    pipe.load_lora_weights(str(tmp_path / "ft2"))
    after = fixed_batch_loss(base, dataset)
    assert after < before * 0.97, (before, after)


def test_worker_failure_resumes_from_the_checkpoint(tmp_path):
    """The worker raises at step 3 on the first attempt; Ray restarts it from the step-2 checkpoint.
    Steps draw their randomness from (seed, rank, step), so the result equals an unfailed run."""
    failed = finetune(tmp_path / "failed", steps=5, checkpoint_every=2, simulate_failure_at_step=3,
                      max_failures=1)
    clean = finetune(tmp_path / "clean", steps=5, checkpoint_every=2)
    assert failed["steps"] == clean["steps"] == 5 and failed["final_loss"] == clean["final_loss"]
    steps = [int(line.split(",")[0]) for line in (tmp_path / "failed" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]
    a, b = lora_weights(tmp_path / "failed"), lora_weights(tmp_path / "clean")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failure_without_retries_is_reported(tmp_path):
    with pytest.raises(Exception, match="simulated worker failure at step 2"):
        finetune(tmp_path / "nofail", steps=3, checkpoint_every=1, simulate_failure_at_step=2, max_failures=0)
    assert not (tmp_path / "nofail" / "pytorch_lora_weights.safetensors").exists()


def test_restart_with_more_steps_continues(tmp_path):
    out = tmp_path / "restart"
    first = finetune(out, steps=3, checkpoint_every=3)
    assert first["steps"] == 3
    again = finetune(out, steps=6, checkpoint_every=3)
    assert again["steps"] == 6
    steps = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued from 3, did not start over
    straight = finetune(tmp_path / "straight", steps=6, checkpoint_every=3)
    a, b = lora_weights(out), lora_weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["final_loss"] == again["final_loss"]


def test_storage_path_as_a_uri(tmp_path):
    """Run state under a pyarrow/fsspec URI (file:// here; s3:// and gs:// take the same path)."""
    runs = tmp_path / "shared-runs"
    report = finetune(tmp_path / "uri", steps=2, checkpoint_every=1, storage_path=f"file://{runs}")
    assert report["run"].startswith(f"file://{runs}/uri-")
    checkpoints = [c for c in runs.glob("uri-*/checkpoint_*") if c.is_dir()]
    assert checkpoints and all((c / "training_state.safetensors").is_file() for c in checkpoints)
    assert not (tmp_path / "uri" / "ray_train").exists()
    # --overwrite starts over: the old checkpoints in the storage go too (else step 2 would resume)
    again = finetune(tmp_path / "uri", steps=1, storage_path=f"file://{runs}", overwrite=True)
    assert again["steps"] == 1


def test_resume_refuses_a_different_configuration(tmp_path):
    out = tmp_path / "run"
    finetune(out, steps=1)
    with pytest.raises(ValueError, match="rank differ"):
        finetune(out, steps=2, rank=8)
    finetune(out, steps=1, rank=8, overwrite=True)  # --overwrite starts over
    assert json.loads((out / "finetune.json").read_text())["rank"] == 8


def test_zero_workers_is_a_config_error():
    with pytest.raises(ConfigError, match="--num-workers must be >= 1"):
        build_config(FinetuneConfig, {"num_workers": 0})


def test_more_gpus_than_the_cluster_has_fails_without_hanging(tmp_path):
    with pytest.raises(ClusterResourceError, match="needs 2 GPU.*the cluster has 0.*waited 1 s"):
        finetune(tmp_path / "gpu", steps=1, num_workers=2, use_gpu="true", resource_wait_s=1.0)


def test_unwritable_storage_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="--storage-path .*a-file/runs"):
        finetune(tmp_path / "out", steps=1, storage_path=str(blocker / "runs"))
    assert not (tmp_path / "out").exists()


def test_cpus_per_gpu_counts_the_gpu_nodes_only():
    """A one-GPU worker must fit on a GPU node: CPU-only nodes (cluster/aws.yaml's CPU group) do not
    raise the default CPUs per worker / actor / trial."""
    from calora_ray.distributed import cpus_per_gpu

    head = {"Alive": True, "Resources": {"CPU": 0.0}}
    cpu_node = {"Alive": True, "Resources": {"CPU": 8.0}}
    g5 = {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}
    g5_12 = {"Alive": True, "Resources": {"CPU": 48.0, "GPU": 4.0}}
    dead = {"Alive": False, "Resources": {"CPU": 2.0, "GPU": 1.0}}
    assert cpus_per_gpu([head, cpu_node, cpu_node, g5, g5]) == 4
    assert cpus_per_gpu([head, g5_12, g5, dead]) == 4 and cpus_per_gpu([g5_12]) == 12
    assert cpus_per_gpu([head, cpu_node]) == 1  # no GPU node: the smallest sensible share
