"""The layer never learns it is distributed: no core module imports torch.distributed (at any
depth, function-level imports included). import-linter (`make lint`) checks the package layers,
but it sees external packages only by their top-level name."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "moe"
CORE_MODULES = sorted(p for p in CORE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "parallel.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_core_never_imports_torch_distributed():
    assert len(CORE_MODULES) >= 15  # config, router, ..., layer, model: the scan sees the core
    offenders = {
        p.name: sorted(n for n in imported_modules(p) if n.startswith("torch.distributed")) for p in CORE_MODULES
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_scan_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import torch.distributed as dist\n    from torch.distributed import all_reduce\n")
    assert {"torch.distributed", "torch.distributed.all_reduce"} <= imported_modules(module)
