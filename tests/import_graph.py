"""The package's import graph as ``tests/test_architecture.py`` checks it (docs/ARCHITECTURE.md, "Floors").

An import is an ``import`` / ``from ... import`` statement anywhere in a file (module level or inside a function), or
a *string import*: a string literal that names one of the package's modules, alone or as ``"module:attribute"``
(the command registry's references, ``importlib.import_module("...")``), including f-strings built from the
module's own string constants (``f"{_HERE}.train:run_train"``). Docstrings and strings that name no module of the
package (``"ssl_distill.checkpoint"``, a format tag) are not imports.

The checker works on ``{module name: source text}``, so tests can feed it a planted file set.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = "ssl_distill"
_REFERENCE = re.compile(r"^(ssl_distill(?:\.\w+)*)(?::[\w.]+)?$")


def read_package(package_dir: Path) -> dict[str, str]:
    """``{module name: source}`` for every ``.py`` file under ``package_dir`` (``pkg/__init__.py`` -> ``pkg``)."""
    sources = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text(encoding="utf-8")
    return sources


def unit(module: str) -> str:
    """``ssl_distill.models.vit`` -> ``models``; ``ssl_distill`` itself -> ``ssl_distill``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _statement_imports(node: ast.AST, package: str) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    # `from ssl_distill import distributed` imports the module ssl_distill.distributed
    return {f"{base}.{a.name}" if base == ROOT else base for a in node.names}


def _constants(tree: ast.Module) -> dict[str, str]:
    """The module's ``NAME = "text"`` assignments at module level (for the f-strings that use them)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return found


def _string_value(node: ast.AST, constants: Mapping[str, str]) -> str | None:
    """The text of a string literal, or of an f-string made of text and the module's string constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if not isinstance(node, ast.JoinedStr):
        return None
    text = ""
    for part in node.values:
        if isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id in constants:
            text += constants[part.value.id]
        elif isinstance(part, ast.Constant):
            text += str(part.value)
        else:
            return None  # built from something else at run time: not a reference we can read
    return text


def module_imports(module: str, source: str, known: Iterable[str], is_package: bool = False) -> set[str]:
    """Every package module that ``module`` (with ``source``) imports, by statement or by string (see the module
    docstring); ``known``: the package's module names, which string references must name exactly."""
    known = set(known)
    package = module if is_package else module.rsplit(".", 1)[0]
    tree = ast.parse(source)
    constants = _constants(tree)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    found: set[str] = set()
    for node in ast.walk(tree):
        found |= _statement_imports(node, package)
        if id(node) in docstrings:
            continue
        text = _string_value(node, constants)
        match = _REFERENCE.match(text.strip()) if text else None
        if match and match.group(1) in known:
            found.add(match.group(1))
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def unit_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """Top-level unit (``models``, ``train``, ``cli`` ...) -> the other units it imports (a module with modules
    below it is a package, an ``__init__.py``, whose relative imports resolve inside itself)."""
    packages = {m.rsplit(".", 1)[0] for m in sources if "." in m}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, source in sources.items():
        for target in module_imports(module, source, sources, module in packages):
            if unit(target) != unit(module):
                graph[unit(module)].add(unit(target))
    return graph


def wrong_way_arrows(graph: Mapping[str, set[str]], floors: list[set[str]]) -> list[str]:
    """``"low -> high"`` for every import from a unit to a unit on a higher floor (``floors``: lowest first); a unit on
    no floor is reported as ``"unit -> ? (on no floor)"``."""
    level = {name: i for i, floor in enumerate(floors) for name in floor}
    arrows = [f"{name} -> ? (on no floor)" for name in sorted(set(graph) - set(level)) if name != ROOT]
    for source in sorted(graph):
        for target in sorted(graph[source]):
            if source in level and target in level and level[target] > level[source]:
                arrows.append(f"{source} -> {target}")
    return arrows


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle between units (``[a, b, ..., a]``), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                walked = [*path, node]
                return [*walked[walked.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt, [*path, node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None
