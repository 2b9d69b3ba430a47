"""The tool's own error type: bad input that the user can fix.

Every config, data file, checkpoint folder, Hugging Face folder and flag is untrusted input
(docs/reliability.md). When one is wrong, the code raises `InputError` with one line that names
the problem (the file, the key, a short excerpt of the bad value). The command line prints that
line and exits with status 2; any other exception is a bug in the tool and keeps its traceback.
`InputError` is a ValueError, so library callers that catch ValueError keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input a user can fix; `moe` prints the message as one line and exits with status 2."""


def excerpt(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error quotes a bad value, never megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"
