"""Mask sources for jobs/generate.py: label maps (train ids) by reference, checked, from anywhere.

A source is listed into *refs* (MaskRef: where one mask lies; nothing is decoded) by the driver, and
each mask is loaded and checked, by ref, by whichever worker needs it (`MaskReader`, `load_checked`):
the driver's work does not grow with the number of masks beyond listing them. `check_masks` decodes
every mask up front (the generate job's --strict, and the evaluate job's label check).
str(ref) is what a generated row's `mask` column and manifest.json store; MaskRef.parse reads it back.

Sources (`--masks`):
- "toy" / "toy:target" / "toy:source" / "toy:world": the labels of the toy datasets' renders,
  ref "toy:target:train:12@64" (dataset, split, index, render size).
- a Cityscapes-layout directory (a path or any fsspec URI): gtFine/<split>/<city>/
  *_gtFine_labelIds.png (labelIds, mapped to train ids), or *_gtFine_labelTrainIds.png where a
  directory has no labelIds files; ref = the file's URI. Images are not needed.
- Parquet: a .parquet file or a directory of them (this job's output: its committed shards; or a
  user's, as calora_ray.shards.parquet_files lists them) with a `label` column of PNG-encoded
  train-id maps; ref "<file URI>#<row>".

Bad inputs, each skipped with its reason: not a PNG (or not decodable), a colour image instead of
a single-channel id map, ids outside the class set (0..18 and 255; labelIds 0..33 before mapping),
a shorter side than the generation resolution (labels are only ever downscaled, nearest-neighbour).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from calora_ray.data.cityscapes import LABEL_SUFFIX, TRAIN_IDS_SUFFIX
from calora_ray.data.labels import MaskError
from calora_ray.data.png import decode_label_png
from calora_ray.config import size_label
from calora_ray.datasets import as_size, open_dataset
from calora_ray.errors import UserFileNotFoundError, UserValueError
from calora_ray.shards import RowReader, file_rows, file_uri, parquet_files, url_to_fs
from calora_ray.toyworld.splits import TOY_SEED_STRIDE

LABEL_COLUMN = "label"
MASK_KINDS = {"toy": ("index", "split", "resolution"), "file": (), "parquet": ("index",)}  # kind -> fields beside uri


@dataclass(frozen=True)
class MaskRef:
    """Where one mask lies. str(ref) is the text a generated row's `mask` column stores:

    kind "toy":     uri = the toy dataset ("toy:target"), split, index = its sample, resolution =
                    the render size, a side or (height, width)        -> "toy:target:train:12@64"
                                                                         "toy:target:train:12@64x128"
    kind "file":    uri = the label PNG's URI (a Cityscapes-layout file) -> "<uri>"
    kind "parquet": uri = the Parquet file's URI, index = the row       -> "<uri>#<row>"

    Build one with MaskRef.toy / .file / .parquet, or read the text back with MaskRef.parse.
    """

    kind: str
    uri: str
    index: int | None = None
    split: str | None = None
    resolution: int | tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"MaskRef kind must be one of {', '.join(MASK_KINDS)}, got {self.kind!r}")
        given = tuple(name for name in ("index", "split", "resolution") if getattr(self, name) is not None)
        if given != MASK_KINDS[self.kind]:
            fields = ", ".join(MASK_KINDS[self.kind]) or "nothing else"
            raise ValueError(f"a {self.kind} MaskRef takes uri and {fields}; got {self!r}")

    @classmethod
    def toy(cls, dataset: str, split: str, index: int, resolution: int | tuple[int, int]) -> MaskRef:
        """Sample `index` of the toy dataset `dataset` ("toy:target") `split`, rendered at `resolution`
        (a side, or (height, width); a square pair is stored as its side)."""
        height, width = as_size(resolution)
        return cls("toy", dataset, int(index), split, height if height == width else (height, width))

    @classmethod
    def file(cls, uri: str) -> MaskRef:
        """A label PNG (labelIds when its name ends in _gtFine_labelIds.png, else train ids)."""
        return cls("file", uri)

    @classmethod
    def parquet(cls, uri: str, row: int) -> MaskRef:
        """The `label` cell of row `row` of the Parquet file `uri`."""
        return cls("parquet", uri, int(row))

    @classmethod
    def parse(cls, text: str) -> MaskRef:
        """The MaskRef whose str() is `text`: "toy:..." is a toy ref, "<...>.parquet#<row>" a
        Parquet row, anything else a file URI. MaskError when a toy or Parquet ref is malformed."""
        if text.startswith("toy:"):
            body, at, size = text.partition("@")
            parts = body.split(":")
            sides = size.split("x")
            if not (at and len(parts) == 4 and parts[3].isdigit() and len(sides) in (1, 2)
                    and all(side.isdigit() for side in sides)):
                raise MaskError(f"{text}: not a toy mask reference (toy:<domain>:<split>:<index>@<size>, "
                                "size = a side or HxW)")
            return cls.toy(f"toy:{parts[1]}", parts[2], int(parts[3]), (int(sides[0]), int(sides[-1])))
        uri, hash_, row = text.rpartition("#")
        if hash_ and uri.endswith(".parquet"):
            if not row.isdigit():
                raise MaskError(f"{text}: not a Parquet mask reference (<file>.parquet#<row>)")
            return cls.parquet(uri, int(row))
        return cls.file(text)

    def __str__(self) -> str:
        if self.kind == "toy":
            return f"{self.uri}:{self.split}:{self.index}@{size_label(as_size(self.resolution))}"
        if self.kind == "parquet":
            return f"{self.uri}#{self.index}"
        return self.uri


def list_masks(source: str, split: str = "train", num_masks: int | None = None,
               resolution: int | tuple[int, int] = 64) -> list[MaskRef]:
    """The refs of the masks of `source` (see the module docstring), sorted; the first `num_masks`.

    Toy sources render their labels at `resolution` (a side, or (height, width)); their default count is the toy dataset's
    (30 train / 100 val; toy:world 8000 / 500).
    """
    if source == "toy" or source.startswith("toy:"):
        ds = open_dataset(source, split=split, num_images=num_masks, resolution=None)  # checks the name
        return [MaskRef.toy(ds.source, split, i, resolution) for i in range(len(ds))]
    fs, root = url_to_fs(source)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise UserFileNotFoundError(f"--masks {source}: no such file or directory (expected toy, toy:target, a "
                                    "Cityscapes-layout directory or Parquet shards)")
    if fs.isdir(f"{root}/gtFine"):
        split_dir = f"{root}/gtFine/{split}"
        if not fs.isdir(split_dir):
            raise UserFileNotFoundError(f"--masks {source}: no gtFine/{split} directory (--split {split})")
        files = (sorted(fs.glob(f"{split_dir}/*/*{LABEL_SUFFIX}"))
                 or sorted(fs.glob(f"{split_dir}/*/*{TRAIN_IDS_SUFFIX}")))
        # a file with the right name that is no PNG is listed (and skipped later with its reason)
        refs = [MaskRef.file(file_uri(fs, f)) for f in files]
    else:
        fs, files = parquet_files(source)
        if not files:
            raise UserFileNotFoundError(f"--masks {source}: neither a Cityscapes-layout directory (gtFine/{split}/"
                                        f"<city>/*{LABEL_SUFFIX}) nor Parquet files with a '{LABEL_COLUMN}' column")
        refs = [MaskRef.parquet(uri, row) for uri, rows in file_rows(fs, files, [LABEL_COLUMN], f"--masks {source}")
                for row in range(rows)]
    if not refs:
        raise UserValueError(f"--masks {source}: holds no masks")
    return refs[:num_masks] if num_masks is not None else refs


class MaskReader:
    """Loads masks by ref. Keeps the last few Parquet row groups, since consecutive samples use
    consecutive masks; holds no state that matters (one per worker)."""

    def __init__(self, cache_row_groups: int = 4):
        self._rows = RowReader([LABEL_COLUMN], cache_row_groups)
        self._toy: dict = {}

    def load(self, ref: MaskRef | str) -> np.ndarray:
        """HxW uint8 train ids of `ref` (a str is parsed: what a row's `mask` column holds);
        MaskError (naming the ref) when it is unusable."""
        if isinstance(ref, str):
            ref = MaskRef.parse(ref)
        if ref.kind == "toy":
            return self._load_toy(ref)
        if ref.kind == "parquet":
            return decode_label_png(self._parquet_cell(ref.uri, ref.index), name=f"{ref.uri} row {ref.index}")
        fs, path = url_to_fs(ref.uri)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise MaskError(f"{ref}: file not found") from None
        return decode_label_png(data, name=str(ref), label_ids=path.endswith(LABEL_SUFFIX))

    def _load_toy(self, ref: MaskRef) -> np.ndarray:
        key = (ref.uri, ref.split, ref.resolution)
        if key not in self._toy:
            self._toy[key] = open_dataset(ref.uri, split=ref.split, num_images=TOY_SEED_STRIDE,
                                          resolution=ref.resolution)
        return self._toy[key][ref.index]["label"]

    def _parquet_cell(self, uri: str, row: int) -> bytes:
        try:
            value = self._rows.read(uri, row)[LABEL_COLUMN]
        except UserValueError as e:
            raise MaskError(str(e)) from None
        if not isinstance(value, (bytes, bytearray)):
            raise MaskError(f"{uri} row {row}: '{LABEL_COLUMN}' is not PNG bytes (got {type(value).__name__})")
        return bytes(value)


def load_checked(reader: MaskReader, ref: MaskRef, resolution: int | tuple[int, int]) -> np.ndarray:
    """The train-id map of `ref` if it is a usable mask for images of `resolution` (a side, or
    (height, width)); else a MaskError whose text (naming the ref) is the reason. Usable: at least
    that high and that wide, so the crop at the image's aspect (generation.augment_layout) is only
    ever downscaled."""
    label = reader.load(ref)
    h, w = label.shape
    out_h, out_w = as_size(resolution)
    if h < out_h or w < out_w:
        raise MaskError(f"{ref}: {w}x{h} (WxH) is smaller than --resolution {size_label((out_h, out_w))} "
                        f"({out_w}x{out_h} WxH; labels are only ever downscaled, nearest-neighbour)")
    return label


def check_mask(reader: MaskReader, ref: MaskRef, resolution: int | tuple[int, int]) -> str | None:
    """None if `ref` is a usable mask for images of `resolution`, else the reason it is not."""
    try:
        load_checked(reader, ref, resolution)
    except MaskError as e:
        return str(e)
    return None


def check_masks(refs: list[MaskRef], resolution: int | tuple[int, int], strict: bool = False,
                threads: int = 8) -> tuple[list[MaskRef], list[dict]]:
    """(usable refs in order, skipped [{"mask": str(ref), "reason": ...}]). Decodes every mask once,
    in `threads` threads, keeping none of them. strict: the first bad mask raises MaskError."""
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
                    skipped.append({"mask": str(ref), "reason": reason})
    return good, skipped
