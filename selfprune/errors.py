"""The one exception type for mistakes a user can make (and fix)."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix. The CLI maps it to exit code 2.

    Anything else that escapes is a bug and may show a traceback.
    """
