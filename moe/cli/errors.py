"""The one exception the command line reports without a traceback."""


class UserError(Exception):
    """An error the user can fix; reported as one line without a traceback, exit status 2."""
