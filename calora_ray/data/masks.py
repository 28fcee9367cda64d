"""Mask sources for jobs/generate.py: label maps (train ids) by reference, checked, from anywhere.

A source is listed into *refs* (short strings; nothing is decoded), checked once by the driver
(`check_masks`: bad masks are skipped with a reason, or with strict=True the first one fails the
job naming it), and loaded again, by ref, by whichever worker needs the mask (`MaskReader`).

Sources (`--masks`):
- "toy" / "toy:target" / "toy:source" / "toy:world": the labels of the toy datasets' renders,
  ref "toy:target:train:12@64" (domain, split, index, render size).
- a Cityscapes-layout directory (a path or any fsspec URI): gtFine/<split>/<city>/
  *_gtFine_labelIds.png (labelIds, mapped to train ids), or *_gtFine_labelTrainIds.png where a
  directory has no labelIds files; ref = the file's URI. Images are not needed.
- Parquet: a .parquet file or a directory of them (this job's output, or a user's) with a
  `label` column of PNG-encoded train-id maps; ref "<file URI>#<row>".

Bad inputs, each skipped with its reason: not a PNG (or not decodable), a colour image instead of
a single-channel id map, ids outside the class set (0..18 and 255; labelIds 0..33 before mapping),
a shorter side than the generation resolution (labels are only ever downscaled, nearest-neighbour).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from calora_ray.data.labels import (
    NUM_LABEL_IDS,
    LabelError,
    label_ids_to_train_ids,
    validate_label,
)
from calora_ray.errors import UserError

LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_COLUMN = "label"


class MaskError(UserError, ValueError):
    """A mask that cannot be used; the message names it and says why."""


def url_to_fs(uri: str):
    """(fsspec filesystem, path) of a local path, file:// or any fsspec URI."""
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _uri(fs, path: str) -> str:
    """A URI that url_to_fs maps back to (fs, path): plain for local files, protocol:// otherwise."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def list_masks(source: str, split: str = "train", num_masks: int | None = None, resolution: int = 64) -> list[str]:
    """The refs of the masks of `source` (see the module docstring), sorted; the first `num_masks`.

    Toy sources render their labels at `resolution`; their default count is the toy dataset's
    (30 train / 100 val; toy:world 8000 / 500).
    """
    if source.startswith("toy"):
        from calora_ray.data import open_dataset

        ds = open_dataset(source, split=split, num_images=num_masks, resolution=None)  # checks the name
        domain = ds.source.split(":", 1)[1]
        return [f"toy:{domain}:{split}:{i}@{resolution}" for i in range(len(ds))]
    fs, root = url_to_fs(source)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"--masks {source}: no such file or directory (expected toy, toy:target, a "
                                "Cityscapes-layout directory or Parquet shards)")
    if fs.isfile(root) and root.endswith(".parquet"):
        refs = _parquet_refs(fs, [root])
    elif fs.isdir(f"{root}/gtFine"):
        split_dir = f"{root}/gtFine/{split}"
        if not fs.isdir(split_dir):
            raise FileNotFoundError(f"--masks {source}: no gtFine/{split} directory (--split {split})")
        files = sorted(fs.glob(f"{split_dir}/*/*{LABEL_IDS_SUFFIX}")) or sorted(fs.glob(f"{split_dir}/*/*{TRAIN_IDS_SUFFIX}"))
        # a file with the right name that is no PNG is listed (and skipped later with its reason)
        refs = [_uri(fs, f) for f in files]
    else:
        files = sorted(f for f in fs.find(root) if f.endswith(".parquet")
                       and not any(part.startswith((".", "_")) for part in f[len(root):].split("/")))
        refs = _parquet_refs(fs, files)
        if not files:
            raise FileNotFoundError(f"--masks {source}: neither a Cityscapes-layout directory (gtFine/{split}/"
                                    f"<city>/*{LABEL_IDS_SUFFIX}) nor Parquet files with a '{LABEL_COLUMN}' column")
    if not refs:
        raise ValueError(f"--masks {source}: holds no masks")
    return refs[:num_masks] if num_masks is not None else refs


def _parquet_refs(fs, files: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    refs = []
    for f in files:
        with fs.open(f, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            if LABEL_COLUMN not in meta.schema.names:
                raise ValueError(f"--masks {_uri(fs, f)}: Parquet file without a '{LABEL_COLUMN}' column "
                                 f"(columns: {', '.join(meta.schema.names)})")
            refs += [f"{_uri(fs, f)}#{row}" for row in range(meta.num_rows)]
    return refs


def decode_label_png(data: bytes, name: str, label_ids: bool = False) -> np.ndarray:
    """PNG bytes of a single-channel id map -> HxW uint8 train ids; MaskError naming `name` if not."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise MaskError(f"{name}: not a PNG ({im.format} image)")
            if im.mode not in ("L", "P", "I", "I;16"):
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


