"""What every jobs/*.py shares: bad input becomes one clear line on stderr and exit code 2.

A traceback is for bugs; a missing directory or an unknown concept is the user's input and gets
its message only. Set CALORA_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from .distributed import ClusterResourceError
from .models import ModelLoadError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               ModelLoadError, ClusterResourceError)


def user_error(e: BaseException) -> BaseException | None:
    """The user-input error behind `e`: itself, its cause, or what a Ray Train worker raised."""
    seen = set()
    stack = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, USER_ERRORS):
            return err
        stack.extend(getattr(err, "worker_failures", {}).values())  # ray.train WorkerGroupError
        stack.extend([err.__cause__, getattr(err, "controller_failure", None)])
    return None


def quiet_libraries() -> None:
    """Keep job output to what the user asked for (progress bars, results), not library chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:
        pass


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
