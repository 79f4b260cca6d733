"""One exception type for everything a user can get wrong.

Entry points catch `UserError`, print its message (which names the problem and the fix)
and exit non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config value, a dataset, a model id, a checkpoint."""
