"""The layering, read from the source: core imports neither serving nor web; serving
imports no web; neither imports a web framework. Every module lives in a layer's folder."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "service"
WEB_FRAMEWORKS = {"fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic_settings", "httpx"}
FORBIDDEN = {"core": {"service.serving", "service.web", *WEB_FRAMEWORKS},
             "serving": {"service.web", *WEB_FRAMEWORKS}}


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


def layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    assert layer_files(layer), f"no modules in service/{layer}"
    bad = {}
    for f in layer_files(layer):
        hits = sorted(n for n in imports_of(f) if any(n == x or n.startswith(x + ".") for x in FORBIDDEN[layer]))
        if hits:
            bad[str(f.relative_to(PACKAGE))] = hits
    assert not bad, f"service/{layer} imports from above its layer: {bad}"


def test_the_import_reader_resolves_relative_imports():
    names = imports_of(PACKAGE / "serving" / "runtime.py")
    assert "service.core.store" in names and "service.serving.feedback_store" in names


def test_every_module_is_in_a_layer_or_is_the_entry_point():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py"], top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["core", "serving", "web"], folders
