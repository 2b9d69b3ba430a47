"""The one exception the command line reports without a traceback (besides OSErrors naming a path)."""

from ..errors import InputError

# The command line's historical name for the tool's error type.
UserError = InputError

__all__ = ["InputError", "UserError"]
