"""Optional dependencies, and the pip extra that brings each one.

The core install (`pip install moe-reference`) has what the layer and `moe train` need. A
feature that needs more imports it through `require`, which names the extra when it is missing:
`pip install 'moe-reference[hf]'` and so on (pyproject.toml lists the extras).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# importable module -> the extra that installs it
EXTRA_OF = {
    "transformers": "hf",
    "tokenizers": "hf",
    "jinja2": "hf",  # chat templates
    "matplotlib": "plots",
    "tensorboard": "tensorboard",
    "triton": "triton",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it.

    The command line prints it as one line (exit status 2): installing a package fixes it."""


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (a key of EXTRA_OF, or a submodule of one) for `feature`, or raise MissingExtra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRA_OF[module.split(".")[0]]
        raise MissingExtra(
            f"{feature} needs {module.split('.')[0]}, which is not installed: pip install 'moe-reference[{extra}]'"
        ) from e
