"""The package's imports run one way: no module imports itself back through others, and none imports a
layer above its own (docs/code-layout.md). Every `atlas_vla` import is read, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atlas_vla"
# from the top down; a module may import its own layer and those below it
LAYERS = [
    ["cli", "train", "sweep"],
    ["training", "generation"],
    ["config"],
    ["eval"],
    ["scenes"],
    ["runtime"],
    ["models", "serving"],
    ["data", "chunk_schedule", "video"],
    ["hub"],
    ["schema", "files", "processes", "wandb_artifacts", "constants", "action_layout", "__init__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the atlas_vla modules it imports (a name imported from a package counts as its module
    when one of that name exists)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("atlas_vla")}
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: a relative import; the package imports absolutely (atlas_vla....)")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("atlas_vla"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        found[name] = {target for target in targets if target in modules and target != name}
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [f"{module} -> {target}" for module, targets in imports().items() for target in sorted(targets)
              if layer(target) < layer(module)]
    assert upward == []


def test_no_module_imports_itself_back():
    graph = imports()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert circles == []
