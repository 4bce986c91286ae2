"""The house's floors (docs/ARCHITECTURE.md): ordered floors, imports only downwards (also those written as strings),
no import cycle, one registry; and proof that the checker (tests/import_graph.py) sees what it must."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from import_graph import find_cycle, read_package, unit_graph, wrong_way_arrows

from ssl_distill.commands import COMMANDS
from ssl_distill.commands import _load as load_reference

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ssl_distill"
# Lowest first; a unit imports units on its own floor or lower ones, never higher (docs/ARCHITECTURE.md, "Floors").
FLOORS = [
    {"ssl_distill", "distributed", "fileio", "checkpoint_format", "pickle_scan"},
    {"models"},
    {"config"},  # validates architecture names against the one table, models/names.py
    {"hub", "losses"},
    {"data"},  # reads remote tar shards through the hub's verified downloader
    {"eval", "viz"},
    {"train"},
    {"launch", "demo"},
    {"commands"},
    {"cli"},
]
LOWER = set().union(*FLOORS[:6])  # the floors below training: what a backbone, a loss or an evaluation may use
UPPER = set().union(*FLOORS[6:])


def _package_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Top-level unit -> the units it imports, by statement or by string (tests/import_graph.py)."""
    return unit_graph(read_package(PACKAGE) if sources is None else sources)


def test_lower_floors_never_import_upper_ones():
    graph = _package_graph()
    arrows = sorted(f"{low} -> {up}" for low in LOWER for up in graph.get(low, ()) if up in UPPER)
    assert arrows == []
    assert wrong_way_arrows(graph, FLOORS) == []  # and the floors are ordered among themselves


def test_no_import_cycle_between_packages():
    cycle = find_cycle(_package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_slurm_job_runs_commands_through_the_registry_not_the_cli():
    graph = _package_graph()
    assert "cli" not in graph["launch"]
    assert "commands" not in graph["launch"]  # the registry hands the launcher its run_command
    assert "launch" in graph["commands"]
    assert graph["cli"] == {"commands"}  # the CLI only parses; the registry runs


def _planted(module: str, line: str) -> dict[str, str]:
    """The package's sources with ``line`` appended to ``module``."""
    sources = read_package(PACKAGE)
    sources[module] += "\n" + line + "\n"
    return sources


def test_the_checker_sees_a_string_import_cycle():
    # a launcher naming the registry by string, as the registry names the launcher: no import statement anywhere
    sources = _planted("ssl_distill.launch.common", 'RUN = "ssl_distill.commands:run_command"')
    graph = _package_graph(sources)
    assert find_cycle(graph) == ["commands", "launch", "commands"]
    assert wrong_way_arrows(graph, FLOORS) == ["launch -> commands"]
    # importlib.import_module's argument, and an f-string over the module's own constant, are imports too
    for line in ('importlib.import_module("ssl_distill.cli")', '_AT = "ssl_distill.cli"\nREF = f"{_AT}:main"'):
        assert wrong_way_arrows(_package_graph(_planted("ssl_distill.train.trainer", line)), FLOORS) \
            == ["train -> cli"], line


def test_the_checker_sees_a_lower_floor_importing_a_higher_one():
    sources = _planted("ssl_distill.models.vit", "from ssl_distill.eval import knn")
    assert wrong_way_arrows(_package_graph(sources), FLOORS) == ["models -> eval"]
    sources = _planted("ssl_distill.models.vit", "from ..eval.knn import knn_accuracy")  # relative
    assert wrong_way_arrows(_package_graph(sources), FLOORS) == ["models -> eval"]
    sources = _planted("ssl_distill.hub.registry", "from ssl_distill.data import pipeline")
    assert wrong_way_arrows(_package_graph(sources), FLOORS) == ["hub -> data"]
    sources = _planted("ssl_distill.models.names", "from ssl_distill import config")
    assert wrong_way_arrows(_package_graph(sources), FLOORS) == ["models -> config"]


def test_the_checker_ignores_text_that_names_no_module():
    # a docstring and a format tag that look like module paths are not imports; an unknown unit is named
    sources = _planted("ssl_distill.models.vit", '"""ssl_distill.eval"""\nTAG = "ssl_distill.checkpoint"')
    assert wrong_way_arrows(_package_graph(sources), FLOORS) == []
    sources = {**read_package(PACKAGE), "ssl_distill.newroom": "from ssl_distill import config"}
    assert wrong_way_arrows(_package_graph(sources), FLOORS) == ["newroom -> ? (on no floor)"]


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
    code = ("import sys\nfrom ssl_distill.commands import run_command\n"
            "from ssl_distill.launch.slurm import SlurmCommand\n"
            "code = SlurmCommand('config', ['--changed', 'optim.epochs=17'], backend='gloo', run=run_command)()\n"
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
