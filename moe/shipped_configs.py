"""Where a config comes from: the configs that ship with the package, how a config is named on
the command line, and how its file is read.

The top-level `configs/` folder of the repository is the source; `moe/configs` links to it, so a
source checkout and an installed wheel (which carries the files themselves) read the same YAML.
A config is given either as a path or as the stem of a shipped file: `tiny`, `deepseek-v3-mini`,
`deepseek-v3` (configs/full/deepseek-v3.yaml). A path that exists always wins over a name.

A config file is untrusted input (docs/reliability.md), so `read_config_file` reads it strictly:
a regular file of at most MAX_YAML_BYTES / MAX_CONFIG_BYTES (checked before reading, so a FIFO or
/dev/zero never blocks or streams), UTF-8, YAML without aliases (an alias bomb turns a few hundred bytes into
gigabytes) and without duplicate keys, JSON without duplicate keys or NaN/Infinity. Every problem
is an `InputError` naming the file and, where the parser knows it, the line.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, excerpt

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "tiny"  # what `moe train` trains when given no --config
# Size caps, checked before reading. The largest shipped config is under 2 kB. YAML is parsed in
# pure Python (the checks below hook its composer), about 10 us a token: 64 KiB parses in well under
# a second, where 1 MiB of YAML takes tens of seconds. JSON's parser is C: 1 MiB takes milliseconds.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_BYTES = 1 << 16
MAX_NESTING = 32  # mappings and lists inside each other; a config needs 3


def shipped_configs() -> dict[str, Path]:
    """Name -> path of every shipped config: the trainable ones first, then configs/full/."""
    files = sorted(CONFIG_DIR.glob("*.yaml")) + sorted((CONFIG_DIR / "full").glob("*.yaml"))
    return {path.stem: path for path in files}


def resolve_config(spec: str | Path) -> Path:
    """A config's file from a path or a shipped name; FileNotFoundError naming both ways otherwise,
    InputError for a path that exists but is no regular file (a folder, a FIFO, a device)."""
    path = Path(spec)
    if path.is_file():
        return path
    named = shipped_configs().get(str(spec))
    if named is not None:
        return named
    if path.exists():
        raise InputError(f"{str(spec)[:200]}: not a regular file (a config is a YAML or JSON file)")
    raise FileNotFoundError(
        f"config file not found: {str(spec)[:200]} (nor a shipped config name: `moe configs` lists them)"
    )


def read_config_file(path: Path) -> Any:
    """The data of a YAML or JSON (by suffix ".json") config file, read strictly (see above)."""
    text = _read_text(path, MAX_CONFIG_BYTES if path.suffix == ".json" else MAX_YAML_BYTES)
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        raise InputError(f"{path}: malformed config: {e.problem or e.context}{where}") from None
    except (yaml.YAMLError, ValueError) as e:  # JSONDecodeError is a ValueError, so is int('9' * 5000)
        raise InputError(f"{path}: malformed config: {excerpt(str(e).splitlines()[0], 200)}") from None
    except RecursionError:
        raise InputError(f"{path}: malformed config: nested too deeply") from None


def _read_text(path: Path, limit: int) -> str:
    """The file's text, after checking that it is a regular file of at most `limit` bytes.
    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)  # of the file opened, not of whatever the path names a moment later
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a regular file (a config is a YAML or JSON file)")
        if info.st_size > limit:
            raise InputError(f"{path}: {info.st_size} bytes, over the {limit}-byte limit of a config file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # a file that grows after the check is still cut off
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(f"{path}: over the {limit}-byte limit of a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses aliases, merge keys (`<<`), duplicate keys and deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise InputError(f"YAML alias (*name) at line {line}: aliases are not allowed in a config")
        self._depth += 1
        if self._depth > MAX_NESTING:
            line = self.peek_event().start_mark.line + 1
            raise InputError(f"nested more than {MAX_NESTING} levels deep at line {line}")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set = set()
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise InputError(f"YAML merge key (<<) at line {line}: merge keys are not allowed in a config")
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise InputError(f"duplicate key {excerpt(key)} at line {line}")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise InputError(f"duplicate key {excerpt(key)}")
        data[key] = value
    return data


def _json_constant(name: str) -> Any:
    raise InputError(f"{name} is not a JSON number")
