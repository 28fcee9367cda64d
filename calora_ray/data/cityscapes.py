"""Read a directory in the Cityscapes layout.

    root/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png      RGB image
    root/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png       labelIds (mapped to train ids here)

Only the labelIds files are read: they exist in every Cityscapes download, whereas the
``*_labelTrainIds.png`` files appear only after running cityscapesScripts' createTrainIdLabelImgs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from calora_ray.data.labels import NUM_LABEL_IDS, label_ids_to_train_ids, validate_label

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def find_pairs(root: str | Path, split: str = "train") -> list[tuple[Path, Path, str]]:
    """All (image path, label path, name) of `split` under a Cityscapes-layout `root`, sorted by name.

    name is the file stem shared by image and label, e.g. "aachen_000000_000019".
    Raises FileNotFoundError naming the missing path (root, leftImg8bit/{split}, or label
    files of some images) and ValueError when the split holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Cityscapes directory {str(root)!r} does not exist (expected root/leftImg8bit/{split}/<city>/"
            f"*{IMAGE_SUFFIX} and root/gtFine/{split}/<city>/*{LABEL_SUFFIX})"
        )
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"{str(image_dir)!r} does not exist: {str(root)!r} is not a Cityscapes-layout directory "
            f"with a {split!r} split (expected leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX})"
        )
    pairs, missing = [], []
    for image_path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = image_path.name[: -len(IMAGE_SUFFIX)]
        label_path = root / "gtFine" / split / image_path.parent.name / f"{stem}{LABEL_SUFFIX}"
        if label_path.is_file():
            pairs.append((image_path, label_path, stem))
        else:
            missing.append(str(label_path))
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  … and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {str(image_dir)!r} have no label file; missing:\n  {shown}{more}"
        )
    if not pairs:
        raise ValueError(f"no images matching <city>/*{IMAGE_SUFFIX} in {str(image_dir)!r}")
    pairs.sort(key=lambda pair: pair[2])
    return pairs


def load_pair(image_path: str | Path, label_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair: (image HxWx3 uint8 RGB, label HxW uint8 train ids from the labelIds file).

    Raises ValueError naming both files when their sizes differ.
    """
    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(label_path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{str(label_path)!r}: label file has mode {im.mode!r}; expected a "
                             "single-channel labelIds PNG")
        label_ids = np.asarray(im)
    if label_ids.shape != image.shape[:2]:
        raise ValueError(
            f"size mismatch: image {str(image_path)!r} is {image.shape[1]}x{image.shape[0]} but label "
            f"{str(label_path)!r} is {label_ids.shape[1]}x{label_ids.shape[0]} (width x height)"
        )
    # labelIds lie in 0..33 (license plate's -1 is stored as 255 or absent); anything else means
    # the file is not a labelIds map (a colour or instance map, or a trainIds file of another set).
    label_ids = validate_label(label_ids, name=str(label_path), num_classes=NUM_LABEL_IDS)
    return image, label_ids_to_train_ids(label_ids)
