"""Tests for calora_ray.data (labels, Cityscapes-layout reading), the toy city renderer
(calora_ray.toyworld.city) and calora_ray.datasets."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from calora_ray.data.cityscapes import find_pairs, load_pair
from calora_ray.data.labels import (
    CLASS_NAMES, IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES, PALETTE, TRAIN_ID_TO_LABEL_ID,
    LabelError, class_names_present, colorize, label_ids_to_train_ids, validate_label,
)
from calora_ray.datasets import SegmentationDataset, open_dataset, resize_and_crop
from calora_ray.toyworld.city import DOMAINS, render_scene

ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 8, 10, 11, 13
ALLOWED = set(range(NUM_CLASSES)) | {IGNORE_INDEX}


# --- labels ---------------------------------------------------------------------------


def test_label_tables_match_cityscapes_scripts():
    assert len(CLASS_NAMES) == NUM_CLASSES == 19
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[13] == "car" and CLASS_NAMES[18] == "bicycle"
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert tuple(PALETTE[0]) == (128, 64, 128) and tuple(PALETTE[1]) == (244, 35, 232)
    assert tuple(PALETTE[10]) == (70, 130, 180) and tuple(PALETTE[13]) == (0, 0, 142)
    assert tuple(PALETTE[18]) == (119, 11, 32)
    assert not PALETTE[19:].any()  # every other index, 255 included, is black
    assert LABEL_ID_TO_TRAIN_ID.shape == (256,) and LABEL_ID_TO_TRAIN_ID.dtype == np.uint8
    spot = {0: 255, 1: 255, 6: 255, 7: 0, 8: 1, 9: 255, 11: 2, 17: 5, 19: 6, 20: 7, 23: 10, 24: 11,
            26: 13, 29: 255, 30: 255, 31: 16, 33: 18, 34: 255, 200: 255}
    for label_id, train_id in spot.items():
        assert LABEL_ID_TO_TRAIN_ID[label_id] == train_id, label_id
    # 19 labelIds carry a train id; the inverse table round-trips all of them.
    assert (LABEL_ID_TO_TRAIN_ID != 255).sum() == 19
    assert np.array_equal(LABEL_ID_TO_TRAIN_ID[TRAIN_ID_TO_LABEL_ID[:19]], np.arange(19))


def test_label_ids_to_train_ids_and_colorize():
    ids = np.array([[7, 26], [1, 23]], np.uint8)
    assert label_ids_to_train_ids(ids).tolist() == [[0, 13], [255, 10]]
    label = np.array([[0, 13], [255, 10]], np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, PALETTE[label])
    assert tuple(rgb[1, 0]) == (0, 0, 0)


def test_validate_label_accepts_good_maps():
    label = np.array([[0, 18], [255, 3]], np.int64)
    out = validate_label(label, "a.png", expected_shape=(2, 2))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 18], [255, 3]]
    assert validate_label(np.array([[1.0, 2.0]]), "f").tolist() == [[1, 2]]
    assert validate_label(Image.fromarray(out), "pil").tolist() == out.tolist()


def test_validate_label_names_file_and_bad_ids():
    label = np.zeros((4, 4), np.uint8)
    label[0, :2] = 19
    label[1, 0] = 200
    with pytest.raises(LabelError) as err:
        validate_label(label, "frankfurt_000000_gtFine_labelIds.png")
    msg = str(err.value)
    assert "frankfurt_000000_gtFine_labelIds.png" in msg
    assert "19, 200" in msg and "3 pixels" in msg and "0..18 and 255" in msg
    many = np.arange(20, 50, dtype=np.uint8).reshape(5, 6)
    msg = str(pytest.raises(LabelError, validate_label, many, "m.png").value)
    assert "20, 21, 22, 23, 24, 25, 26, 27, 28, 29, … (20 more)" in msg and "30 pixels" in msg


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((2, 2, 3), np.uint8), "2-D"),
    (np.array([[0.5, 1.0]]), "non-integer"),
    (np.array([[-1, 0]]), "-1"),
])
def test_validate_label_rejects_malformed(bad, fragment):
    with pytest.raises(LabelError, match="x.png") as err:
        validate_label(bad, "x.png")
    assert fragment in str(err.value)


def test_validate_label_shape_mismatch_names_both_shapes():
    with pytest.raises(LabelError) as err:
        validate_label(np.zeros((4, 6), np.uint8), "lbl.png", expected_shape=(4, 5))
    assert "lbl.png" in str(err.value) and "(4, 6)" in str(err.value) and "(4, 5)" in str(err.value)


def test_class_names_present():
    label = np.full((10, 10), IGNORE_INDEX, np.uint8)
    label[:5] = ROAD
    label[5, :3] = CAR
    label[6, 0] = PERSON
    assert class_names_present(label) == ["road", "person", "car"]
    assert class_names_present(label, min_fraction=0.02) == ["road", "car"]


# --- toy city -------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_dependent():
    for domain in DOMAINS:
        a_img, a_lbl = render_scene(3, domain, 64)
        b_img, b_lbl = render_scene(3, domain, 64)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_lbl, b_lbl)
        c_img, c_lbl = render_scene(4, domain, 64)
        assert not np.array_equal(a_lbl, c_lbl) and not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("size, shape", [(32, (32, 32)), (64, (64, 64)), ((48, 96), (48, 96)), (512, (512, 512))])
def test_render_shapes_dtypes_and_ids(size, shape):
    for domain in DOMAINS:
        image, label = render_scene(1, domain, size)
        assert image.shape == (*shape, 3) and image.dtype == np.uint8
        assert label.shape == shape and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= ALLOWED


def test_same_street_at_every_size():
    # Geometry is sampled in world units, so a low-res render agrees with a downsampled high-res one.
    _, small = render_scene(5, "target", 64)
    _, large = render_scene(5, "target", 256)
    assert (large[2::4, 2::4] == small).mean() > 0.9


def test_target_has_bonnet_source_has_none():
    for seed in range(10):
        _, target = render_scene(seed, "target", 64)
        _, source = render_scene(seed, "source", 64)
        assert (target[-2:] == IGNORE_INDEX).all()          # the ego car's bonnet, ignored
        assert (target[: 64 // 2] != IGNORE_INDEX).all()     # only at the bottom
        assert not (source == IGNORE_INDEX).any()


def test_scenes_contain_street_classes():
    counts = {c: 0 for c in (ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, PERSON)}
    n = 20
    for domain in DOMAINS:
        for seed in range(n):
            _, label = render_scene(seed, domain, 64)
            for c in counts:
                counts[c] += bool((label == c).any())
            assert np.isin(label[0], (SKY, BUILDING)).mean() > 0.6   # top row: sky and buildings
            assert not np.isin(label[0], (ROAD, SIDEWALK, CAR)).any()
            assert (label[-1] != SKY).all()
    for c in (ROAD, SKY, BUILDING, CAR):
        assert counts[c] >= 0.8 * 2 * n, (CLASS_NAMES[c], counts[c])
    for c in (SIDEWALK, VEGETATION, PERSON):
        assert counts[c] >= 0.4 * 2 * n, (CLASS_NAMES[c], counts[c])


def test_domains_differ_clearly():
    def stats(domain, seeds):
        images, labels = zip(*(render_scene(s, domain, 64) for s in seeds))
        images, labels = np.stack(images).astype(np.float32), np.stack(labels)
        sky = images[labels == SKY].mean(axis=0)
        horizon_row = np.mean([np.argmax((lbl == ROAD).any(axis=1)) for lbl in labels])
        saturation = (images.max(axis=3) - images.min(axis=3)).mean()
        return images.mean(axis=0), sky, horizon_row, saturation

    t_mean, t_sky, t_row, t_sat = stats("target", range(20))
    s_mean, s_sky, s_row, s_sat = stats("source", range(20))
    t_other = stats("target", range(20, 40))[0]
    # Mean colour distance (per pixel, between the average images of 20 renders): large across
    # domains, small within one.
    across = np.linalg.norm(t_mean - s_mean, axis=-1).mean()
    within = np.linalg.norm(t_mean - t_other, axis=-1).mean()
    assert across > 40 and across > 4 * within, (across, within)
    assert np.linalg.norm(t_sky - s_sky) > 60          # overcast grey vs blue sky
    assert t_row - s_row > 5                           # target's horizon is lower
    assert s_sat > 1.5 * t_sat                         # target is muted, source saturated


def test_image_follows_label():
    # Pixels of one class share a look: sky pixels are closer to the mean sky colour than road pixels.
    image, label = render_scene(2, "source", 128)
    img = image.astype(np.float32)
    sky_mean = img[label == SKY].mean(axis=0)
    assert np.linalg.norm(img[label == SKY] - sky_mean, axis=1).mean() < \
        np.linalg.norm(img[label == ROAD] - sky_mean, axis=1).mean() / 2


def test_unknown_domain_and_bad_size():
    with pytest.raises(ValueError, match="'desert'.*target, source"):
        render_scene(0, "desert")
    with pytest.raises(ValueError, match="at least"):
        render_scene(0, "target", 4)


# --- Cityscapes layout ----------------------------------------------------------------


def _write_cityscapes(root, split="train", cities=("aachen", "bremen"), per_city=2, size=(48, 96)):
    """A Cityscapes-layout tree from toy renders; returns {name: train-id label}."""
    labels = {}
    seed = 0
    for city in cities:
        for k in range(per_city):
            image, label = render_scene(seed, "target", size)
            seed += 1
            stem = f"{city}_{k:06d}_000019"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            label_ids = TRAIN_ID_TO_LABEL_ID[label]  # 255 → 0 "unlabeled", which maps back to 255
            Image.fromarray(label_ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            labels[stem] = label
    return labels


def test_cityscapes_roundtrip(tmp_path):
    labels = _write_cityscapes(tmp_path)
    pairs = find_pairs(tmp_path, "train")
    assert [name for _, _, name in pairs] == sorted(labels)
    for image_path, label_path, name in pairs:
        assert image_path.name == f"{name}_leftImg8bit.png" and label_path.name == f"{name}_gtFine_labelIds.png"
        image, label = load_pair(image_path, label_path)
        assert image.shape == (48, 96, 3) and np.array_equal(label, labels[name])

    ds = open_dataset(str(tmp_path), "train", resolution=None)
    assert isinstance(ds, SegmentationDataset) and len(ds) == 4 and ds.source == str(tmp_path)
    sample = ds[0]
    assert sample["name"] == "aachen_000000_000019"
    assert np.array_equal(sample["label"], labels["aachen_000000_000019"])
    assert len(open_dataset(str(tmp_path), "train", num_images=3)) == 3
    with pytest.raises(ValueError, match="holds only 4"):
        open_dataset(str(tmp_path), "train", num_images=5)


def test_cityscapes_resize_keeps_ids_and_crops_centre(tmp_path):
    labels = _write_cityscapes(tmp_path, cities=("ulm",), per_city=1, size=(48, 96))
    ds = open_dataset(str(tmp_path), resolution=32)
    sample = ds[0]
    assert sample["image"].shape == (32, 32, 3) and sample["label"].shape == (32, 32)
    original = labels["ulm_000000_000019"]
    assert set(np.unique(sample["label"])) <= set(np.unique(original))
    # Shorter side 48 → 32 (scale 2/3), width 96 → 64, centre crop drops 16 columns each side.
    expected = np.asarray(Image.fromarray(original).resize((64, 32), Image.NEAREST))[:, 16:48]
    assert np.array_equal(sample["label"], expected)


def test_resize_never_invents_ids():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 7, 13, 255], np.uint8), size=(37, 53))
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for resolution in (16, 30, 64):
        out_image, out_label = resize_and_crop(image, label, resolution)
        assert out_image.shape == (resolution, resolution, 3) and out_label.shape == (resolution, resolution)
        assert set(np.unique(out_label)) <= {0, 7, 13, 255}


def test_cityscapes_errors_name_the_input(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_pairs(missing)
    with pytest.raises(FileNotFoundError, match="nowhere.*toy"):
        open_dataset(str(missing))
    (tmp_path / "empty" / "leftImg8bit").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        find_pairs(tmp_path / "empty")
    (tmp_path / "empty" / "leftImg8bit" / "train").mkdir()
    with pytest.raises(ValueError, match="no images"):
        find_pairs(tmp_path / "empty")

    _write_cityscapes(tmp_path / "cs", cities=("bonn",), per_city=1)
    (tmp_path / "cs" / "gtFine" / "train" / "bonn" / "bonn_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="bonn_000000_000019_gtFine_labelIds.png"):
        find_pairs(tmp_path / "cs")


def test_cityscapes_bad_label_file_is_named(tmp_path):
    _write_cityscapes(tmp_path, cities=("jena",), per_city=1, size=(32, 32))
    label_path = tmp_path / "gtFine" / "train" / "jena" / "jena_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(label_path)      # wrong size
    with pytest.raises(ValueError, match="jena_000000_000019_leftImg8bit.png.*jena_000000_000019_gtFine"):
        open_dataset(str(tmp_path), resolution=None)[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(label_path)   # a colour image, not ids
    with pytest.raises(ValueError, match="jena_000000_000019_gtFine_labelIds.png"):
        open_dataset(str(tmp_path), resolution=None)[0]


# --- toy datasets ---------------------------------------------------------------------


def test_toy_dataset_samples():
    ds = open_dataset("toy", num_images=3, resolution=32)
    assert ds.source == "toy:target" and len(ds) == 3
    sample = ds[2]
    assert sample["name"] == "toy-target-train-000002"
    assert sample["image"].shape == (32, 32, 3) and sample["image"].dtype == np.uint8
    assert sample["label"].shape == (32, 32) and sample["label"].dtype == np.uint8
    assert np.array_equal(ds[-1]["label"], sample["label"])
    with pytest.raises(IndexError):
        ds[3]
    assert [s["name"] for s in ds] == [f"toy-target-train-{i:06d}" for i in range(3)]  # iterable
    assert len(open_dataset("toy:source")) == 30 and len(open_dataset("toy:source", "val")) == 100
    assert open_dataset("toy", resolution=None)[0]["image"].shape == (64, 64, 3)


def test_toy_train_and_val_share_no_images():
    train = open_dataset("toy:target", "train", num_images=30, resolution=32)
    val = open_dataset("toy:target", "val", num_images=30, resolution=32)
    train_images = {train[i]["image"].tobytes() for i in range(len(train))}
    val_images = {val[i]["image"].tobytes() for i in range(len(val))}
    assert len(train_images) == 30 and len(val_images) == 30
    assert not train_images & val_images
    assert not set(train.names) & set(val.names)
    other_seed = open_dataset("toy:target", "train", num_images=5, resolution=32, seed=1)
    assert not {other_seed[i]["image"].tobytes() for i in range(5)} & train_images


def test_unknown_toy_source_and_split():
    with pytest.raises(ValueError, match="'toy:xyz'.*toy:target"):
        open_dataset("toy:xyz")
    with pytest.raises(ValueError, match="'test'"):
        open_dataset("toy", split="test")
