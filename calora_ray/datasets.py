"""Datasets of (image, label) pairs: the procedural toy city and world, and Cityscapes-layout directories.

    ds = open_dataset("toy:target", split="train", num_images=30, resolution=64)
    ds[0] -> {"image": HxWx3 uint8, "label": HxW uint8 train ids (255 = ignore), "name": str}

Sources: "toy" (= "toy:target"), "toy:target", "toy:source", "toy:world", or a path to a
directory in the Cityscapes layout (see calora_ray.data.cityscapes.find_pairs).

"toy:world" is the pretraining world (calora_ray.toyworld): its items also carry "caption",
"style", "viewpoint" and "condition".
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from calora_ray.data.cityscapes import find_pairs, load_pair
from calora_ray.data.labels import validate_label
from calora_ray.errors import UserFileNotFoundError, UserValueError
from calora_ray.toyworld.city import DOMAINS, render_scene
from calora_ray.toyworld.splits import TOY_SEED_STRIDE, TOY_SPLITS, toy_render_seed
from calora_ray.toyworld.world_render import render_world_sample

TOY_SOURCES = ("toy", *(f"toy:{d}" for d in DOMAINS), "toy:world")
TOY_NATIVE_SIZE = 64           # what resolution=None renders the toy city at
TOY_DEFAULT_NUM_IMAGES = {"train": 30, "val": 100}
TOY_WORLD_DEFAULT_NUM_IMAGES = {"train": 8000, "val": 500}  # the pretraining world ("toy:world")


def as_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a side (a square) or a (height, width) pair."""
    if isinstance(resolution, (tuple, list)):
        return int(resolution[0]), int(resolution[1])
    return int(resolution), int(resolution)


def resize_and_crop(image: np.ndarray, label: np.ndarray,
                    resolution: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the image just covers `resolution` (a side, or (height, width)), keeping its aspect,
    then centre-crop to exactly that size.

    image: HxWx3 uint8, resized bicubically. label: HxW uint8 ids, resized with NEAREST only,
    so no new ids appear (interpolating ids would invent classes on every boundary).
    """
    out_h, out_w = as_size(resolution)
    h, w = label.shape
    scale = max(out_h / h, out_w / w)
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
        label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return (image[top:top + out_h, left:left + out_w],
            label[top:top + out_h, left:left + out_w])


class SegmentationDataset(Dataset):
    """Image–label pairs, loaded lazily.

    source: the normalised source ("toy:target", "toy:source", "toy:world" or the directory path).
    names: one name per sample. load(i) -> (image HxWx3 uint8, label HxW ids, label_name) or
    (image, label, label_name, extra): label_name is what an error names (the label file, or the
    toy sample name); extra, a dict, is added to the item (e.g. the toy world's caption).
    resolution: output size, a side (square) or (height, width): resized to cover it, centre
    crop; None = as loaded.
    """

    def __init__(self, source: str, names: Sequence[str],
                 load: Callable[[int], tuple[np.ndarray, np.ndarray, str]], resolution: int | None):
        self.source = source
        self.names = list(names)
        self.resolution = resolution
        self._load = load

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        n = len(self.names)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples of {self.source!r}")
        i %= n
        image, label, label_name, *extra = self._load(i)
        label = validate_label(label, name=label_name)
        if self.resolution is not None and label.shape != as_size(self.resolution):
            image, label = resize_and_crop(image, label, self.resolution)
        label = validate_label(label, name=label_name, expected_shape=image.shape[:2])
        item = {"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label), "name": self.names[i]}
        if extra:
            item.update(extra[0])
        return item

    def __repr__(self) -> str:
        return f"SegmentationDataset(source={self.source!r}, n={len(self)}, resolution={self.resolution})"


def _open_toy(source: str, split: str, num_images: int | None, resolution: int | None,
              seed: int) -> SegmentationDataset:
    domain = "target" if source == "toy" else source.split(":", 1)[1]
    if split not in TOY_SPLITS:
        raise UserValueError(f"toy dataset {source!r} has splits {', '.join(TOY_SPLITS)}; got {split!r}")
    if seed < 0:
        raise UserValueError(f"toy dataset seed must be non-negative, got {seed}")
    defaults = TOY_WORLD_DEFAULT_NUM_IMAGES if domain == "world" else TOY_DEFAULT_NUM_IMAGES
    n = defaults[split] if num_images is None else num_images
    if n > TOY_SEED_STRIDE:
        raise UserValueError(f"toy datasets hold at most {TOY_SEED_STRIDE} images per seed, asked for {n}")
    size = TOY_NATIVE_SIZE if resolution is None else resolution
    prefix = f"toy-{domain}-{split}" if seed == 0 else f"toy-{domain}-seed{seed}-{split}"
    names = [f"{prefix}-{i:06d}" for i in range(n)]

    if domain == "world":
        def load(i: int):
            sample = render_world_sample(toy_render_seed(split, i, seed), size)
            extra = {key: sample[key] for key in ("caption", "style", "viewpoint", "condition")}
            return sample["image"], sample["label"], names[i], extra

        return SegmentationDataset("toy:world", names, load, resolution)

    def load(i: int):
        image, label = render_scene(toy_render_seed(split, i, seed), domain, size)
        return image, label, names[i]

    return SegmentationDataset(f"toy:{domain}", names, load, resolution)


def open_dataset(source: str, split: str = "train", num_images: int | None = None,
                 resolution: int | None = 64, seed: int = 0) -> SegmentationDataset:
    """Open a segmentation dataset.

    source: "toy" (= "toy:target"), "toy:target", "toy:source", "toy:world" (the pretraining
    world; items add "caption", "style", "viewpoint", "condition"), or a Cityscapes-layout directory.
    split: "train" / "val" for toy; any split directory for Cityscapes.
    num_images: the first N samples (toy default 30 for train, 100 for val; toy:world 8000 / 500;
    Cityscapes: all).
    resolution: a side (square) or (height, width): resized to cover it and centre-cropped (toy
    scenes are rendered at it: a wider one sees more of the street); None keeps the native size
    (toy: TOY_NATIVE_SIZE). seed: picks the toy world's block of scenes; unused for directories.
    """
    if num_images is not None and num_images < 1:
        raise UserValueError(f"num_images must be a positive integer or None, got {num_images}")
    if resolution is not None and min(as_size(resolution)) < 1:
        raise UserValueError(f"resolution must be a positive integer, a (height, width) pair or None, got {resolution}")
    if source in TOY_SOURCES:
        return _open_toy(source, split, num_images, resolution, seed)
    if source.startswith("toy:"):
        raise UserValueError(f"unknown toy dataset {source!r}; accepted: {', '.join(TOY_SOURCES)}, "
                             "or a path to a Cityscapes-layout directory")
    root = Path(source)
    if not root.is_dir():
        raise UserFileNotFoundError(
            f"dataset source {source!r} is not a toy dataset ({', '.join(TOY_SOURCES)}) and not an existing "
            "directory; a directory must have the Cityscapes layout leftImg8bit/<split>/<city>/ + "
            "gtFine/<split>/<city>/"
        )
    pairs = find_pairs(root, split)
    if num_images is not None:
        if num_images > len(pairs):
            raise UserValueError(f"asked for {num_images} images but {str(root / 'leftImg8bit' / split)!r} "
                                 f"holds only {len(pairs)}")
        pairs = pairs[:num_images]

    def load(i: int):
        image_path, label_path, _ = pairs[i]
        image, label = load_pair(image_path, label_path)
        return image, label, str(label_path)

    return SegmentationDataset(str(root), [name for _, _, name in pairs], load, resolution)
