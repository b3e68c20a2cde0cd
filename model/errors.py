"""The one exception type for mistakes a user can fix (bad data, wrong flags, mismatched files)."""


class UserError(Exception):
    """A problem in the user's input. Scripts print its message without a traceback and exit 2."""
