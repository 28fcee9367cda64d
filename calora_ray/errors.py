"""UserError: the base of every error the user can fix (config, paths, masks, requests).

jobs/*.py print such an error as one line and exit 2 (calora_ray.cli.run_job); anything else is
a bug and shows its traceback. Library code raises a subclass that also derives from the builtin
it replaces (ValueError, FileNotFoundError, ...), so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix; the message names the flag, key, file or field."""


class UserValueError(UserError, ValueError):
    """A bad value of an option or an input file's content."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A path given by the user that does not exist or is not what the option needs."""


class UserFileExistsError(UserError, FileExistsError):
    """An output that exists and may not be replaced."""
