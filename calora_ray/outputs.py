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


class OutputExistsError(FileExistsError):
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
