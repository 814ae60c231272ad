"""The package's import graph: no cycle among ``nas`` modules, and no private name imported across modules.

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import`` of a ``nas`` module, at module
level and inside functions alike: a lazy import is still a dependency) and checked with the standard library's
``graphlib`` (a cycle raises ``CycleError``).
"""
import ast
import graphlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(package_dir):
    """{module name: source path} of every .py file under ``package_dir`` (a package's ``__init__`` is the package)."""
    out = {}
    base = os.path.dirname(package_dir)
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                out[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return out


def import_graph(package_dir):
    """``(graph, private)``: graph {module: set of nas modules it imports}; private: [(importer, module, name)] for
    every ``_name`` imported from another module."""
    mods = modules(package_dir)
    graph, private = {m: set() for m in mods}, []
    for module, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        graph[module].add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = module.split(".")
                    anchor = parts[:len(parts) - node.level + (1 if is_package else 0)]
                    source = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    source = node.module
                if source not in mods:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in mods:  # from nas.engine import train: the submodule
                        graph[module].add(sub)
                        continue
                    graph[module].add(source)
                    if alias.name.startswith("_") and source != module:
                        private.append((module, source, alias.name))
    for module in graph:
        graph[module].discard(module)
    return graph, private


def test_no_import_cycle_among_nas_modules():
    graph, _ = import_graph(os.path.join(ROOT, "nas"))
    assert len(graph) > 30 and graph["nas.engine.search"]  # the walk found the package and its imports
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle among nas modules: {' -> '.join(err.args[1])}")
    # the layers: the engine uses the tasks, spaces and strategies; none of them uses the engine's loops
    loops = {"nas.engine.search", "nas.engine.train", "nas.engine.blackbox"}
    for module in order:
        if module.startswith(("nas.tasks", "nas.spaces", "nas.strategies")):
            assert not graph[module] & loops, (module, graph[module] & loops)


def test_no_private_name_imported_across_modules():
    _, private = import_graph(os.path.join(ROOT, "nas"))
    assert private == []


def test_the_checker_sees_cycles_and_private_imports(tmp_path):
    """The check itself can fail: a two-module cycle through a lazy import, and a private name."""
    pkg = tmp_path / "nas"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from nas.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from nas.a import _helper\n    return _helper\n")
    graph, private = import_graph(str(pkg))
    assert graph["nas.a"] == {"nas.sub.b"} and graph["nas.sub.b"] == {"nas.a"}
    assert private == [("nas.sub.b", "nas.a", "_helper")]
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())
    (pkg / "sub" / "c.py").write_text("from . import b\nfrom .. import a\n")  # relative imports resolve too
    graph, _ = import_graph(str(pkg))
    assert graph["nas.sub.c"] == {"nas.sub.b", "nas.a"}


def test_a_module_dropped_into_a_registry_package_registers_itself(tmp_path, monkeypatch):
    """Adding a space, strategy or task is adding its file: the package imports every module it holds."""
    import sys

    from nas.registry import Registry, import_modules

    pkg = tmp_path / "plugins_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("from nas.registry import Registry\nTHINGS = Registry('thing')\n")
    for name in ("alpha", "beta"):
        (pkg / f"{name}.py").write_text(f"from plugins_pkg.base import THINGS\nTHINGS.register('{name}')(object)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import plugins_pkg

    import_modules("plugins_pkg", plugins_pkg.__path__)
    assert isinstance(sys.modules["plugins_pkg.base"].THINGS, Registry)
    assert sys.modules["plugins_pkg.base"].THINGS.names() == ["alpha", "beta"]
    for name in ("plugins_pkg", "plugins_pkg.base", "plugins_pkg.alpha", "plugins_pkg.beta"):
        monkeypatch.delitem(sys.modules, name)


# -- OpenMP's wait policy is OpenMP's own or the user's (issue 21, item 4: passive waiting cost 3.5x on a VM) -------
_PROBE = r"""
import importlib.util, json, os, sys

seen = {}


class Probe:  # records the environment at the moment torch is first imported (when it loads OpenMP)
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return None


sys.meta_path.insert(0, Probe())
spec = importlib.util.spec_from_file_location("entry", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the script's imports (main() is not called)
from nas.engine.search import search  # noqa: F401  (and what the run imports next)
print(json.dumps({"at_torch_import": seen.get("policy", "torch not imported"),
                  "now": os.environ.get("OMP_WAIT_POLICY")}))
"""


@pytest.mark.parametrize("script", ["search.py", "train.py"])
@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_entry_scripts_leave_openmps_wait_policy_to_openmp_or_the_user(script, given):
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    r = subprocess.run([sys.executable, "-c", _PROBE, os.path.join(ROOT, script)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"at_torch_import": given, "now": given}
