"""Tests for the pretraining world (calora_ray.toyworld) and its renderer (toyworld.world_render.render_world)."""

from __future__ import annotations

import time
from collections import Counter
from functools import cache

import numpy as np
import pytest

from calora_ray.concepts import join_class_names
from calora_ray.data.labels import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    class_names_present,
)
from calora_ray.datasets import TOY_WORLD_DEFAULT_NUM_IMAGES, open_dataset
from calora_ray.toyworld import (
    CONDITIONS,
    STYLES,
    VIEWPOINTS,
    WORLD_HORIZON_MAX,
    caption,
    render_scene,
    render_world,
    render_world_sample,
    sample_attributes,
    toy_render_seed,
)

ROAD, SIDEWALK, TERRAIN, SKY = 0, 1, 9, 10
ALLOWED = set(range(NUM_CLASSES)) | {IGNORE_INDEX}
GROUND = (ROAD, SIDEWALK, TERRAIN)


@cache
def _render(seed: int, style: str, viewpoint: str, condition: str, size: int = 64):
    return render_world(seed, style, viewpoint, condition, size)


@cache
def _samples(start: int, stop: int) -> tuple[dict, ...]:
    return tuple(render_world_sample(s, 64) for s in range(start, stop))


# --- captions -------------------------------------------------------------------------


def test_caption_exact_strings():
    assert caption("photorealistic", "first-person") == "Photorealistic first-person urban street view"
    assert caption("sketch", "first-person") == "Sketch of first-person urban street view"
    assert caption("photorealistic", "top-down") == "Photorealistic urban street in top-down view"
    assert caption("sketch", "top-down") == "Sketch of urban street in top-down view"
    assert caption("sketch", "top-down", "night", ["road", "building", "car"]) == \
        "Sketch of urban street in top-down view with road, building and car at night"
    assert caption("photorealistic", "first-person", "clear", ["road"]) == \
        "Photorealistic first-person urban street view with road in clear weather"
    assert caption("photorealistic", "first-person", None, ["road", "sky"]) == \
        "Photorealistic first-person urban street view with road and sky"
    assert caption("sketch", "first-person", "rainy", []) == "Sketch of first-person urban street view in rainy weather"
    phrases = {"clear": " in clear weather", "foggy": " in foggy weather", "night": " at night",
               "rainy": " in rainy weather", "snowy": " in snowy weather"}
    for condition, phrase in phrases.items():
        assert caption("photorealistic", "top-down", condition) == "Photorealistic urban street in top-down view" + phrase
    assert tuple(phrases) == CONDITIONS
    assert STYLES == ("photorealistic", "sketch") and VIEWPOINTS == ("first-person", "top-down")


def test_join_class_names():
    assert join_class_names([]) == ""
    assert join_class_names(["road"]) == "road"
    assert join_class_names(["road", "car"]) == "road and car"
    assert join_class_names(["road", "traffic light", "car"]) == "road, traffic light and car"
    assert join_class_names(("a", "b", "c", "d")) == "a, b, c and d"


def test_caption_rejects_unknown_concepts():
    with pytest.raises(ValueError, match="'oil'"):
        caption("oil", "top-down")
    with pytest.raises(ValueError, match="'side'"):
        caption("sketch", "side")
    with pytest.raises(ValueError, match="'windy'.*clear, foggy, night, rainy, snowy"):
        caption("sketch", "top-down", "windy")
    with pytest.raises(ValueError, match="'windy'"):
        render_world(0, "sketch", "top-down", "windy")


def test_sample_attributes_balanced_and_deterministic():
    attrs = [sample_attributes(s) for s in range(160)]
    assert attrs == [sample_attributes(s) for s in range(160)]
    combos = Counter((a["style"], a["viewpoint"], a["condition"]) for a in attrs)
    assert len(combos) == 20 and set(combos.values()) == {8}          # every combination, equally often
    assert sum(a["with_classes"] for a in attrs) == 80
    assert all(a["with_condition"] for a in attrs if a["condition"] != "clear")  # no phrase means clear
    clear = [a["with_condition"] for a in attrs if a["condition"] == "clear"]
    assert sum(clear) == len(clear) // 2
    assert [sample_attributes(s)["condition"] for s in range(20)] != [sample_attributes(s)["condition"]
                                                                        for s in range(80, 100)]  # not periodic


