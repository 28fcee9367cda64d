"""Parquet shards on any fsspec URI, committed atomically, resumable: the generate job's output.

Layout of an output URI:

    data/shard-00000.parquet ...   the rows (rows-per-shard each; the last one may hold fewer)
    _commits/shard-00000.json ...  one small commit record per completed shard
    run_config.json                what defines the run (a rerun resumes only if it matches)
    manifest.json                  config, counts, shards (rows, bytes, sha256), skipped inputs
    README.md                      the dataset card
    preview.png                    image | label overlay of the first samples

A shard is written in two steps: its file (through a hidden temporary name and a rename where
the filesystem renames atomically, i.e. local disks; in one PUT on object stores such as S3,
where an object appears whole or not at all), then its commit record. Only a shard with a commit
record counts: a rerun deletes every other file under data/ (a crash's leftovers) and
regenerates exactly the shards without a record. The data directory reads as one table with
pyarrow (`pq.read_table(OUT + "/data")`), Ray Data, HF `datasets` or pandas, which skip hidden files.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import OrderedDict
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .data.labels import CLASS_NAMES, colorize
from .data.png import decode_image, decode_label_png
from .errors import UserFileNotFoundError, UserValueError
from .outputs import RUN_RECORD, prepare_run
from .plots import image_grid


def url_to_fs(uri: str):
    """(fsspec filesystem, path) of a local path, file:// or any fsspec URI."""
    return fsspec.core.url_to_fs(uri)


DATA_DIR = "data"
COMMIT_DIR = "_commits"
MANIFEST = "manifest.json"

# The shard schema: one row per sample, declared once. SCHEMA, the generator's rows
# (generation.ShardGenerator.make_rows) and the dataset card's column table all come from here.
# `image` / `label` are plain PNG bytes, which every Parquet reader returns as bytes; Hugging Face
# `datasets` decodes them after .cast_column("image", datasets.Image()) (its schema metadata would
# need struct<bytes, path> columns).
COLUMNS = (
    ("sample_id", pa.string(), "`s<job seed>-<index>`, unique"),
    ("image", pa.binary(), "PNG, RGB"),
    ("label", pa.binary(), "PNG, mode L, uint8 train ids 0..18, 255 = ignore"),
    ("prompt", pa.string(), "the prompt the image was generated with"),
    ("condition", pa.string(), "clear / foggy / night / rainy / snowy"),
    ("seed", pa.int64(), "the image's noise seed (derived from the job seed and the index)"),
    ("width", pa.int32(), "image (and label) width"),
    ("height", pa.int32(), "image (and label) height"),
    ("class_pixels", pa.list_(pa.int64()), "pixels of train id 0..18 (index = id)"),
    ("model", pa.string(), "the base model"),
    ("lora_sha256", pa.string(), "sha256 of the LoRA file ('' without one)"),
    ("mask", pa.string(), "the source mask the label was made from (masks.MaskRef)"),
)
SCHEMA = pa.schema([(name, dtype) for name, dtype, _ in COLUMNS])


def column_table() -> str:
    """The card's Markdown table of the columns."""
    return "\n".join(["| column | type | |", "|---|---|---|"]
                     + [f"| {name} | {dtype} | {text} |" for name, dtype, text in COLUMNS])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_ranges(num_samples: int, rows_per_shard: int) -> list[range]:
    """Sample indices of each shard: shard k holds [k*R, min((k+1)*R, N))."""
    return [range(start, min(start + rows_per_shard, num_samples)) for start in range(0, num_samples, rows_per_shard)]


def table_bytes(rows: dict[str, list], row_group_size: int = 64) -> bytes:
    """A Parquet file (bytes) of `rows` (column -> values, SCHEMA's columns). PNG columns are not
    compressed again (they are compressed already); the rest use zstd."""
    table = pa.Table.from_pydict(rows, schema=SCHEMA)
    buf = io.BytesIO()
    compression = {name: ("NONE" if name in ("image", "label") else "ZSTD") for name in SCHEMA.names}
    pq.write_table(table, buf, row_group_size=row_group_size, compression=compression)
    return buf.getvalue()


