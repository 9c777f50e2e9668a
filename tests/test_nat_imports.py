"""No module under nat_ext/ imports another in a circle, counting imports inside functions."""
import ast
import importlib.machinery
import os

import nat_ext

PKG_DIR = os.path.dirname(nat_ext.__file__)


def import_graph(pkg_dir: str, pkg: str) -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its source (top level, functions, branches)."""
    modules = {f[:-3] for f in os.listdir(pkg_dir) if f.endswith(".py")}
    # Compiled extension modules (_C): leaves, importing nothing of the package.
    compiled = {f.split(".")[0] for f in os.listdir(pkg_dir)
                if f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))}

    def resolve(name: str) -> str | None:
        # "pkg.x.y" -> "x" when pkg/x.py exists; "pkg" -> "__init__"
        if name == pkg:
            return "__init__"
        if name.startswith(pkg + "."):
            first = name[len(pkg) + 1:].split(".")[0]
            return first if first in modules else None
        return None

    graph = {}
    for mod in modules:
        with open(os.path.join(pkg_dir, mod + ".py")) as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = pkg if node.level else (node.module or "")
                if node.level and node.module:
                    base = f"{pkg}.{node.module}"
                if node.level > 1:  # beyond the package: not ours
                    continue
                target = resolve(base)
                names = {a.name for a in node.names}
                if target == "__init__" and names <= modules | compiled:  # from . import x, x a module
                    deps |= names & modules
                else:  # from .x import name, from . import name (a module of its own, or the package's)
                    deps.add(target)
                    if target == "__init__":
                        deps |= names & modules
        deps.discard(None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list [a, b, ..., a] of modules importing each other in a circle, or None."""
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_nat_ext_imports_no_circle():
    graph = import_graph(PKG_DIR, "nat_ext")
    assert {"train", "eval", "supervised", "config"} <= set(graph)
    assert "eval" in graph["train"] and "supervised" in graph["eval"], graph  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def _package(tmp_path, files):
    for name, src in files.items():
        (tmp_path / name).write_text(src)
    return import_graph(str(tmp_path), "pkg")


def test_finder_sees_a_circle_through_a_function_body(tmp_path):
    graph = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "import os\ndef f():\n    from . import c\n",
        "c.py": "def g():\n    import pkg.a\n",
    })
    assert graph == {"__init__": set(), "a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_finder_accepts_a_chain_and_the_package_init(tmp_path):
    graph = _package(tmp_path, {
        "__init__.py": "from . import a\n",
        "a.py": "from .b import f\nimport torch\n",
        "b.py": "def f():\n    from pkg import c\n",
        "c.py": "",
    })
    assert find_cycle(graph) is None
    graph = _package(tmp_path, {"c.py": "from pkg import x\n"})  # c -> __init__ -> a -> b -> c
    assert find_cycle(graph) == ["__init__", "a", "b", "c", "__init__"]
