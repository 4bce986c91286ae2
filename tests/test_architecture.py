"""The house's floors (docs/ARCHITECTURE.md): lower packages never import upper ones, no import cycle, one registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from ssl_distill.commands import COMMANDS
from ssl_distill.commands import _load as load_reference

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ssl_distill"
LOWER = {"models", "data", "losses", "hub", "eval", "viz", "checkpoint_format", "config", "distributed", "fileio"}
UPPER = {"train", "launch", "cli", "commands", "demo"}


def _unit(module: str) -> str:
    """``ssl_distill.models.vit`` -> ``models``; ``ssl_distill`` itself -> ``ssl_distill``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path, module: str) -> set[str]:
    """Every ``ssl_distill`` module ``path`` imports, at module level or inside functions."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from ssl_distill import distributed` imports the module ssl_distill.distributed
            found.update(f"{base}.{a.name}" if base == "ssl_distill" else base for a in node.names)
    return {m for m in found if m.startswith("ssl_distill.")}


def _package_graph() -> dict[str, set[str]]:
    """Top-level unit (``models``, ``train``, ``cli`` ...) -> the units it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for target in _imports(path, module):
            if _unit(target) != _unit(module):
                graph[_unit(module)].add(_unit(target))
    return graph


def test_lower_floors_never_import_upper_ones():
    graph = _package_graph()
    arrows = sorted(f"{low} -> {up}" for low in LOWER for up in graph.get(low, ()) if up in UPPER)
    assert arrows == []


def test_no_import_cycle_between_packages():
    graph = _package_graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state:
                cycle = visit(nxt, [*path, node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_slurm_job_runs_commands_through_the_registry_not_the_cli():
    graph = _package_graph()
    assert "cli" not in graph["launch"]
    assert "commands" in graph["launch"]
    assert graph["cli"] == {"commands"}  # the CLI only parses; the registry runs


def test_every_registered_command_resolves_to_its_functions():
    for command in COMMANDS.values():
        assert callable(load_reference(command.arguments)), command.name
        assert callable(load_reference(command.run)), command.name


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_imports_no_torch():
    proc = _run_python("import sys\nfrom ssl_distill.cli import build_parser\nbuild_parser()\n"
                       "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_slurm_command_runs_a_command_without_the_cli_module():
    code = ("import sys\nfrom ssl_distill.launch.slurm import SlurmCommand\n"
            "code = SlurmCommand('config', ['--changed', 'optim.epochs=17'], backend='gloo')()\n"
            "print('cli imported:', 'ssl_distill.cli' in sys.modules, 'exit', code)")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 17" in proc.stdout
    assert "cli imported: False exit 0" in proc.stdout


def test_run_command_reports_a_user_mistake_as_one_line(capsys):
    from ssl_distill.commands import run_command

    assert run_command("config", ["optim.epochz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ssl-distill config: error: Unknown config key 'optim.epochz' in the command-line overrides. " \
                  "Did you mean 'optim.epochs'?"
