"""The one exception type for mistakes a user can fix (bad data, wrong flags, mismatched files)."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem in the user's input. Scripts print its message without a traceback and exit 2."""


def exit_on_user_error(run: Callable[[], object]) -> None:
    """Call `run()`; a UserError prints `error: <message>` on stderr, with no traceback, and exits 2."""
    try:
        run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
