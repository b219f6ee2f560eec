"""The package's structure: imports go down the data flow, never in a circle.

Parsed from the source (no import is executed): every ``import`` and ``from … import`` of a
rankest module, at module level or inside a function, is an edge to the module it names (to
``rankest.x.y`` for ``from rankest.x import y`` when y is a module). A package's ``__init__``
is a module of its own; the implicit import of parent packages is not an edge.
"""

from __future__ import annotations

import ast
import pathlib

import rankest

ROOT = pathlib.Path(rankest.__file__).resolve().parent

#: Imports allowed inside functions: optional or heavy dependencies loaded only when used
#: (each such import carries a comment saying why), and the compiled extension itself.
LOCAL_OK = ("transformers", "matplotlib", "datasets", "huggingface_hub", "gguf", "tokenizers", "rankest._C",
            "torch.utils.cpp_extension")


def module_name(path: pathlib.Path) -> str:
    parts = ["rankest", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "_csrc" not in p.parts}


def imports(path: pathlib.Path, known: set[str]):
    """(line, module imported, inside a function?) for every rankest import of a file."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, id(node) in local
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                compiled = sub == "rankest._C"  # the extension: a module, though not a source file
                yield node.lineno, sub if sub in known or compiled else target, id(node) in local


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {t for _, t, _ in imports(p, known) if t in known and t != m} for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]):
    """One cycle of the graph as a list of modules, or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(edges, 0)
    for root in sorted(edges):
        if colour[root]:
            continue
        stack, path = [(root, iter(sorted(edges[root])))], [root]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(edges[nxt]))))
                path.append(nxt)
    return None


def test_no_import_cycle_among_rankest_modules():
    edges = graph()
    assert len(edges) > 40 and "rankest.estimator.pipeline" in edges
    assert find_cycle(edges) is None, " → ".join(find_cycle(edges))


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_local_imports_are_only_optional_heavy_dependencies():
    mods = modules()
    known = set(mods)
    bad = [f"{m}:{line}: {target}" for m, p in mods.items() for line, target, local in imports(p, known)
           if local and not target.startswith(LOCAL_OK)]
    assert not bad, "function-local imports that belong at module level:\n" + "\n".join(bad)


def test_the_layout_has_a_file_per_concept():
    for name in ("sources.corpus", "sources.rows", "sources.teachers", "targets.base", "targets.neural",
                 "targets.ngram", "targets.logits", "accumulate.base", "accumulate.gram", "accumulate.factor",
                 "accumulate.sketch", "accumulate.sparse_gram", "io.checkpoint", "io.results", "runtime.run",
                 "runtime.distributed", "estimator.pipeline", "heads.pipeline", "diagnostics.commands", "report.estimate"):
        assert f"rankest.{name}" in modules(), name


def test_no_docstring_cites_files_outside_the_repository():
    for m, p in modules().items():
        text = p.read_text()
        for foreign in ("ARCHITECTURE.md", "INTERFACES.md", "STYLE.md", "issue 1", "issue 2", "issue 3", "issue 4",
                        "issue 5", "issue 6", "issue 7", "issue 8", "issue 9"):
            assert foreign not in text, f"{m} cites {foreign!r}"
