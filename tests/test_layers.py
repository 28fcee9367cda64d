"""The package is a layered import graph (docs/architecture.md): a module imports only modules of
its own layer or a lower one, the module-level graph has no cycle, the project's own imports sit at
the top of each file, and a delayed third-party import is a heavy optional library with a reason."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "calora_ray"

# Lowest first. A module not listed here fails the test: a new module needs a layer.
LAYERS = [
    ("core", ["calora_ray", "errors", "losses", "selection", "metrics", "concepts", "collectives", "sensitivity"]),
    ("base", ["config", "plots", "cli", "data"]),
    ("models and the toy world", ["models", "toyworld"]),
    ("datasets", ["datasets", "probe"]),
    ("artifacts", ["lora", "controlnet", "outputs", "shards", "masks"]),
    ("job drivers", ["scoring", "training", "generation", "sampling", "measure", "toyworld.pretrain", "evaluation",
                     "ablation", "ablation_report"]),
    ("Ray adapters", ["distributed", "ray_train", "ray_data", "ray_eval", "ray_tune", "serve"]),
]
# Delayed (function-local) imports are allowed only for these heavy optional libraries, and each
# carries a comment on its line saying why.
DELAYED_OK = ("ray", "fastapi", "starlette", "mmseg", "mmengine", "mmcv", "tensorboardX")
# The project's modules that import mmsegmentation (the optional seg extra) when imported: another module
# may import them inside the function that needs them, with the reason on the line, so that it keeps
# working without the extra.
OPTIONAL_OWN = ("calora_ray.evaluation", "calora_ray.ray_eval")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "seg_configs":
            continue  # mmseg config files (package data read by mmengine), not modules
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer_of(module: str) -> int:
    """The layer of a module: the most specific entry of LAYERS that names it or a parent package."""
    best, best_len = None, -1
    short = module.removeprefix("calora_ray.") if module != "calora_ray" else "calora_ray"
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if (short == name or short.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    assert best is not None, f"{module} has no layer in tests/test_layers.py LAYERS"
    return best


def own_imports(module: str, path: Path):
    """(imported calora_ray module, line, at top level?) for every import of the project's code."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "calora_ray" or target.startswith("calora_ray."):
                # `from . import x` imports the submodule x when it is one
                names = [f"{target}.{a.name}" for a in node.names]
                yield from ((n if n in modules() else target, node.lineno, id(node) in top) for n in names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("calora_ray"):
                    yield alias.name, node.lineno, id(node) in top


def test_every_import_points_down_or_sideways():
    wrong = []
    for module, path in modules().items():
        for target, line, _ in own_imports(module, path):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) "
                             f"imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_data_never_imports_the_toy_world():
    wrong = [f"{module} imports {target}" for module, path in modules().items() if module == "calora_ray.data" or module.startswith("calora_ray.data.")
             for target, _, _ in own_imports(module, path) if target.startswith("calora_ray.toyworld")]
    assert not wrong, wrong


def test_no_import_cycle():
    graph = {m: {t for t, _, top in own_imports(m, p) if top and t != m} for m, p in modules().items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(nxt_name := node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[nxt_name] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_own_imports_at_the_top_and_delayed_imports_say_why():
    local, unexplained = [], []
    for module, path in modules().items():
        lines = path.read_text().splitlines()
        for target, line, top in own_imports(module, path):
            if not top and not (target in OPTIONAL_OWN and "#" in lines[line - 1]):
                local.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                if isinstance(node, ast.ImportFrom) and node.level:
                    continue  # own module: reported above
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                roots = {n.split(".")[0] for n in names}
                if not roots <= set(DELAYED_OK) or "#" not in lines[node.lineno - 1]:
                    unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not local, "imports of the project's modules inside functions:\n" + "\n".join(local)
    assert not unexplained, ("delayed imports that are not a heavy optional library with a reason on the line:\n"
                             + "\n".join(unexplained))
