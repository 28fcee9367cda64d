"""Job output directories that are either complete or absent.

A job checks its output path before any work (so a bad flag costs nothing), writes everything into
a hidden sibling directory, and renames it into place only when every file is written: a crash or
a bad input midway leaves nothing partial under the output name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from .errors import UserError


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


def prepare_run_dir(output: str | Path, identity: dict, overwrite: bool, what: str) -> Path:
    """An output directory that doubles as a resumable run directory.

    New (created), or the same run again (its RUN_RECORD matches `identity`: resume), or an error
    naming what differs. `overwrite` deletes it first. `what` names the job in messages.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output}: exists and is not a directory")
    if overwrite and output.exists():
        shutil.rmtree(output)
    record = output / RUN_RECORD
    if output.is_dir() and any(output.iterdir()):
        if not record.is_file():
            raise FileExistsError(f"--output {output}: directory exists and is not a {what} run (no {RUN_RECORD}); "
                                  f"pass --overwrite to replace it or choose another --output")
        previous = json.loads(record.read_text())
        changed = sorted(k for k in identity.keys() | previous.keys() if identity.get(k) != previous.get(k))
        if changed:
            raise ValueError(f"--output {output} holds a run with a different configuration ({', '.join(changed)} "
                             f"differ), so it cannot be resumed; pass --overwrite to start over or choose "
                             f"another --output")
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(identity, indent=2, default=str) + "\n")
    return output
