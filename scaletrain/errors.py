"""scaletrain's error hierarchy and process exit codes.

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


class StorageError(ScaletrainError):
    """A file could not be written: disk full, quota, permission denied, read-only file system
    (scaletrain.fsutil.storage_error words the message after the cause)."""


class LayoutError(ScaletrainError):
    """A parallel layout cannot run on the given world size or model."""


class NumericsError(Exception):
    """Training produced a non-finite loss or gradient under train.nan_policy = "abort" (or a
    rollback had nothing to roll back to). Not a user error: the CLI prints the report and
    exits 3."""


class Stopped(BaseException):
    """Training stopped on a signal (train/preempt.py): SIGTERM/SIGUSR1 exit 5, Ctrl-C 130, after
    saving a checkpoint when a step had run. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on its way swallows it. The CLI prints the message (rank 0) and exits
    with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Process exit codes: the one table (docs: README "Contract"). Launchers (Slurm scripts, the
# torchrun wrapper) rely on them: 2 and 3 repeat when retried, 4 and 5 are worth a restart.
EXIT_OK = 0
EXIT_USER_ERROR = 2  # a ScaletrainError: one message on stderr, nothing written lost
EXIT_NUMERICS = 3  # non-finite training under train.nan_policy = "abort" (train/faults.py)
EXIT_HANG = 4  # a rank stopped by the hang watchdog (train.hang_timeout_s)
EXIT_PREEMPTED = 5  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint; resume with --resume auto
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), after saving a checkpoint when training
