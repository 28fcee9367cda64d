"""PNG in and out: the one codec for images and label maps (shards, sample directories, masks,
Cityscapes files).

    encode_png(array) -> bytes                       lossless; HxW uint8 (mode L) or HxWx3 uint8 (RGB)
    decode_image(data, what, mode=None) -> array     any image PIL reads; UserValueError naming `what`
    decode_label_png(data, name, label_ids=False)    a single-channel id map -> HxW uint8 train ids;
                                                     MaskError naming `name`
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from calora_ray.data.labels import (
    NUM_LABEL_IDS,
    LabelError,
    MaskError,
    label_ids_to_train_ids,
    validate_label,
)
from calora_ray.errors import UserValueError

LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel PNG modes that can hold class ids


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of an HxW (mode L) or HxWx3 (RGB) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, what: str, mode: str | None = None) -> np.ndarray:
    """Encoded image bytes -> array: converted to `mode` ("RGB": HxWx3 uint8, "L": HxW uint8) when
    given, else as stored (an HxW map stays HxW). UserValueError "{what}: not a readable image (...)"
    when the bytes are not an image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises several types for bad bytes
        raise UserValueError(f"{what}: not a readable image ({exc})") from None
    return np.asarray(img.convert(mode) if mode else img)


def decode_label_png(data: bytes, name: str, label_ids: bool = False) -> np.ndarray:
    """PNG bytes of a single-channel id map -> HxW uint8 train ids; MaskError naming `name` if not.

    label_ids: the map holds Cityscapes labelIds (0..33), mapped to train ids here; else train ids.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise MaskError(f"{name}: not a PNG ({im.format} image)")
            if im.mode not in LABEL_MODES:
                raise MaskError(f"{name}: a colour image (mode {im.mode}), not a single-channel map of class ids")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MaskError(f"{name}: not a PNG image ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        if label_ids:
            return label_ids_to_train_ids(validate_label(arr, name=name, num_classes=NUM_LABEL_IDS))
        return validate_label(arr, name=name)
    except LabelError as e:
        raise MaskError(str(e)) from None

