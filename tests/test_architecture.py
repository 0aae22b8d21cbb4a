"""The package's import graph, read from the sources: every import, deferred ones included."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "gpt2_decl"

# What each layer may import (besides itself): core at the bottom, the CLI at the top.
MAY_IMPORT = {
    "core": set(),
    "text": {"core"},
    "storage": {"core", "text"},
    "training": {"core", "text", "storage"},
    "speedups": {"core", "storage"},
    "interpret": {"core"},
    "bench": {"core", "text", "storage", "training", "speedups", "interpret"},
    "cli": {"core", "text", "storage", "training", "speedups", "interpret", "bench"},
}
# The model's thin forwards, the one reach upwards: nothing they reach may import the model.
MODEL = "gpt2_decl.core.model"
MODEL_FORWARDS = {"gpt2_decl.text.generation", "gpt2_decl.storage.huggingface",
                  "gpt2_decl.storage.gguf"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from gpt2_decl.x import y` imports the module gpt2_decl.x.y where there is one.
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                       else node.module for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES}
    return found - {name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_every_package_of_the_library_has_a_place_in_the_layers():
    layers = {layer(name) for name in MODULES} - {None, "__main__"}
    assert layers <= set(MAY_IMPORT)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for name, targets in GRAPH.items():
        source = layer(name)
        if source not in MAY_IMPORT:
            continue
        allowed = MAY_IMPORT[source] | {source}
        for target in targets:
            if layer(target) not in allowed and not (name == MODEL and target in MODEL_FORWARDS):
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_no_module_imports_the_package_root_but_the_command_line():
    importers = {name for name, targets in GRAPH.items() if "gpt2_decl" in targets}
    assert {layer(name) for name in importers} <= {"cli"}, importers


def test_there_is_no_import_cycle():
    for name in GRAPH:
        assert name not in reachable(name, GRAPH), f"{name} imports itself through others"


def test_nothing_the_models_forwards_reach_imports_the_model():
    for forward in MODEL_FORWARDS:
        assert forward in GRAPH[MODEL]
        assert MODEL not in reachable(forward, GRAPH), forward


def test_importing_the_model_loads_no_storage_training_or_speedups():
    # Importing a submodule runs the package's __init__ first: both are checked at once.
    statement = "import gpt2_decl.core.layers, gpt2_decl"
    loaded = subprocess.run(
        [sys.executable, "-c", f"{statement}; import sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    outside = [name for name in loaded
               if name.startswith(("gpt2_decl.storage", "gpt2_decl.training",
                                   "gpt2_decl.speedups", "gpt2_decl.text", "torchao"))]
    assert not outside