class ShardStore:
    """The output URI of a generate run: shards, commit records, run record, manifest, card."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = url_to_fs(self.uri)
        self.root = self.root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = protocol in ("file", "local")  # the one kind of store here with an atomic rename

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --------------------------------------------------------------- writing
    def put(self, relative: str, data: bytes) -> None:
        """Write a whole file so that a reader never sees part of it."""
        target = self.path(relative)
        parent = target.rsplit("/", 1)[0]
        if self.local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, target)  # os.rename: atomic on one filesystem
        else:
            self.fs.pipe_file(target, data)  # one PUT: the object appears whole or not at all

    def write_shard(self, index: int, data: bytes, num_rows: int, first_id: str, last_id: str,
                    skipped: list[dict] | None = None) -> dict:
        """Write shard `index`'s Parquet bytes, then its commit record; returns the record.
        `skipped`: the bad masks this shard's samples met ({"mask", "reason"}; manifest.json gathers them)."""
        file = f"{DATA_DIR}/{shard_name(index)}.parquet"
        self.put(file, data)
        record = {"shard": index, "file": file, "rows": num_rows, "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "first_sample_id": first_id, "last_sample_id": last_id,
                  "skipped": skipped or []}
        self.put(f"{COMMIT_DIR}/{shard_name(index)}.json", json.dumps(record).encode())
        return record

    def write_text(self, relative: str, text: str) -> None:
        self.put(relative, text.encode())

    # --------------------------------------------------------------- reading, resuming
    def read_json(self, relative: str):
        try:
            return json.loads(self.fs.cat_file(self.path(relative)))
        except FileNotFoundError:
            return None

    def completed(self) -> dict[int, dict]:
        """Commit records of the completed shards, by shard index (a record whose file is gone or
        has another size does not count)."""
        out = {}
        try:
            names = self.fs.ls(self.path(COMMIT_DIR), detail=False)
        except FileNotFoundError:
            return out
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if not (base.startswith("shard-") and base.endswith(".json")):
                continue
            record = json.loads(self.fs.cat_file(name))
            try:
                size = self.fs.size(self.path(record["file"]))
            except FileNotFoundError:
                continue
            if size == record["bytes"]:
                out[int(record["shard"])] = record
        return out

    def remove_uncommitted(self, committed: dict[int, dict]) -> list[str]:
        """Delete every file under data/ that no commit record names (temporary files and shards a
        crash left without a record); returns what was deleted."""
        norm = self.fs._strip_protocol
        keep = {norm(self.path(r["file"])) for r in committed.values()}
        try:
            files = self.fs.find(self.path(DATA_DIR))
        except FileNotFoundError:
            return []
        gone = [f for f in files if norm(f) not in keep]
        for f in gone:
            self.fs.rm_file(f)
        return gone

    def exists(self) -> bool:
        return self.fs.exists(self.root) and bool(self.fs.ls(self.root, detail=False))

    def prepare(self, identity: dict, overwrite: bool) -> dict[int, dict]:
        """Start or resume the run at this URI (outputs.prepare_run's rule); returns the completed
        shards to skip. A resumed run first loses every uncommitted file under data/."""
        if not prepare_run(self.uri, identity, overwrite, "generate"):
            return {}
        committed = self.completed()
        self.remove_uncommitted(committed)
        return committed

    def read_shard(self, index_or_file, columns: list[str] | None = None) -> pa.Table:
        file = index_or_file if isinstance(index_or_file, str) else f"{DATA_DIR}/{shard_name(index_or_file)}.parquet"
        with self.fs.open(self.path(file), "rb") as f:
            return pq.read_table(f, columns=columns)


def parquet_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(filesystem, paths) of the Parquet files that hold the rows at `uri`, in order: the one
    place that decides which files of a directory count.

    A generate output (it has a run record or commit records): its committed shards only, so a
    half-written output never reads as data. Any other directory: every *.parquet under it, except
    hidden and underscore paths (as pyarrow, Ray Data and pandas skip them). A file: itself.
    """
    fs, root = url_to_fs(uri)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise UserFileNotFoundError(f"{uri}: no such file or directory")
    if fs.isfile(root):
        return fs, [root] if root.endswith(".parquet") else []
    output = uri.rstrip("/").removesuffix("/" + DATA_DIR)  # OUT/data reads as OUT
    base = root.removesuffix("/" + DATA_DIR)
    if fs.exists(f"{base}/{COMMIT_DIR}") or fs.exists(f"{base}/{RUN_RECORD}"):
        store = ShardStore(output)
        return store.fs, [store.path(r["file"]) for _, r in sorted(store.completed().items())]
    files = sorted(f for f in fs.find(root) if f.endswith(".parquet")
                   and not any(part.startswith((".", "_")) for part in f[len(root):].split("/")))
    return fs, files


def file_uri(fs, path: str) -> str:
    """A URI that url_to_fs maps back to (fs, path): plain for local files, protocol:// otherwise."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def file_rows(fs, files: list[str], columns: list[str], what: str) -> Iterator[tuple[str, int]]:
    """(URI, number of rows) of each Parquet file, from its footer only, one file at a time (a caller
    that needs only the first rows stops reading footers there); a UserValueError naming `what` and
    the file when it lacks one of `columns`."""
    for f in files:
        with fs.open(f, "rb") as handle:
            meta = pq.ParquetFile(handle).metadata
        missing = [c for c in columns if c not in meta.schema.names]
        if missing:
            raise UserValueError(f"{what}: {file_uri(fs, f)} has no {' or '.join(repr(c) for c in missing)} column "
                                 f"(columns: {', '.join(meta.schema.names)})")
        yield file_uri(fs, f), meta.num_rows