def test_world_samples_carry_matching_captions():
    for sample in _samples(0, 40):
        text = sample["caption"]
        base = caption(sample["style"], sample["viewpoint"])
        assert text.startswith(base)
        if sample["condition"] != "clear":                                 # the phrase is always there
            assert text.endswith(caption(sample["style"], sample["viewpoint"], sample["condition"])[len(base):])
        names = class_names_present(sample["label"])
        if " with " in text:
            assert join_class_names(names) in text
        assert sample["image"].shape == (64, 64, 3) and sample["label"].shape == (64, 64)
    texts = [s["caption"] for s in _samples(0, 40)]
    assert any(t.endswith(" view") for t in texts) and any(" with " in t for t in texts)


# --- renders --------------------------------------------------------------------------


def test_render_world_deterministic_shapes_and_ids():
    for style in STYLES:
        for viewpoint in VIEWPOINTS:
            for size, shape in ((32, (32, 32)), (64, (64, 64)), ((48, 96), (48, 96))):
                image, label = render_world(3, style, viewpoint, "rainy", size)
                assert image.shape == (*shape, 3) and image.dtype == np.uint8
                assert label.shape == shape and label.dtype == np.uint8
                assert set(np.unique(label).tolist()) <= ALLOWED
            a, la = render_world(5, style, viewpoint, "snowy")
            b, lb = render_world(5, style, viewpoint, "snowy")
            assert np.array_equal(a, b) and np.array_equal(la, lb)
            c, lc = render_world(6, style, viewpoint, "snowy")
            assert not np.array_equal(a, c) and not np.array_equal(la, lc)
    s = render_world_sample(7)
    t = render_world_sample(7)
    assert s["caption"] == t["caption"] and np.array_equal(s["image"], t["image"])
    with pytest.raises(ValueError, match="non-negative"):
        render_world(-1)


def test_label_is_the_layout_under_every_style_and_condition():
    for seed in (0, 1, 2):
        for viewpoint in VIEWPOINTS:
            labels = [_render(seed, st, viewpoint, c)[1] for st in STYLES for c in CONDITIONS]
            images = [_render(seed, st, viewpoint, c)[0] for st in STYLES for c in CONDITIONS]
            assert all(np.array_equal(labels[0], lbl) for lbl in labels)
            assert len({img.tobytes() for img in images}) == len(images)   # but every look differs


def test_same_street_at_every_size():
    for viewpoint in VIEWPOINTS:
        small = render_world(4, "photorealistic", viewpoint, "clear", 64)[1]
        large = render_world(4, "photorealistic", viewpoint, "clear", 256)[1]
        assert (large[2::4, 2::4] == small).mean() > 0.85


def _stats(style, viewpoint, condition, seeds=range(12)):
    images = np.stack([_render(s, style, viewpoint, condition)[0] for s in seeds]).astype(np.float32)
    labels = np.stack([_render(s, style, viewpoint, condition)[1] for s in seeds])
    grey = images.mean(axis=3)
    return {
        "brightness": grey.mean(),
        "saturation": (images.max(axis=3) - images.min(axis=3)).mean(),
        "contrast": grey.reshape(len(images), -1).std(axis=1).mean(),
        "ground": grey[np.isin(labels, GROUND)].mean(),
        "sky": (labels == SKY).mean(axis=(1, 2)),
    }