class MaskReader:
    """Loads masks by ref. Keeps the last few Parquet row groups, since consecutive samples use
    consecutive masks; holds no state that matters (one per worker)."""

    def __init__(self, cache_row_groups: int = 4):
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_row_groups
        self._toy: dict = {}

    def load(self, ref: str) -> np.ndarray:
        """HxW uint8 train ids of `ref`; MaskError (naming the ref) when it is unusable."""
        if ref.startswith("toy:"):
            return self._load_toy(ref)
        if "#" in ref and ref.rpartition("#")[0].endswith(".parquet"):
            uri, _, row = ref.rpartition("#")
            return decode_label_png(self._parquet_cell(uri, int(row)), name=f"{uri} row {row}")
        fs, path = url_to_fs(ref)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise MaskError(f"{ref}: file not found") from None
        return decode_label_png(data, name=ref, label_ids=path.endswith(LABEL_IDS_SUFFIX))

    def _load_toy(self, ref: str) -> np.ndarray:
        from calora_ray.data import open_dataset

        body, _, size = ref.partition("@")
        _, domain, split, index = body.split(":")
        key = (domain, split, int(size))
        if key not in self._toy:
            self._toy[key] = open_dataset(f"toy:{domain}", split=split, num_images=1_000_003, resolution=int(size))
        return self._toy[key][int(index)]["label"]

    def _parquet_cell(self, uri: str, row: int) -> bytes:
        import pyarrow.parquet as pq

        fs, path = url_to_fs(uri)
        key = (uri, "meta")
        if key not in self._cache:
            with fs.open(path, "rb") as fh:
                self._remember(key, pq.ParquetFile(fh).metadata)
        meta = self._cache[key]
        start = 0
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            if row < start + n:
                break
            start += n
        else:
            raise MaskError(f"{uri} row {row}: the file has only {meta.num_rows} rows")
        gkey = (uri, group)
        if gkey not in self._cache:
            with fs.open(path, "rb") as fh:
                self._remember(gkey, pq.ParquetFile(fh).read_row_group(group, columns=[LABEL_COLUMN]).column(0))
        self._cache.move_to_end(gkey)
        value = self._cache[gkey][row - start].as_py()
        if not isinstance(value, (bytes, bytearray)):
            raise MaskError(f"{uri} row {row}: '{LABEL_COLUMN}' is not PNG bytes (got {type(value).__name__})")
        return bytes(value)

    def _remember(self, key, value) -> None:
        self._cache[key] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def check_mask(reader: MaskReader, ref: str, resolution: int) -> str | None:
    """None if `ref` is a usable mask for images of `resolution`, else the reason it is not."""
    try:
        label = reader.load(ref)
    except MaskError as e:
        return str(e)
    h, w = label.shape
    if min(h, w) < resolution:
        return (f"{ref}: {w}x{h} is smaller than --resolution {resolution} (labels are only ever "
                "downscaled, nearest-neighbour)")
    return None


def check_masks(refs: list[str], resolution: int, strict: bool = False,
                threads: int = 8) -> tuple[list[str], list[dict]]:
    """(usable refs in order, skipped [{"mask": ref, "reason": ...}]). Decodes every mask once, in
    `threads` threads, keeping none of them. strict: the first bad mask raises MaskError."""
    def check(chunk):
        reader = MaskReader()
        return [check_mask(reader, ref, resolution) for ref in chunk]

    chunks = [refs[i:i + 64] for i in range(0, len(refs), 64)]
    good, skipped = [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for chunk, reasons in zip(chunks, pool.map(check, chunks)):
            for ref, reason in zip(chunk, reasons):
                if reason is None:
                    good.append(ref)
                elif strict:
                    raise MaskError(f"--strict: bad mask {reason}")
                else:
                    skipped.append({"mask": ref, "reason": reason})
    return good, skipped
