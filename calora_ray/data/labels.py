"""Cityscapes label conventions: train ids, palettes, labelIds → trainIds, label checks.

The tables are copied from the official ``cityscapesScripts/helpers/labels.py`` so that
label files, palettes and metrics here agree with every other Cityscapes tool.

Two palettes colour a train-id map (`colorize`): Cityscapes' own (`PALETTE`), and `ADE20K_PALETTE`,
each train id in the colour of its nearest ADE20K-150 class (`ADE20K_CLASSES`), the colours public
segmentation ControlNets such as lllyasviel/control_v11p_sd15_seg were trained on.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from calora_ray.errors import UserError, UserValueError

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
NUM_CLASSES = 19
IGNORE_INDEX = 255
NUM_LABEL_IDS = 34  # Cityscapes labelIds 0..33 (the full label set, before the trainIds mapping)

# (labelId, trainId, colour) for every labelId that has a train id, from cityscapesScripts.
_TRAIN_LABELS = (
    (7, 0, (128, 64, 128)),     # road
    (8, 1, (244, 35, 232)),     # sidewalk
    (11, 2, (70, 70, 70)),      # building
    (12, 3, (102, 102, 156)),   # wall
    (13, 4, (190, 153, 153)),   # fence
    (17, 5, (153, 153, 153)),   # pole
    (19, 6, (250, 170, 30)),    # traffic light
    (20, 7, (220, 220, 0)),     # traffic sign
    (21, 8, (107, 142, 35)),    # vegetation
    (22, 9, (152, 251, 152)),   # terrain
    (23, 10, (70, 130, 180)),   # sky
    (24, 11, (220, 20, 60)),    # person
    (25, 12, (255, 0, 0)),      # rider
    (26, 13, (0, 0, 142)),      # car
    (27, 14, (0, 0, 70)),       # truck
    (28, 15, (0, 60, 100)),     # bus
    (31, 16, (0, 80, 100)),     # train
    (32, 17, (0, 0, 230)),      # motorcycle
    (33, 18, (119, 11, 32)),    # bicycle
)

PALETTE = np.zeros((256, 3), dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
# Train id → labelId, for writing Cityscapes-layout files (the inverse is unique per train id).
TRAIN_ID_TO_LABEL_ID = np.zeros(256, dtype=np.uint8)  # 0 = "unlabeled" for ignore / unused
for _label_id, _train_id, _color in _TRAIN_LABELS:
    PALETTE[_train_id] = _color
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id
    TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id
PALETTE.flags.writeable = False
LABEL_ID_TO_TRAIN_ID.flags.writeable = False
TRAIN_ID_TO_LABEL_ID.flags.writeable = False


class AdeClass(NamedTuple):
    """The ADE20K-150 class a Cityscapes train id is drawn as for an ADE20K-palette ControlNet."""

    train_id: int
    name: str                        # as mmsegmentation's ADE20KDataset spells it
    index: int                       # 0-based index in ADE20K-150 (mmseg's order; annotation PNGs store index + 1)
    color: tuple[int, int, int]      # its colour in the standard ADE20K palette
    approximate: str | None = None   # why the match is not one to one; None: the same class


# Train id → ADE20K-150 class and colour (the colours of mmseg's ADE20KDataset.METAINFO['palette'],
# which ControlNet 1.1's ADE20K annotators use; tests/test_controlnet.py checks them against mmseg).
ADE20K_CLASSES = (
    AdeClass(0, "road", 6, (140, 140, 140)),
    AdeClass(1, "sidewalk", 11, (235, 255, 7)),
    AdeClass(2, "building", 1, (180, 120, 120)),
    AdeClass(3, "wall", 0, (120, 120, 120)),
    AdeClass(4, "fence", 32, (255, 184, 6)),
    AdeClass(5, "pole", 93, (51, 0, 255)),
    AdeClass(6, "traffic light", 136, (41, 0, 255)),
    AdeClass(7, "signboard", 43, (255, 5, 153),
             "ADE20K has no traffic-sign class; 'signboard, sign' holds every sign, traffic signs included"),
    AdeClass(8, "tree", 4, (4, 200, 3),
             "Cityscapes' vegetation is trees, hedges and all vertical vegetation; ADE20K splits it into tree and "
             "plant; tree is the nearest for the most of it"),
    AdeClass(9, "grass", 9, (4, 250, 7),
             "Cityscapes' terrain is grass, low horizontal vegetation, soil or sand; ADE20K splits it into grass, "
             "earth, field and sand; grass is the nearest for the most of it"),
    AdeClass(10, "sky", 2, (6, 230, 230)),
    AdeClass(11, "person", 12, (150, 5, 61)),
    AdeClass(12, "person", 12, (150, 5, 61),
             "ADE20K has no rider class and labels riders as person: rider and person share a colour"),
    AdeClass(13, "car", 20, (0, 102, 200)),
    AdeClass(14, "truck", 83, (255, 0, 20)),
    AdeClass(15, "bus", 80, (255, 0, 245)),
    AdeClass(16, "bus", 80, (255, 0, 245),
             "Cityscapes' train is any rail vehicle (trams, trains); ADE20K-150 has none, and bus is the nearest "
             "vehicle of its size and shape: train and bus share a colour"),
    AdeClass(17, "minibike", 116, (163, 0, 255)),  # ADE20K's full name: "minibike, motorbike"
    AdeClass(18, "bicycle", 127, (255, 245, 0)),
)
ADE20K_PALETTE = np.zeros((256, 3), dtype=np.uint8)  # ignore (255) and unused ids: black
for _ade in ADE20K_CLASSES:
    ADE20K_PALETTE[_ade.train_id] = _ade.color
ADE20K_PALETTE.flags.writeable = False

# The conditioning palettes a ControlNet may be trained on (--control-palette), by name.
PALETTES = {"cityscapes": PALETTE, "ade20k": ADE20K_PALETTE}
CONTROL_PALETTES = tuple(PALETTES)


class LabelError(UserError, ValueError):
    """A label map that is not a valid HxW train-id map; the message names the file."""


class MaskError(UserError, ValueError):
    """A label map read from a file (a --masks entry, a dataset's label file) that cannot be used;
    the message names it and says why."""


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map Cityscapes labelIds (any shape, ints in 0..255) to train ids (uint8, same shape)."""
    label_ids = np.asarray(label_ids)
    if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
        raise LabelError(f"labelIds must lie in 0..255, got {label_ids.min()}..{label_ids.max()}")
    return LABEL_ID_TO_TRAIN_ID[label_ids.astype(np.intp)]


def palette_colors(palette: str) -> np.ndarray:
    """The 256 x 3 uint8 colour table (index = train id) of a palette name in PALETTES."""
    if palette not in PALETTES:
        raise UserValueError(f"unknown palette {palette!r}; one of {', '.join(CONTROL_PALETTES)}")
    return PALETTES[palette]


def colorize(label: np.ndarray, palette: str = "cityscapes") -> np.ndarray:
    """Train-id map HxW → RGB HxWx3 uint8 in `palette` ('cityscapes' or 'ade20k'; ignore = black)."""
    return palette_colors(palette)[np.asarray(label).astype(np.uint8)]


def _format_ids(ids: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")


def validate_label(
    label,
    name: str,
    num_classes: int = NUM_CLASSES,
    expected_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Check a train-id label map and return it as uint8 HxW.

    label: HxW integer array (or float array holding integers), or a PIL image in mode L/P.
    name: the file or sample it came from; every error message names it.
    Allowed ids are 0..num_classes-1 and IGNORE_INDEX (255).
    expected_shape: (H, W) the label must have, e.g. its image's size.
    """
    if hasattr(label, "mode") and hasattr(label, "getbands"):  # PIL image, without importing PIL
        if label.mode not in ("L", "P"):
            raise LabelError(
                f"{name}: label image has mode {label.mode!r}; expected a single-channel "
                "'L' or 'P' image of train ids (a colour image is not a label map)"
            )
        label = np.asarray(label)
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise LabelError(f"{name}: label must be a 2-D HxW array, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise LabelError(f"{name}: label must hold integer ids, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all() or not np.array_equal(arr, np.round(arr)):
            bad = arr[~finite | (arr != np.round(np.where(finite, arr, 0)))]
            raise LabelError(
                f"{name}: float label holds non-integer values (e.g. {bad.flat[0]!r}, "
                f"{bad.size} pixels); labels are class ids, never interpolate them"
            )
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise LabelError(
            f"{name}: label shape {tuple(arr.shape)} does not match expected shape "
            f"{tuple(expected_shape)}"
        )
    ids = np.unique(arr)
    bad_ids = ids[((ids < 0) | (ids >= num_classes)) & (ids != IGNORE_INDEX)]
    if bad_ids.size:
        n_pixels = int(np.isin(arr, bad_ids).sum())
        raise LabelError(
            f"{name}: label holds ids outside 0..{num_classes - 1} and {IGNORE_INDEX}: "
            f"{_format_ids(bad_ids.astype(np.int64))} ({n_pixels} pixels)."
            + (" Is it a labelIds file that still needs label_ids_to_train_ids?" if num_classes == NUM_CLASSES else "")
        )
    return arr.astype(np.uint8)


def class_names_present(label: np.ndarray, min_fraction: float = 0.0) -> list[str]:
    """Names of the train-id classes in label (train-id order), ignoring 255.

    label: HxW train ids. min_fraction: a class counts only if it covers at least this
    fraction of all pixels (so a caption does not mention a class that is three pixels of noise).
    """
    label = np.asarray(label)
    counts = np.bincount(label.astype(np.intp).ravel(), minlength=256)[:NUM_CLASSES]
    total = max(label.size, 1)
    return [CLASS_NAMES[i] for i in range(NUM_CLASSES) if counts[i] > 0 and counts[i] / total >= min_fraction]
