"""Read a directory in the Cityscapes layout.

    root/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png      RGB image
    root/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png       labelIds (mapped to train ids here)

Only the labelIds files are read: they exist in every Cityscapes download, whereas the
``*_labelTrainIds.png`` files appear only after running cityscapesScripts' createTrainIdLabelImgs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calora_ray.data.png import decode_image, decode_label_png
from calora_ray.errors import UserFileNotFoundError, UserValueError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"  # calora_ray.masks reads these where no labelIds files exist


def find_pairs(root: str | Path, split: str = "train") -> list[tuple[Path, Path, str]]:
    """All (image path, label path, name) of `split` under a Cityscapes-layout `root`, sorted by name.

    name is the file stem shared by image and label, e.g. "aachen_000000_000019".
    Raises UserFileNotFoundError naming the missing path (root, leftImg8bit/{split}, or label
    files of some images) and UserValueError when the split holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserFileNotFoundError(
            f"Cityscapes directory {str(root)!r} does not exist (expected root/leftImg8bit/{split}/<city>/"
            f"*{IMAGE_SUFFIX} and root/gtFine/{split}/<city>/*{LABEL_SUFFIX})"
        )
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise UserFileNotFoundError(
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
        raise UserFileNotFoundError(
            f"{len(missing)} image(s) in {str(image_dir)!r} have no label file; missing:\n  {shown}{more}"
        )
    if not pairs:
        raise UserValueError(f"no images matching <city>/*{IMAGE_SUFFIX} in {str(image_dir)!r}")
    pairs.sort(key=lambda pair: pair[2])
    return pairs


def load_pair(image_path: str | Path, label_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair: (image HxWx3 uint8 RGB, label HxW uint8 train ids from the labelIds file).

    Raises UserValueError naming the image when it is not an image, MaskError naming the label
    file when it is not a single-channel labelIds PNG, and UserValueError naming both files when
    their sizes differ.
    """
    image = decode_image(Path(image_path).read_bytes(), str(image_path), "RGB")
    # labelIds lie in 0..33 (license plate's -1 is stored as 255 or absent); anything else means
    # the file is not a labelIds map (a colour or instance map, or a trainIds file of another set).
    label = decode_label_png(Path(label_path).read_bytes(), str(label_path), label_ids=True)
    if label.shape != image.shape[:2]:
        raise UserValueError(
            f"size mismatch: image {str(image_path)!r} is {image.shape[1]}x{image.shape[0]} but label "
            f"{str(label_path)!r} is {label.shape[1]}x{label.shape[0]} (width x height)"
        )
    return image, label
