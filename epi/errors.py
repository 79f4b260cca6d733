"""The exceptions a user can act on.

Entry points catch `UserError`, print its message (which names the problem and the fix) and
exit with its `exit_code`; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config value, a dataset, a model id, a checkpoint, a full disk. Exit code 2."""

    exit_code = 2


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm stopped the run before the bad update. Exit code 3."""

    exit_code = 3


class RunDirTaken(UserError):
    """The run directory holds another run (finished, running, or trained with other settings): this run was refused
    before it wrote anything there, and must not write there either (not even error.txt). Exit code 2."""


class UnsafeFile(UserError):
    """A file a run reads asks to construct or run Python objects: refused without running anything, and never
    passed over as merely unusable (a cache entry like that is tampering, not wear). Exit code 2."""
