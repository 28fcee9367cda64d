"""jobs/evaluate.py: mmsegmentation trained on real + synthetic shards (calora_ray.evaluation, ray_eval).

Everything on CPU, small and deterministic: the shards come from the generator (tiny model, random
ControlNet, 2 steps), the segmenter in the end-to-end run is a narrow FCN at 32x32 for 4 iterations,
trained by mmseg's own Runner inside Ray tasks.
"""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from calora_ray.config import EvaluateConfig, GenerateConfig, build_config
from calora_ray.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from calora_ray.data.png import encode_png
from calora_ray.evaluation import (SEG_CONFIG_DIR, CaloraMixedSampler, CaloraShardDataset, EvaluationInputError,
                                   batch_counts, build_run_config, plan_runs)
from calora_ray.generation import ShardGenerator, check_generate_inputs
from calora_ray.masks import list_masks
from calora_ray.metrics import confusion_matrix, mean_iou
from calora_ray.shards import read_table
from conftest import run_job_main
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmengine.structures import PixelData
from mmseg.registry import MODELS

ROWS = 4

# A narrow FCN (ResNetV1c-18 layout, 8 base channels) at 32x32, built on the shipped toy config by path:
# the test pipeline resizes the 64x64 images to 32x32 and loads the label after Resize, so predictions
# are compared at the label's own 64x64.
TINY_CONFIG = f"""
_base_ = '{SEG_CONFIG_DIR / "toy-fcn-r18-w16.py"}'
crop_size = (32, 32)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(stem_channels=8, base_channels=8),
    decode_head=dict(in_channels=64, channels=16),
    auxiliary_head=dict(in_channels=32, channels=8))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(32, 32), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(32, 32), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory, controlnet_dir):
    """A generate output written by the generator itself (ShardGenerator, no Ray): 2 committed shards of
    ROWS rows from toy:target labels, plus a stray uncommitted shard file that must never be read."""
    out = tmp_path_factory.mktemp("gen") / "synthetic"
    cfg = build_config(GenerateConfig, {"model": "tiny", "controlnet": str(controlnet_dir), "num_samples": 2 * ROWS,
                                        "rows_per_shard": ROWS, "steps": 2, "batch_size": 4, "output": str(out)})
    resolution = check_generate_inputs(cfg)["resolution"]
    gen = ShardGenerator(cfg, list_masks("toy:target", "train", 2 * ROWS, resolution), resolution, threads=1)
    gen.make_shard(0)
    gen.make_shard(1)
    (out / "data" / "shard-00002.parquet").write_bytes((out / "data" / "shard-00000.parquet").read_bytes())
    return out


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("segcfg") / "tiny_fcn.py"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def evaluate_cfg(output, **values):
    return build_config(EvaluateConfig, {"output": str(output), **values})


# ----------------------------------------------------------------------------- data


def test_generated_shard_reads_back_as_mmseg_samples(shards):
    """Committed rows only; shapes, ids, ignore index; the image is BGR after loading (as mmseg's
    LoadImageFromFile gives it) and RGB again after the configs' SegDataPreProcessor."""
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = CaloraShardDataset(uri=str(shards), pipeline=[
            dict(type="LoadCaloraImage"), dict(type="LoadCaloraAnnotations"), dict(type="PackSegInputs")])
        assert len(ds) == 2 * ROWS  # the uncommitted shard-00002 is not read
        assert isinstance(ds.get_data_info(0)["calora_ref"], dict)  # a reference, not pixels
        table = read_table(str(shards), ["image", "label"])
        items = [ds[i] for i in range(len(ds))]
        for item, png, label_png in zip(items, table.column("image").to_pylist(), table.column("label").to_pylist()):
            rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            label = np.asarray(Image.open(io.BytesIO(label_png)))
            inputs, gt = item["inputs"], item["data_samples"].gt_sem_seg.data
            assert inputs.shape == (3, 64, 64) and inputs.dtype == torch.uint8
            assert gt.shape == (1, 64, 64) and gt.dtype == torch.int64
            assert np.array_equal(inputs.permute(1, 2, 0).numpy(), rgb[..., ::-1])  # BGR
            assert np.array_equal(gt[0].numpy(), label)
            ids = set(np.unique(gt.numpy()).tolist())
            assert ids <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
        assert any(IGNORE_INDEX in np.unique(it["data_samples"].gt_sem_seg.data.numpy()) for it in items)  # the bonnet

        # the shipped toy config's preprocessor turns BGR back into RGB before normalising
        mc = build_run_config(evaluate_cfg("/tmp/unused"), plan_runs(evaluate_cfg("/tmp/unused"))[0])
        preprocessor = MODELS.build(mc.model.data_preprocessor)
        batch = preprocessor({"inputs": [items[0]["inputs"]], "data_samples": [items[0]["data_samples"]]})
        rgb0 = np.asarray(Image.open(io.BytesIO(table.column("image")[0].as_py())).convert("RGB")).astype(np.float32)
        expected_red = (rgb0[..., 0] - 123.675) / 58.395
        assert np.allclose(batch["inputs"][0, 0].numpy(), expected_red, atol=1e-5)


