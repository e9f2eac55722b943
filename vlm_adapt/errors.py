"""Errors a user can cause. Each message says what went wrong and how to fix it."""


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