def read_table(uri: str, columns: list[str] | None = None, max_rows: int | None = None) -> pa.Table:
    """The rows at `uri` (`parquet_files`) as one pyarrow Table: the given columns, the first
    `max_rows` rows. Every reader of shards (measure, masks, the dataset card) goes through here."""
    fs, files = parquet_files(uri)
    tables, rows = [], 0
    for f in files:
        if max_rows is not None and rows >= max_rows:
            break
        with fs.open(f, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        if max_rows is not None:
            table = table.slice(0, max_rows - rows)
        tables.append(table)
        rows += table.num_rows
    if not tables:
        return (SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns if c in SCHEMA.names])).empty_table()
    return pa.concat_tables(tables)


class RowReader:
    """Single rows of Parquet files by (uri, row): what a mask reference or a segmenter's sample
    points at. Keeps the last few row groups (of `columns` only), since consecutive rows share one;
    holds no state that matters (one per worker)."""

    def __init__(self, columns: list[str], cache_row_groups: int = 4):
        self.columns = list(columns)
        self._groups: OrderedDict = OrderedDict()
        self._meta: dict = {}
        self._cache_size = cache_row_groups

    def read(self, uri: str, row: int) -> dict:
        """{column: value} of row `row` of the Parquet file at `uri`; a UserValueError naming the
        file and row when the file is shorter or lacks a column."""
        fs, path = url_to_fs(uri)
        if uri not in self._meta:
            with fs.open(path, "rb") as handle:
                self._meta[uri] = pq.ParquetFile(handle).metadata
        meta, start = self._meta[uri], 0
        missing = [c for c in self.columns if c not in meta.schema.names]
        if missing:
            raise UserValueError(f"{uri}: no '{missing[0]}' column (columns: {', '.join(meta.schema.names)})")
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            if row < start + n:
                break
            start += n
        else:
            raise UserValueError(f"{uri} row {row}: the file has only {meta.num_rows} rows")
        key = (uri, group)
        if key not in self._groups:
            with fs.open(path, "rb") as handle:
                self._groups[key] = pq.ParquetFile(handle).read_row_group(group, columns=self.columns)
            while len(self._groups) > self._cache_size:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        table = self._groups[key]
        return {c: table.column(c)[row - start].as_py() for c in self.columns}


# ----------------------------------------------------------------------------- manifest, card, preview


def dataset_stats(store: ShardStore, records: list[dict]) -> dict:
    """Counts over every committed row, read column by column (never the images): rows, unique
    sample ids, rows per condition, pixels per class."""
    rows, ids, conditions, pixels = 0, set(), {}, [0] * len(CLASS_NAMES)
    for r in records:
        t = store.read_shard(r["file"], ["sample_id", "condition", "class_pixels"])
        rows += t.num_rows
        ids.update(t.column("sample_id").to_pylist())
        for c in t.column("condition").to_pylist():
            conditions[c] = conditions.get(c, 0) + 1
        for counts in t.column("class_pixels").to_pylist():
            for i, n in enumerate(counts):
                pixels[i] += n
    return {"rows": rows, "unique_sample_ids": len(ids), "conditions": dict(sorted(conditions.items())),
            "class_pixels": dict(zip(CLASS_NAMES, pixels))}


def preview_image(store: ShardStore, records: list[dict], num_samples: int):
    """A grid of the first samples: image | colourised label | label over image, a row each."""
    rows, titles = [], []
    for r in records:
        if len(rows) >= num_samples:
            break
        columns = ["sample_id", "condition", "image", "label", "prompt"]
        t = store.read_shard(r["file"], columns).slice(0, num_samples - len(rows))
        for sid, condition, image, label, prompt in zip(*(t.column(c).to_pylist() for c in columns)):
            img = decode_image(image, f"{r['file']} {sid} image", "RGB")
            colours = colorize(decode_label_png(label, f"{r['file']} {sid} label"))
            overlay = (0.5 * img + 0.5 * colours).round().astype(np.uint8)
            rows.append([Image.fromarray(img), Image.fromarray(colours), Image.fromarray(overlay)])
            titles.append(f"{sid} ({condition}; image | label | overlay): {prompt}")
    return image_grid(rows, titles) if rows else None


