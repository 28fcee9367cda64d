"""Job output directories that are either complete or absent.

A job checks its output path before any work (so a bad flag costs nothing), writes everything into
a hidden sibling directory, and renames it into place only when every file is written: a crash or
a bad input midway leaves nothing partial under the output name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
import fsspec

from .errors import UserError, UserValueError


class OutputExistsError(UserError, FileExistsError):
    pass


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Fail early if `path` holds something and --overwrite was not given; check the parent is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"--output {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"--output {path}: directory exists and is not empty "
                                f"(pass --overwrite to replace it, or choose another --output)")
    parent = path.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"--output {path}: {existing} is not writable")
    return path


@contextmanager
def staged_output_dir(path: str | Path, overwrite: bool):
    """Yield a temporary directory; on success it replaces `path`, on error it is removed."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


RUN_RECORD = "run_config.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary sibling and rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def for_workers(cfg, outputs: tuple[str, ...] = ("output",), inputs: tuple[str, ...] = ()):
    """`cfg` with its local paths made absolute against this (the driver's) directory, for Ray workers,
    which run in their node's directory, not the driver's (a driver that joins a cluster started
    elsewhere would otherwise write and read relative paths somewhere else). `outputs`: fields that
    are local paths unless they are URIs; `inputs`: fields made absolute only when they name an
    existing local file or directory (so hub ids, presets and toy sources pass unchanged). The run's
    identity keeps the paths as the user gave them."""
    def absolute(value, must_exist: bool):
        if not isinstance(value, str) or "://" in value or (must_exist and not Path(value).exists()):
            return value
        return str(Path(value).resolve())

    changes = {f: absolute(getattr(cfg, f), False) for f in outputs}
    for f in inputs:
        value = getattr(cfg, f)
        changes[f] = [absolute(v, True) for v in value] if isinstance(value, list) else absolute(value, True)
    return dataclasses.replace(cfg, **changes)


def run_identity(cfg, **extra) -> dict:
    """What defines a run of a job config: every option except the knobs a rerun may change and
    still continue the same run (declared once, on the field: `identity=False` in config.py), plus
    `extra` facts the options do not show (the selected modules, an adapter's sha256, ...). An option
    declared `identity="unless-default"` (one added after runs were made) counts only when it is not
    its default, so a run recorded before it existed still resumes. JSON-normalised, so a record read
    back compares equal."""
    def counts(f) -> bool:
        rule = f.metadata.get("identity", True)
        return rule is True or (rule == "unless-default" and getattr(cfg, f.name) != f.default)

    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if counts(f)}
    return json.loads(json.dumps(values | extra, default=str))


def prepare_run(uri: str | Path, identity: dict, overwrite: bool, what: str) -> bool:
    """The one resume rule of every run directory (fine-tuning, ControlNet training, pretraining,
    generation), on a local path or any fsspec URI.

    New or empty: created, RUN_RECORD written, returns False. The same run again (its RUN_RECORD
    equals `identity`): returns True (resume). Anything else is a UserError naming what differs.
    `overwrite` deletes it first. `what` names the job in messages.
    """
    fs, root = fsspec.core.url_to_fs(str(uri))
    root = root.rstrip("/")
    identity = json.loads(json.dumps(identity, default=str))
    if fs.isfile(root):
        raise OutputExistsError(f"--output {uri}: exists and is not a directory")
    if overwrite and fs.exists(root):
        fs.rm(root, recursive=True)
    record = f"{root}/{RUN_RECORD}"
    if fs.isdir(root) and fs.ls(root, detail=False):
        if not fs.isfile(record):
            raise OutputExistsError(f"--output {uri}: directory exists and is not a {what} run (no {RUN_RECORD}); "
                                    f"pass --overwrite to replace it or choose another --output")
        previous = json.loads(fs.cat_file(record))
        changed = sorted(k for k in identity.keys() | previous.keys() if identity.get(k) != previous.get(k))
        if changed:
            raise UserValueError(f"--output {uri} holds a run with a different configuration ({', '.join(changed)} "
                                 f"differ), so it cannot be resumed; pass --overwrite to start over or choose "
                                 f"another --output")
        return True
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(record, (json.dumps(identity, indent=2) + "\n").encode())  # one PUT / one small local write
    return False


def prepare_run_dir(output: str | Path, identity: dict, overwrite: bool, what: str) -> Path:
    """A local output directory that doubles as a resumable run directory (`prepare_run`)."""
    prepare_run(Path(output), identity, overwrite, what)
    return Path(output)
