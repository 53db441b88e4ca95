"""The one base class of every error a user can fix: bad input, a bad config value, a bad file.

Commands catch :class:`UserError` (``runtime.user_errors``) and print its message as one line;
anything else is a bug and keeps its traceback. Each module's own error type derives from
it (``DataError``, ``ExportError``, ...), so callers can catch either.
"""
from __future__ import annotations


class UserError(Exception):
    """Input that cannot be used; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot be used (unknown schedule, remat policy, missing class word, ...)."""


class TrainError(UserError, RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class ModelLoadError(UserError, ValueError):
    """The model path/id cannot be read as a Stable Diffusion model (diffusers directory or single file).

    Defined here, below both readers (``loading`` and ``single_file``); ``loading.ModelLoadError`` is this class.
    """