def test_each_concept_is_visible_in_plain_pixel_statistics():
    for style in STYLES:
        for viewpoint in VIEWPOINTS:
            s = {c: _stats(style, viewpoint, c) for c in CONDITIONS}
            tag = (style, viewpoint)
            assert s["night"]["brightness"] < 0.4 * s["clear"]["brightness"], tag
            assert s["foggy"]["contrast"] < 0.8 * s["clear"]["contrast"], tag
            # white ground (in a sketch: blank paper where clear asphalt is shaded)
            assert s["snowy"]["ground"] > (1.4 if style == "photorealistic" else 1.1) * s["clear"]["ground"], tag
            assert s["rainy"]["brightness"] < s["clear"]["brightness"], tag
        for condition in CONDITIONS:
            assert (_stats(style, "top-down", condition)["sky"] == 0).all()       # no sky from above
            assert (_stats(style, "first-person", condition)["sky"] > 0.02).all()  # always some sky
    for viewpoint in VIEWPOINTS:                # sketches are nearly grey: far below photos overall,
        photo = [_stats("photorealistic", viewpoint, c)["saturation"] for c in CONDITIONS]
        drawn = [_stats("sketch", viewpoint, c)["saturation"] for c in CONDITIONS]
        assert np.mean(drawn) < 0.5 * np.mean(photo), (viewpoint, drawn, photo)
        assert all(d < 0.8 * p for d, p in zip(drawn, photo)), (viewpoint, drawn, photo)  # and per condition
    assert _stats("sketch", "first-person", "clear")["brightness"] > \
        1.2 * _stats("photorealistic", "first-person", "clear")["brightness"]           # pale paper


def _features(image: np.ndarray) -> np.ndarray:
    """Small image features: an 8x8 colour thumbnail, 8 row profiles (brightness, saturation,
    edges, spread) and global statistics (brightness, contrast, saturation, edge energy by
    direction, isolated dots, percentiles)."""
    x = image.astype(np.float32) / 255.0

    def cells(a, n=8):
        f = a.shape[0] // n
        return a.reshape(n, f, n, f, *a.shape[2:]).mean(axis=(1, 3))

    g = x.mean(axis=2)
    sat = x.max(axis=2) - x.min(axis=2)
    dx, dy = np.abs(np.diff(g, axis=1))[:-1], np.abs(np.diff(g, axis=0))[:, :-1]
    diag, anti = np.abs(g[1:, 1:] - g[:-1, :-1]), np.abs(g[1:, :-1] - g[:-1, 1:])
    centre = g[1:-1, 1:-1]
    around = np.stack([g[:-2, 1:-1], g[2:, 1:-1], g[1:-1, :-2], g[1:-1, 2:]])
    dots = ((centre > around.max(axis=0) + 0.08) | (centre < around.min(axis=0) - 0.08)).mean()
    edges = np.pad(dx + dy, ((0, 1), (0, 1)))
    rows = [cells(g).mean(axis=1), cells(sat).mean(axis=1), cells(edges).mean(axis=1), cells(g).std(axis=1)]
    stats = [g.mean(), g.std(), sat.mean(), edges.mean(), dx.mean(), dy.mean(), diag.mean(), anti.mean(), dots,
             np.percentile(g, 5), np.percentile(g, 50), np.percentile(g, 95), (g < 0.35).mean()]
    return np.concatenate([cells(x).ravel(), *rows, np.repeat(stats, 4)])


def test_a_nearest_centroid_probe_learns_every_concept():
    # Standardised features; one centroid per (style, viewpoint, condition) from 200 renders;
    # each of 200 other renders takes the concepts of its nearest centroid.
    train, test = _samples(0, 200), _samples(200, 400)
    x_train = np.stack([_features(s["image"]) for s in train])
    x_test = np.stack([_features(s["image"]) for s in test])
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    combo = [(s["style"], s["viewpoint"], s["condition"]) for s in train]
    keys = sorted(set(combo))
    assert len(keys) == 20
    centroids = np.stack([x_train[[c == k for c in combo]].mean(axis=0) for k in keys])
    nearest = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    for i, attr in enumerate(("style", "viewpoint", "condition")):
        accuracy = np.mean([keys[j][i] == s[attr] for j, s in zip(nearest, test)])
        assert accuracy >= 0.9, (attr, accuracy)


# --- never the target's look ----------------------------------------------------------


