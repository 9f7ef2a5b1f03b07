"""The exception types for what a user can fix: bad input (exit 2) and the machine (exit 3)."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix. The CLI maps it to exit code 2.

    Anything else that escapes is a bug and may show a traceback.
    """


class EnvironmentFault(UserError):
    """The machine, not the input: no space, an unwritable or read-only directory, a Prefect
    database that cannot be locked, a Prefect server gone or reset. The message names the path (or
    server), the fix, and the rerun command; what finished is kept. The CLI maps it to exit code 3.
    A UserError subclass, so every one-line handling of user errors applies."""


class CorruptFile(UserError):
    """A cached file that cannot be trusted (truncated, bit-flipped, foreign). ``path`` names it
    and ``why`` says what is wrong, so a caller that can recompute the content may set the file
    aside and do so."""

    def __init__(self, path: object, why: object):
        self.path, self.why = path, why
        super().__init__(
            f"file {path} is corrupt or unreadable ({why}). Delete it (rm '{path}') and run again: "
            "it will be recomputed."
        )


def cause(e: BaseException) -> str:
    """``Type: first line`` of a library's exception, for a one-line UserError that says why."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