def measures_section(measures: dict | None) -> str:
    """The card's measures: label fidelity and prompt adherence of a sample of the rows, measured
    with the toy-world probe (jobs/measure.py). `measures` None: the card says they were not measured."""
    if not measures:
        return ("Label fidelity and prompt adherence have not been measured for this dataset. For a "
                "toy-world model: `python jobs/measure.py --samples <this URI>`.\n")
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in measures.items()]
    return "\n".join(lines) + "\n"


PALETTE_TEXT = {  # the card's words for each --control-palette
    "cityscapes": "each train id in its Cityscapes colour",
    "ade20k": "each train id in the colour of its nearest ADE20K class, as public segmentation ControlNets "
              "take it; calora_ray's docs/public-controlnets.md has the table",
}


def dataset_card(manifest: dict, measures: dict | None = None) -> str:
    """README.md of a generated dataset: what it is, how it was made, its format, how to read it."""
    cfg, stats = manifest["config"], manifest["stats"]
    palette = manifest.get("control_palette", "cityscapes")  # a manifest written before the option: cityscapes
    conditions = ", ".join(f"{c} {n}" for c, n in stats["conditions"].items())
    total_pixels = max(1, sum(stats["class_pixels"].values()))
    classes = "\n".join(f"| {name} | {100 * n / total_pixels:.2f} % |" for name, n in stats["class_pixels"].items() if n)
    skipped = "".join(f"- `{s['mask']}`: {s['reason']}\n" for s in manifest["skipped"][:20])
    if len(manifest["skipped"]) > 20:
        skipped += f"- ... {len(manifest['skipped']) - 20} more in manifest.json\n"
    return f"""# Synthetic segmentation dataset ({manifest['num_samples']} samples)

Image–label pairs generated by calora_ray's `jobs/generate.py`: each label map (Cityscapes train
ids) was turned into an image by a segmentation ControlNet on the base model with the CA-LoRA
adapter, so the label is the image's label by construction.

- base model: `{cfg['model']}`; LoRA sha256: `{manifest['lora_sha256'] or 'none'}`
- ControlNet: `{cfg['controlnet']}` (sha256 `{manifest['controlnet_sha256']}`); conditioning palette
  `{palette}`: {PALETTE_TEXT.get(palette, palette)} (the `label` column holds train ids either way)
- masks: `{cfg['masks']}` (split `{cfg['split']}`): {manifest['num_masks']} listed,
  {len(manifest['skipped'])} found unusable by the samples that drew them (each such sample used the
  next usable mask); layout augmentation: flip
  {cfg['flip']}, max zoom {cfg['max_zoom']}
- prompts: {'`' + cfg['prompt_template'] + '`' if cfg['prompt_template'] else "the paper's template, e.g. `" + manifest['example_prompt'] + '`'}
- conditions (rows): {conditions}
- {cfg['steps']} sampling steps, guidance {cfg['guidance']}, ControlNet scale {cfg['conditioning_scale']},
  {manifest.get('width', manifest['resolution'])}x{manifest.get('height', manifest['resolution'])} pixels
  (width x height), job seed {cfg['seed']}

## Format

{manifest['num_shards']} Parquet shards under `data/` ({cfg['rows_per_shard']} rows each, the last one
the rest); `manifest.json` lists each with its row count and sha256. Columns:

{column_table()}

```python
import pyarrow.parquet as pq; table = pq.read_table("data")
import ray; ds = ray.data.read_parquet("data")
import datasets; ds = datasets.load_dataset("parquet", data_files="data/*.parquet", split="train")
ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())  # PIL images
```

## Classes (share of labelled pixels)

| class | pixels |
|---|---|
{classes}

## Measures

{measures_section(measures)}
## Skipped masks

{skipped or 'none'}
"""


def update_card_measures(uri: str, measures: dict) -> None:
    """Add measures of the generated rows (e.g. label fidelity and prompt adherence from the toy-world
    probe, jobs/measure.py) to an existing output: manifest.json gets a "measures" entry and the
    dataset card is rewritten with them. The values are written as given."""
    store = ShardStore(uri)
    manifest = store.read_json(MANIFEST)
    if manifest is None:
        raise FileNotFoundError(f"{uri}: no {MANIFEST} (not a finished generate output)")
    manifest["measures"] = measures
    store.write_text(MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    store.write_text("README.md", dataset_card(manifest, measures))