def test_real_sets_are_references_to_toy_samples(tmp_path):
    with DefaultScope.overwrite_default_scope("mmseg"):
        from calora_ray.evaluation import CaloraRealDataset
        from calora_ray.datasets import open_dataset

        ds = CaloraRealDataset(source="toy:target", split="val", num_images=3, pipeline=[
            dict(type="LoadCaloraImage"), dict(type="LoadCaloraAnnotations"), dict(type="PackSegInputs")])
        assert len(ds) == 3 and ds.get_data_info(2)["calora_ref"]["index"] == 2
        want = open_dataset("toy:target", "val", 3, resolution=None)[2]
        item = ds[2]
        assert np.array_equal(item["inputs"].permute(1, 2, 0).numpy(), want["image"][..., ::-1])
        assert np.array_equal(item["data_samples"].gt_sem_seg.data[0].numpy(), want["label"])


# ----------------------------------------------------------------------------- the metric path


class StubSegmentor(torch.nn.Module):
    """Predicts the ground truth, with the classes in `swap` relabelled (a known confusion)."""

    def __init__(self, swap: dict[int, int] | None = None):
        super().__init__()
        self.swap = swap or {}
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def val_step(self, data):
        samples = data["data_samples"]
        for s in samples:
            pred = s.gt_sem_seg.data.clone()
            for a, b in self.swap.items():
                pred[s.gt_sem_seg.data == a] = b
            pred[pred == IGNORE_INDEX] = 0  # a segmenter predicts a class everywhere
            s.pred_sem_seg = PixelData(data=pred)
        return samples


def validate(model, work_dir):
    runner = Runner(model=model, work_dir=str(work_dir), experiment_name=f"stub-{work_dir.name}",
                    val_dataloader=dict(batch_size=4, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
                                        dataset=dict(type="CaloraRealDataset", source="toy:target", split="val",
                                                     num_images=8, test_mode=True,
                                                     pipeline=[dict(type="LoadCaloraImage"),
                                                               dict(type="LoadCaloraAnnotations"),
                                                               dict(type="PackSegInputs")])),
                    val_cfg=dict(type="ValLoop"), val_evaluator=dict(type="CaloraIoUMetric"),
                    default_scope="mmseg", log_level="WARNING")
    return runner.val()


def test_metric_of_a_perfect_and_of_a_known_confusion(tmp_path):
    perfect = validate(StubSegmentor(), tmp_path / "perfect")
    assert perfect["mIoU"] == 100.0 and perfect["aAcc"] == 100.0

    # road (0) predicted as sidewalk (1): road IoU 0, sidewalk TP / (TP + road pixels), the rest 1.
    confused = validate(StubSegmentor({0: 1}), tmp_path / "confused")
    from calora_ray.datasets import open_dataset

    labels = np.stack([open_dataset("toy:target", "val", 8, resolution=None)[i]["label"] for i in range(8)])
    counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=NUM_CLASSES)
    present = [c for c in range(NUM_CLASSES) if counts[c] > 0]
    assert 0 in present and 1 in present
    iou = {c: 1.0 for c in present}
    iou[0], iou[1] = 0.0, counts[1] / (counts[1] + counts[0])
    expected = 100 * sum(iou.values()) / len(present)
    assert confused["mIoU"] == pytest.approx(expected, abs=0.01)
    assert confused["IoU.road"] == 0.0 and confused["IoU.sidewalk"] == pytest.approx(100 * iou[1], abs=0.01)
    assert all(np.isnan(confused[f"IoU.{CLASS_NAMES[c]}"]) for c in range(NUM_CLASSES) if counts[c] == 0)
    assert confused["aAcc"] == pytest.approx(100 * (1 - counts[0] / counts.sum()), abs=0.01)
    # and the project's own confusion-matrix mIoU agrees
    pred = np.where(labels == 0, 1, labels)
    assert 100 * mean_iou(confusion_matrix(pred, labels, NUM_CLASSES))[0] == pytest.approx(expected, abs=0.01)


