"""The layering in docs/architecture.md, checked on the source."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_MODEL = {"ray", "prefect", "mlflow", "services", "pipelines", "fastapi", "boto3"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_diki_model_is_a_pure_library():
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_modules(p) & FORBIDDEN_IN_MODEL)
        for p in (ROOT / "diki_model").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_services_do_not_import_pipelines():
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "services").rglob("*.py") if "pipelines" in imported_modules(p)
    ]
    assert offenders == []


def test_outer_layers_use_only_the_public_model_api():
    """services/ and pipelines/ import `diki_model` and its public sub-packages, not its internals."""
    allowed = {"diki_model", "diki_model.data", "diki_model.datasets", "diki_model.pretrain", "diki_model.bench"}
    bad = []
    for folder in ("services", "pipelines"):
        for p in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(p.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diki_model"):
                    if node.module not in allowed and not node.module.startswith("diki_model.bench."):
                        bad.append(f"{p.relative_to(ROOT)}: from {node.module} import ...")
    assert bad == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, anywhere in the file (lazy and type-only too)."""
    files = {
        _module_name(p): p for folder in ("diki_model", "services", "pipelines") for p in (ROOT / folder).rglob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                # `from pkg import sub` names the submodule when one exists, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_no_import_cycle_anywhere_in_the_project():
    """Tarjan's strongly connected components over the import graph: every component is one module."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_point_down_only():
    """pipelines -> services -> diki_model, never back up (lazy and type-only imports included)."""
    layer = {"diki_model": 0, "services": 1, "pipelines": 2}
    upward = [
        f"{src} -> {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if layer[dst.split(".")[0]] > layer[src.split(".")[0]]
    ]
    assert upward == []


def test_the_import_graph_sees_lazy_and_relative_imports():
    """The checks above would pass vacuously if the graph missed edges: spot-check known ones."""
    graph = import_graph()
    assert "services.training.job" in graph["pipelines.learning"] or "services.training" in graph["pipelines.learning"]
    assert "services.registry" in graph["pipelines.cli.train"]  # a function-local import
    assert "diki_model.data.format" in graph["diki_model.data.validation"]
