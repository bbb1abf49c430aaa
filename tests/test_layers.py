"""Dependencies point downward only (README's Architecture): no module imports from a layer above its own."""

import ast
from pathlib import Path

import rlhfspec

# Lowest first; a module may import from its own layer and any layer before it.
LAYERS = [
    {"errors", "paths", "allocator"},
    {"models"},
    {"strategy"},
    {"engine"},
    {"rollout"},
    {"sim"},  # drives the strategies and the rollout's coordinator; knows nothing of data, rewards or RL
    {"data", "rewards", "distill"},
    {"rl"},
    {"cli", "bench"},
]


def layer_of(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def imported_packages(path: Path):
    """rlhfspec subpackages a module imports, at any depth (function-level imports included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "rlhfspec" and len(parts) > 1:
                yield parts[1], node.lineno


def test_no_module_imports_from_a_layer_above_its_own():
    root = Path(rlhfspec.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue  # the package's own __init__ re-exports the public API
        own = layer_of(rel.parts[0] if len(rel.parts) > 1 else rel.stem)
        for package, line in imported_packages(path):
            if layer_of(package) > own:
                upward.append(f"{rel}:{line} imports rlhfspec.{package}")
    assert not upward, "upward imports:\n" + "\n".join(upward)
