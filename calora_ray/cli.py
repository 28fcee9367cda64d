"""What every jobs/*.py shares: a UserError becomes one clear line on stderr and exit code 2.

A traceback is for bugs; a missing directory or an unknown concept is the user's input and gets
its message only (calora_ray.errors.UserError and its subclasses). Anything else — a library bug,
a plain ValueError from deep inside torch — keeps its traceback. Set CALORA_DEBUG=1 to see the
traceback of a UserError too. Importing this module quiets the libraries' chatter (quiet_libraries).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from .errors import UserError


def user_error(e: BaseException) -> UserError | None:
    """The UserError behind `e`: itself, its cause, or what a Ray Train worker raised."""
    seen = set()
    stack = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, UserError):
            return err
        stack.extend(getattr(err, "worker_failures", {}).values())  # ray.train WorkerGroupError
        stack.extend([err.__cause__, getattr(err, "controller_failure", None)])
    return None


def quiet_libraries() -> None:
    """Keep job output to what the user asked for (progress bars, results), not library chatter.

    Runs when this module is imported (below), since the libraries warn while they are imported too
    (transformers' torchvision fallback notice comes with diffusers' pipelines, imported by
    calora_ray.models after this module in every job), and again in run_job. The job's Ray workers
    get the same levels from their environment (distributed.WORKER_QUIET_ENV); Ray's own output is
    distributed.ensure_ray's (--verbose)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


quiet_libraries()


def run_job(fn, cfg, **kwargs):
    """Call `fn(cfg)`; report user errors as `error: <message>` and exit 2."""
    quiet_libraries()
    try:
        return fn(cfg, **kwargs)
    except Exception as e:
        cause = user_error(e)
        if cause is None or os.environ.get("CALORA_DEBUG") == "1":
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
