"""User-facing errors.

Anything a user can cause (bad path, bad key, infeasible budget, corrupt artifact) raises `NasqError` with a
message that says what was wrong, where (file / key), and what to do. The CLI prints the message without a
traceback and exits non-zero. Programming errors stay ordinary exceptions.
"""


class NasqError(Exception):
    """An error the user can fix; its message is shown as-is by the CLI."""
