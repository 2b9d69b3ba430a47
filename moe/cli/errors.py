"""The tool's error type under the command line's historical name.

`moe` reports InputError, moe.extras.MissingExtra and OSErrors (naming the path) as one line
without a traceback (moe/cli/__init__.py); every other exception is a bug and keeps its traceback."""

from ..errors import InputError

# The command line's historical name for the tool's error type.
UserError = InputError

__all__ = ["InputError", "UserError"]
