"""Exceptions vlmkit raises for bad input.

Every message names the file, row, field or option at fault and says what would be valid; the CLI prints
the message without a traceback.
"""


class VlmkitError(Exception):
    """Base class: a user-facing error with a message that stands on its own."""


class ConfigError(VlmkitError, ValueError):
    """An unknown preset/recipe/option, or a value out of range."""


class DataError(VlmkitError, ValueError):
    """A dataset file, row or image that cannot be used as given."""


class CheckpointError(VlmkitError, FileNotFoundError):
    """A checkpoint folder that is missing or incomplete."""
