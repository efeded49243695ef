"""User-facing exception types.

Entry points catch `SparseEmbedError`, print its message on one line and exit
with status 2: these errors are caused by the user's input (config, files,
shapes), so a traceback would only hide the message that names the fix.
"""


class SparseEmbedError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(SparseEmbedError):
    """A config file, key or value is missing, unknown or of the wrong type."""


class DataError(SparseEmbedError):
    """A data file or directory is missing, empty or corrupt."""


class TrainingError(SparseEmbedError):
    """Training cannot go on (for example the loss became non-finite)."""