def test_world_never_shows_the_targets_signature():
    world = _samples(0, 200)
    for s in world:
        assert not (s["label"] == IGNORE_INDEX).any()                     # no bonnet, nothing ignored
        if s["viewpoint"] == "first-person":                               # horizon above the target's
            sky_rows = np.nonzero((s["label"] == SKY).any(axis=1))[0]
            road_rows = np.nonzero((s["label"] == ROAD).any(axis=1))[0]
            assert road_rows.min() <= WORLD_HORIZON_MAX * 64 + 1 and sky_rows.min() == 0
    # Mean colours on an 8x8 grid: every world render is nearer the world's mean than the
    # target's, in units of each domain's spread (the target is one tight look, the world broad).
    target = [render_scene(s, "target", 64)[0] for s in range(150)]

    def thumb(img):
        return img.astype(np.float32).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3)).ravel()

    t = np.stack([thumb(i) for i in target])
    w = np.stack([thumb(s["image"]) for s in world])
    t_mean, w_mean = t[:100].mean(axis=0), w[:100].mean(axis=0)
    t_spread = np.sqrt(((t[:100] - t_mean) ** 2).sum(axis=1).mean())
    w_spread = np.sqrt(((w[:100] - w_mean) ** 2).sum(axis=1).mean())
    to_target = np.linalg.norm(w[100:] - t_mean, axis=1) / t_spread
    to_world = np.linalg.norm(w[100:] - w_mean, axis=1) / w_spread
    assert (to_target > 1.5 * to_world).all(), (to_target / to_world).min()
    target_radius = (np.linalg.norm(t[100:] - t_mean, axis=1) / t_spread).max()
    assert to_target.min() > target_radius                                 # outside the target's cloud
    # The target's grading is muted: every clear photorealistic world street is more saturated.
    sat = lambda img: (img.max(axis=2).astype(np.float32) - img.min(axis=2)).mean()
    clear = [_render(s, "photorealistic", v, "clear")[0] for s in range(20) for v in VIEWPOINTS]
    assert min(sat(i) for i in clear) > max(sat(i) for i in target)


# --- datasets and speed ---------------------------------------------------------------


def test_open_dataset_world():
    ds = open_dataset("toy:world", num_images=6, resolution=32)
    assert ds.source == "toy:world" and len(ds) == 6
    item = ds[4]
    assert set(item) == {"image", "label", "name", "caption", "style", "viewpoint", "condition"}
    assert item["name"] == "toy-world-train-000004"
    assert item["image"].shape == (32, 32, 3) and item["label"].shape == (32, 32)
    expected = render_world_sample(toy_render_seed("train", 4), 32)
    assert item["caption"] == expected["caption"] and np.array_equal(item["image"], expected["image"])
    assert item["style"] in STYLES and item["viewpoint"] in VIEWPOINTS and item["condition"] in CONDITIONS
    assert TOY_WORLD_DEFAULT_NUM_IMAGES == {"train": 8000, "val": 500}
    assert len(open_dataset("toy:world")) == 8000 and len(open_dataset("toy:world", "val")) == 500
    assert open_dataset("toy:world", resolution=None)[0]["image"].shape == (64, 64, 3)
    # the other sources keep their item keys
    assert set(open_dataset("toy:target", num_images=1)[0]) == {"image", "label", "name"}


def test_world_train_and_val_share_no_images():
    train = open_dataset("toy:world", "train", num_images=30, resolution=32)
    val = open_dataset("toy:world", "val", num_images=30, resolution=32)
    train_images = {train[i]["image"].tobytes() for i in range(30)}
    val_images = {val[i]["image"].tobytes() for i in range(30)}
    assert len(train_images) == 30 and len(val_images) == 30 and not train_images & val_images
    assert not set(train.names) & set(val.names)


def test_world_render_is_fast():
    # Budget: ~5 ms per 64x64 render on a quiet core (8,000 in well under a minute); the bound is
    # loose for busy CI machines, yet catches an order-of-magnitude regression.
    render_world_sample(0)
    start = time.perf_counter()
    for seed in range(40):
        render_world_sample(seed)
    assert (time.perf_counter() - start) / 40 < 0.025


def test_class_names_in_captions_are_cityscapes_names():
    names = set()
    for s in _samples(0, 80):
        if " with " in s["caption"]:
            names.update(class_names_present(s["label"]))
    assert names <= set(CLASS_NAMES) and {"road", "building", "car"} <= names
