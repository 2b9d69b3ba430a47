"""The configs that ship with the package, and how a config is named on the command line.

The top-level `configs/` folder of the repository is the source; `moe/configs` links to it, so a
source checkout and an installed wheel (which carries the files themselves) read the same YAML.
A config is given either as a path or as the stem of a shipped file: `tiny`, `deepseek-v3-mini`,
`deepseek-v3` (configs/full/deepseek-v3.yaml). A path that exists always wins over a name.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "tiny"  # what `moe train` trains when given no --config


def shipped_configs() -> dict[str, Path]:
    """Name -> path of every shipped config: the trainable ones first, then configs/full/."""
    files = sorted(CONFIG_DIR.glob("*.yaml")) + sorted((CONFIG_DIR / "full").glob("*.yaml"))
    return {path.stem: path for path in files}


def resolve_config(spec: str | Path) -> Path:
    """A config's file from a path or a shipped name; FileNotFoundError naming both ways otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    named = shipped_configs().get(str(spec))
    if named is not None:
        return named
    raise FileNotFoundError(
        f"config file not found: {str(spec)[:200]} (nor a shipped config name: `moe configs` lists them)"
    )
