"""The import graph points down: pallas_kernels <- engine (jaxinfer) <- converters, server <- API/CLI."""

import ast
import pathlib
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = ("jaxinfer", "pallas_kernels", "converters", "server")
# Modules of the `jaxinfer` package at the API layer, above converters and server.
API_LAYER = ("jaxinfer/cli", "jaxinfer/llm.py", "jaxinfer/__init__.py")


def layer(rel: str) -> int:
    if rel.startswith("pallas_kernels"):
        return 0
    if rel.startswith(API_LAYER):
        return 3
    if rel.startswith("jaxinfer"):
        return 1
    return 2  # converters, server


def imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def target_layer(module: str) -> int | None:
    top = module.split(".")[0]
    if top not in PROJECT:
        return None
    rel = module.replace(".", "/")
    return layer(rel if rel != "jaxinfer" else "jaxinfer/__init__.py")


def test_imports_point_down():
    wrong = []
    for package in PROJECT:
        for path in (REPO / package).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            for module in imported_modules(path):
                target = target_layer(module)
                if target is not None and target > layer(rel):
                    wrong.append(f"{rel} imports {module}")
                if rel.startswith("converters") and module.startswith("server"):
                    wrong.append(f"{rel} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_packaging_declares_the_runtime_and_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert {"jax", "flax", "orbax-checkpoint", "transformers", "tokenizers", "safetensors", "gguf",
            "aiohttp", "numpy", "tqdm"} <= names
    assert any(d.startswith("jax>=0.10.2") for d in project["dependencies"])
    assert any("jax[cuda12]" in d for d in project["optional-dependencies"]["cuda"])
    assert "torch==2.13.0" in project["optional-dependencies"]["dev"]
    assert project["scripts"]["jaxinfer"] == "jaxinfer.cli.main:main"


@pytest.mark.parametrize("command", ["chat", "convert"])
def test_console_script_has_the_commands(command):
    script = pathlib.Path(sys.executable).parent / "jaxinfer"  # the console script of this environment
    result = subprocess.run([str(script), command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: jaxinfer " + command in result.stdout


def test_runtime_imports_are_declared_dependencies():
    """A package the code imports (at the top or inside a function) is one `pip install .` brings:
    `make chat` runs in an environment without the dev extra (no torch, which pulls in jinja2)."""
    import importlib.metadata
    import re

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=~! ;]", d)[0].lower().replace("_", "-")
                for d in project["dependencies"] + project["optional-dependencies"]["cuda"]}
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for package in PROJECT:
        for path in (REPO / package).rglob("*.py"):
            for module in imported_modules(path):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in PROJECT or top == "__future__":
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not dists & declared:
                    missing.append(f"{path.relative_to(REPO)} imports {module} ({', '.join(sorted(dists))})")
    assert not missing, "\n".join(missing)
