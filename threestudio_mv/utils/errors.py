"""User-facing errors: one clear line, exit code 2, no traceback."""
import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A mistake in the user's input (config, prompt, path). Printed as one line by CLIs."""


def exit_on_user_error(main: F) -> F:
    """Decorator for CLI entry points: a UserError becomes `error: <message>` on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
