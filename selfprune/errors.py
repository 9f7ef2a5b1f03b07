"""The one exception type for mistakes a user can make (and fix)."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix. The CLI maps it to exit code 2.

    Anything else that escapes is a bug and may show a traceback.
    """


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
