"""The layering, read from the source: core imports neither serving nor web; serving
imports no web; neither imports a web framework. Every module lives in a layer's folder.
Within web: the Open Inference Protocol's codec imports no web framework, and no module of
endpoints imports another's (what they share is in dependencies.py)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "service"
WEB_FRAMEWORKS = {"fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic_settings", "httpx"}
FORBIDDEN = {"core": {"service.serving", "service.web", *WEB_FRAMEWORKS},
             "serving": {"service.web", *WEB_FRAMEWORKS}}
# web modules with no web framework, and the web modules each may import: the inference
# protocol's codec (unit-tested without a server) and the JSON bounds it shares with /predict
PURE_WEB = {"oip_schema.py": set(), "json_bounds.py": set(),
            "oip_body.py": {"service.web.oip_schema", "service.web.json_bounds"},
            "oip_codec.py": {"service.web.oip_schema", "service.web.oip_body"}}
# modules of endpoints: only the app imports them
ENDPOINTS = {"service.web.routers", "service.web.inference_protocol", "service.web.page", "service.web.docs"}


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
                if node.module:
                    names.add(".".join(base + [node.module]))
                else:  # `from . import a, b`: the modules a and b of the package
                    names.update(".".join(base + [a.name]) for a in node.names)
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


@pytest.mark.parametrize("name", sorted(PURE_WEB))
def test_the_protocol_codec_imports_no_web_framework(name):
    names = imports_of(PACKAGE / "web" / name)
    assert not {n for n in names if n.split(".")[0] in WEB_FRAMEWORKS}, sorted(names)
    assert {n for n in names if n.startswith("service.web")} <= PURE_WEB[name], sorted(names)


def test_only_the_app_imports_a_module_of_endpoints():
    importers = {str(f.relative_to(PACKAGE)): sorted(imports_of(f) & ENDPOINTS) for f in layer_files("web")}
    assert {f: names for f, names in importers.items() if names and f != "web/app.py"} == {}
    assert all(f"{n.rsplit('.', 1)[1]}.py" in {p.name for p in layer_files("web")} for n in ENDPOINTS)


def test_the_import_reader_resolves_relative_imports():
    names = imports_of(PACKAGE / "serving" / "runtime.py")
    assert "service.core.store" in names and "service.serving.feedback_store" in names
    assert {"service.web.docs", "service.web.inference_protocol"} <= imports_of(PACKAGE / "web" / "app.py")


def test_every_module_is_in_a_layer_or_is_the_entry_point():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py"], top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["core", "serving", "web"], folders
