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
