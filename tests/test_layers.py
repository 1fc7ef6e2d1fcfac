"""The import layering of ../shared/STYLE.md, checked by reading the source (ast; nothing is imported or executed).

Top to bottom: the CLI; recipes (peers); the learner and the training kit; strategies over the strategy interface;
whole models; the module bank; leaves (streams, metrics, tracking, config, results, report, compat...). A module
imports only its own layer or layers below; no recipe imports another recipe; no module imports another module's
``_private`` name.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("continual", "strategies", "streams")

# Layer numbers: lower imports nothing from higher. Order of the checks below matters (most specific first).
CLI, RECIPES, KIT, STRATEGIES, MODELS, MODULES, LEAVES = range(7)
LAYER_NAMES = ["cli", "recipes", "learner/training kit", "strategies", "models", "modules", "leaves"]


def layer_of(module: str) -> Optional[int]:
    """The layer of a dotted module name of this project (None for a module outside it)."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if module in ("continual", "continual.cli", "continual.__main__"):  # the package root is the Python facade
        return CLI
    if module == "continual.recipes" or module.startswith("continual.recipes."):
        return RECIPES
    if module in ("continual.learner", "continual.training") or module.startswith("continual.training."):
        return KIT
    if top == "strategies" or module == "continual.expansion":
        return STRATEGIES
    if module.startswith("continual.models"):
        return MODELS
    if module.startswith("continual.modules"):
        return MODULES
    return LEAVES  # streams.*, continual.metrics/tracking/config/results/report/compat/resources/checkpoint


def recipe_of(module: str) -> Optional[str]:
    """``continual.recipes.lm.model`` -> ``lm``; None outside the recipes (the package itself included)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["continual", "recipes"] else None


def source_modules() -> Dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path) -> Iterator[Tuple[int, str, List[str]]]:
    """(line, imported module, imported names) for every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target, [alias.name for alias in node.names]


def violations() -> List[str]:
    modules = source_modules()
    found = []
    for module, path in modules.items():
        mine = layer_of(module)
        where = path.relative_to(REPO).as_posix()
        for line, target, names in imports_of(module, path):
            theirs = layer_of(target)
            if theirs is None:
                continue
            # "from continual.modules import families" imports a submodule: judge the submodule.
            for name in names:
                if f"{target}.{name}" in modules:
                    theirs = max(theirs, layer_of(f"{target}.{name}"))
            if theirs < mine:
                found.append(f"{where}:{line}: {LAYER_NAMES[mine]} module imports {target} ({LAYER_NAMES[theirs]})")
            ours, other = recipe_of(module), recipe_of(target)
            if ours and other and ours != other:
                found.append(f"{where}:{line}: recipe {ours!r} imports recipe {other!r} ({target})")
            if target != module and not target.startswith(module + "."):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    found.append(f"{where}:{line}: imports private name(s) {private} from {target}")
    return found


def test_the_layers_are_respected():
    found = violations()
    assert not found, "import layering violated (see ../shared/STYLE.md, Layers):\n" + "\n".join(found)


@pytest.mark.parametrize("module, layer", [
    ("continual.cli", CLI),
    ("continual", CLI),
    ("continual.recipes.run", RECIPES),
    ("continual.learner", KIT),
    ("strategies.delta", STRATEGIES),
    ("continual.expansion", STRATEGIES),
    ("continual.models.moduleformer.modeling", MODELS),
    ("continual.modules.experts", MODULES),
    ("streams.build", LEAVES),
    ("continual.config", LEAVES),
    ("torch", None),
])
def test_layer_assignment(module, layer):
    assert layer_of(module) == layer


def test_the_checker_catches_an_upward_import_a_recipe_pair_and_a_private_name(tmp_path):
    fake = tmp_path / "continual"
    (fake / "modules").mkdir(parents=True)
    (fake / "recipes").mkdir()
    (fake / "modules" / "bad.py").write_text("def f():\n    from continual.models.backbone import load_backbone\n")
    (fake / "recipes" / "lm.py").write_text("from continual.recipes.run import seed\n")
    (fake / "recipes" / "run.py").write_text("from continual.report import _grid\n")
    for package in ("strategies", "streams"):
        (tmp_path / package).mkdir()
    globals()["REPO"], saved = tmp_path, REPO
    try:
        found = violations()
    finally:
        globals()["REPO"] = saved
    assert any("modules/bad.py:2" in v and "continual.models.backbone" in v for v in found)
    assert any("recipe 'lm' imports recipe 'run'" in v for v in found)
    assert any("private name(s) ['_grid']" in v for v in found)
