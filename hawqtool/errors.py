"""Error types: UserError is shown as one line with exit code 1; anything else is internal."""


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix in one line."""
