"""scaletrain's error hierarchy.

Every user mistake (bad config, impossible layout, missing or corrupt files, incompatible
checkpoint) raises a subclass of :class:`ScaletrainError`. The CLI prints its message
without a traceback and exits with code 2; anything else is a crash (exit code 1).
Messages say what is wrong and how to fix it.
"""


class ScaletrainError(Exception):
    """Base class of every error caused by user input rather than a bug."""


class ConfigError(ScaletrainError):
    """A config file, key, type or value is wrong."""


class DataError(ScaletrainError):
    """A corpus, tokenizer or shard is missing, empty, corrupt or inconsistent."""


class CheckpointError(ScaletrainError):
    """A checkpoint or run folder is missing, incomplete or incompatible."""


class LayoutError(ScaletrainError):
    """A parallel layout cannot run on the given world size or model."""


class NumericsError(Exception):
    """Training produced a non-finite loss or gradient under train.nan_policy = "abort" (or a
    rollback had nothing to roll back to). Not a user error: the CLI prints the report and
    exits 3."""