# ----------------------------------------------------------------------------- the 1:1 sampler


def test_mixed_sampler_halves_every_batch_is_seeded_and_exhausts_neither():
    real, synthetic, batch = 3, 7, 4
    data = torch.utils.data.ConcatDataset([list(range(real)), list(range(real, real + synthetic))])

    def batches(seed, n=60):
        loader = torch.utils.data.DataLoader(data, batch_size=batch,
                                             sampler=CaloraMixedSampler(data, batch, (1, 1), seed=seed))
        return [b.tolist() for b, _ in zip(loader, range(n))]

    got = batches(0)
    assert all(sum(i < real for i in b) == batch // 2 for b in got)  # B/2 of each source, every batch
    reals = [i for b in got for i in b if i < real]
    synth = [i for b in got for i in b if i >= real]
    assert len(reals) == len(synth) == 60 * batch // 2  # neither source ran dry
    for k in range(0, len(reals), real):  # each pass over the real set is a permutation of it
        assert sorted(reals[k:k + real]) == list(range(real))
    for k in range(0, len(synth) - synthetic + 1, synthetic):
        assert sorted(synth[k:k + synthetic]) == list(range(real, real + synthetic))
    assert batches(0) == got and batches(1) != got  # seeded
    assert batch_counts(8, (0.75, 0.25)) == [6, 2] and batch_counts(5, (1, 1)) in ([3, 2], [2, 3])
    with pytest.raises(EvaluationInputError):
        batch_counts(1, (1, 1))


# ----------------------------------------------------------------------------- bad input


def _parquet(path: Path, columns: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path.parent


@pytest.mark.parametrize("case", ["uncommitted", "no-label", "bad-ids", "model-config"])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, shards, case):
    out = tmp_path / "out"
    image = encode_png(np.zeros((64, 64, 3), np.uint8))
    args = ["--real-images", 4, "--val-images", 4, "--output", out]
    if case == "uncommitted":  # a generate output whose shards have no commit record
        bad = tmp_path / "gen"
        (bad / "data").mkdir(parents=True)
        (bad / "data" / "shard-00000.parquet").write_bytes((shards / "data" / "shard-00000.parquet").read_bytes())
        (bad / "run_config.json").write_text("{}")
        args += ["--synthetic", bad]
        needle = [str(bad), "no committed shards"]
    elif case == "no-label":
        bad = _parquet(tmp_path / "nolabel" / "part-0.parquet", {"image": [image]})
        args += ["--synthetic", bad]
        needle = ["part-0.parquet", "no 'label' column"]
    elif case == "bad-ids":
        label = np.full((64, 64), 3, np.uint8)
        label[:4, :4] = 40
        bad = _parquet(tmp_path / "ids" / "part-0.parquet", {"image": [image], "label": [encode_png(label)]})
        args += ["--synthetic", bad]
        needle = ["part-0.parquet row 0", "outside 0..18", "40"]
    else:
        args += ["--model-config", "no-such-segmenter"]
        needle = ["--model-config no-such-segmenter", "toy-fcn-r18-w16"]
    code, text = run_job_main("evaluate", *args)
    assert code == 2, text
    line = text.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(n in line for n in needle), line
    assert not out.exists()


# ----------------------------------------------------------------------------- end to end


def test_tiny_real_plus_synthetic_run_through_ray(tmp_path, shards, tiny_config, local_ray):
    out = tmp_path / "eval"
    args = ["--real", "toy:target", "--real-images", 8, "--val", "toy:target", "--val-images", 8,
            "--synthetic", shards, "--model-config", tiny_config, "--iters", 4, "--seeds", 1,
            "--loader-workers", 0, "--output", out]
    code, text = run_job_main("evaluate", *args)
    assert code == 0, text
    doc = json.loads((out / "metrics.json").read_text())
    assert [(r["set"], r["seed"]) for r in doc["runs"]] == [("real", 0), ("real+synthetic", 0)]
    for r in doc["runs"]:
        assert r["iterations"] == 4 and 0 <= r["mIoU"] <= 100 and 0 <= r["aAcc"] <= 100
        assert list(r["per_class_iou"]) == list(CLASS_NAMES)
        work = Path(r["work_dir"])
        assert (work / "iter_4.pth").is_file() and list(work.glob("*/*.log"))  # mmseg's checkpoint and log
        assert json.loads((work / "metrics.json").read_text())["mIoU"] == r["mIoU"]
    assert doc["checked"]["batch_mix"] == [2, 2] and doc["checked"]["synthetic_rows"] == {str(shards): 2 * ROWS}
    real, mixed = doc["summary"]
    assert mixed["delta_mIoU"] == pytest.approx(mixed["mIoU_mean"] - real["mIoU_mean"])
    report = (out / "report.md").read_text()
    assert "| real only | 1 |" in report and f"real + `{shards}`" in report
    assert (out / "per_class_iou.png").stat().st_size > 0

    # a rerun trains nothing: every run's metrics are complete
    code, text = run_job_main("evaluate", *args)
    assert code == 0 and "0 trained now, 2 complete already" in text, text


@pytest.mark.parametrize("name", sorted(p.stem for p in SEG_CONFIG_DIR.glob("*.py")))
def test_every_shipped_segmenter_config_builds_with_our_data(name):
    """Each shipped --model-config reads, gets this job's loaders, data and 19 classes, and mmseg builds
    its model (weights are not loaded: the GPU configs' ImageNet encoders download at training only)."""
    cfg = evaluate_cfg("/tmp/unused", model_config=name, synthetic=["/tmp/unused-synthetic"])
    run = plan_runs(cfg)[-1]  # the real + synthetic run
    mc = build_run_config(cfg, run)
    steps = [s["type"] for s in mc.train_dataloader["dataset"]["datasets"][1]["pipeline"]]
    assert steps[:2] == ["LoadCaloraImage", "LoadCaloraAnnotations"] and "LoadImageFromFile" not in steps
    assert mc.train_dataloader["sampler"]["source_ratio"] == [0.5, 0.5]
    assert mc.train_cfg["max_iters"] == mc.default_hooks["checkpoint"]["interval"]
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(mc.model)
    aux = getattr(model, "auxiliary_head", None)
    heads = [model.decode_head] + (list(aux) if isinstance(aux, torch.nn.ModuleList) else [aux] if aux else [])
    assert all(h.num_classes == NUM_CLASSES for h in heads)


def test_render_shards_read_back_as_the_renders_they_are(tmp_path):
    """generation.write_render_shards (the control sets of docs/evaluation.md): committed shards whose
    rows are the real set's images and exact labels, in order from `start`."""
    from calora_ray.datasets import open_dataset
    from calora_ray.generation import write_render_shards

    records = write_render_shards(str(tmp_path / "oracle"), "toy:target", "train", start=30, count=5, rows_per_shard=2)
    assert [r["rows"] for r in records] == [2, 2, 1]
    want = open_dataset("toy:target", "train", 35, resolution=None)
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = CaloraShardDataset(uri=str(tmp_path / "oracle"), pipeline=[
            dict(type="LoadCaloraImage"), dict(type="LoadCaloraAnnotations"), dict(type="PackSegInputs")])
        assert len(ds) == 5
        for k in range(5):
            item = ds[k]
            assert np.array_equal(item["inputs"].permute(1, 2, 0).numpy(), want[30 + k]["image"][..., ::-1])
            assert np.array_equal(item["data_samples"].gt_sem_seg.data[0].numpy(), want[30 + k]["label"])
    table = read_table(str(tmp_path / "oracle"), ["class_pixels", "sample_id"])
    assert table.column("sample_id").to_pylist()[0] == "s0-000000000"
    assert sum(table.column("class_pixels")[0].as_py()) == int((want[30]["label"] != IGNORE_INDEX).sum())
