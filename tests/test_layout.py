"""The package layout: sub-packages in pipeline order with no upward import, and the 0.1 module paths kept for one
release behind a DeprecationWarning."""
import ast
import importlib
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import evoprune
from evoprune import _moved

PKG = Path(evoprune.__file__).parent
# the floors, bottom up: a module may import from its own floor and the ones below it, never from above
FLOORS = [{"errors", "_version", "validators", "storage", "progress", "netinfo", "models", "data", "train", "_moved"},
          {"space"}, {"prune"}, {"deploy"}, {"evolve"}, {"cli"}]


def _floor(top: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if top in names)


def _imports(path: Path) -> set[str]:
    """The evoprune sub-packages and top-level modules a file imports from (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [base + [a.name] for a in node.names]
            elif (node.module or "").startswith("evoprune."):
                names = [node.module.split(".")]
            else:
                continue
            found.update(p[1] for p in names if len(p) > 1)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("evoprune."))
    return found


def test_no_module_imports_from_a_floor_above_its_own():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] in ("__init__.py", "__main__.py"):  # the public face sits on top of everything
            continue
        own = _floor(rel.parts[0].removesuffix(".py"))
        upward += [f"{rel} imports evoprune.{t}" for t in _imports(path) if _floor(t) > own]
    assert not upward, upward


def test_no_module_is_over_about_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_path_still_imports_with_a_deprecation_warning(old):
    new = importlib.import_module(_moved.MOVED[old])
    public = sorted(n for n in vars(new) if not n.startswith("_") and not isinstance(vars(new)[n], type(sys)))
    name = public[0]
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*import {name} from {_moved.MOVED[old]}"):
        got = getattr(__import__(old, fromlist=[name]), name)
    assert got is getattr(new, name)


def test_from_evoprune_import_an_old_module_warns_and_forwards():
    from evoprune.evolve import toolbox
    with pytest.warns(DeprecationWarning, match="evoprune.toolbox is deprecated"):
        from evoprune import toolbox as old
        assert old.register is toolbox.register


def test_importing_the_old_export_module_keeps_evoprune_export_the_function():
    import evoprune.export  # noqa: F401  (the 0.1 module path)
    assert callable(evoprune.export) and evoprune.export.__module__ == "evoprune.deploy.exporter"


def test_a_pickle_naming_an_old_module_path_loads():
    """A checkpoint written by 0.1 names its classes by the old paths (evoprune.plan.PruningPlan)."""
    from evoprune.space.plan import PruningPlan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert pickle.loads(b"cevoprune.plan\nPruningPlan\n.") is PruningPlan


@pytest.mark.slow
def test_the_new_paths_import_without_any_deprecation_warning():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "import evoprune, evoprune.cli, evoprune.cli.job, evoprune.evolve.toolbox, evoprune.deploy.latency\n"
            "from evoprune import *\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
