"""Errors a user can cause. Each message says what went wrong and how to fix it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


class VlmAdaptError(Exception):
    """Base class for user-facing errors (bad config, missing data or weights)."""


class WeightsNotFoundError(VlmAdaptError):
    """Pretrained weights could not be found or loaded."""


class DatasetNotFoundError(VlmAdaptError):
    """A dataset root or split file is missing or malformed."""


class CorruptImageError(VlmAdaptError):
    """An image file could not be read."""


class BackboneMismatchError(VlmAdaptError):
    """A checkpoint was loaded onto a backbone other than the one it was trained on."""


class ConfigError(VlmAdaptError):
    """A configuration value is invalid."""


class DivergedError(VlmAdaptError):
    """Training produced a non-finite loss or trainable tensor; the run is recorded as `diverged`."""


class RunDirectoryError(VlmAdaptError):
    """The run directory holds another run's results, or is in use by a live run."""


# Errors raised by the libraries underneath for a value the user set; shown like vlm_adapt's own.
def _library_user_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    return (MissingMandatoryValue, InterpolationResolutionError)


def is_user_error(err: BaseException) -> bool:
    """Whether `err` comes from a value the user set (shown as a message, not a traceback)."""
    return isinstance(err, (VlmAdaptError, *_library_user_errors()))


def debug_errors() -> bool:
    """Whether user errors keep their traceback (HYDRA_FULL_ERROR=1 or VLM_ADAPT_DEBUG=1)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HYDRA_FULL_ERROR", "VLM_ADAPT_DEBUG"))


@contextmanager
def exit_on_user_error(command: str) -> Iterator[None]:
    """Turn a user error into one message on stderr and exit status 1, without a Python traceback.

    Used around each command's task function (inside Hydra, which would otherwise print the
    traceback); bugs still raise with theirs, and HYDRA_FULL_ERROR=1 / VLM_ADAPT_DEBUG=1 keep it.
    """
    try:
        yield
    except Exception as err:
        if not is_user_error(err) or debug_errors():
            raise
        exit_with_message(f"vlm-adapt {command}", user_message(err))


def exit_with_message(prefix: str, message: str) -> NoReturn:
    """Print `<prefix>: error: <message>` on stderr and exit with status 1 (no traceback)."""
    print(f"{prefix}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def user_message(err: BaseException) -> str:
    """The message a user sees for `err`: vlm_adapt's own as written, OmegaConf's with the key to set."""
    if isinstance(err, VlmAdaptError):
        return str(err)
    first = str(getattr(err, "msg", None) or err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{first} (set {key}=... on the command line)" if key else first
