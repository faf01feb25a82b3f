"""The layering of the packages, read from the source (every import, those inside functions
and under TYPE_CHECKING too): services import the `exegpt` library and never each other; the
library imports no service; only `exegpt/commands/` (the `exegpt` command line and the
orchestration that starts and drives services) imports both, and neither the library nor a
service imports it, not even for a type."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = "exegpt.commands"


@dataclass(frozen=True)
class Import:
    """One imported module and where it is imported."""

    path: str  # relative to the repository root
    line: int
    module: str


def _dotted(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _absolute(node: ast.ImportFrom, path: str) -> str:
    """The package a `from` import reads from, a relative one resolved as Python does against
    the module at `path`: `from ..commands import cli` in exegpt/bench/x.py reads
    `exegpt.commands` (one dot is the module's own package; an `__init__.py` is its package)."""
    if not node.level:
        return node.module or ""
    package = _dotted(path).split(".")
    if not path.endswith("/__init__.py"):
        package = package[:-1]
    if node.level > len(package):
        raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imported_modules(node: ast.Import | ast.ImportFrom, path: str) -> list[str]:
    """`from services import worker` imports `services.worker`: a name taken from a
    top-level package, or from a package named only by dots (`from .. import commands`),
    counts as its subpackage (a name that is not one changes no rule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = _absolute(node, path)
    if module in ("services", "exegpt") or not node.module:
        return [f"{module}.{alias.name}" for alias in node.names]
    return [module]


def _imports_of(tree: ast.AST, path: str) -> list[Import]:
    """Every import in `tree`, at any depth: in functions, classes and `if TYPE_CHECKING:`
    blocks too (a type-only import is still a dependency on the module it names)."""
    return [
        Import(path, node.lineno, module)
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for module in _imported_modules(node, path)
    ]


def source_imports(package: str) -> list[Import]:
    """Every import in every module under `package/` (a top-level folder of the repo)."""
    found: list[Import] = []
    for file in sorted((ROOT / package).rglob("*.py")):
        path = file.relative_to(ROOT).as_posix()
        found += _imports_of(ast.parse(file.read_text(), filename=path), path)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violation(found: Import) -> str | None:
    """Why `found` breaks the layering, or None when it keeps it."""
    where = _dotted(found.path)
    if _within(where, "services"):
        service = ".".join(where.split(".")[:2])
        if found.module.startswith("services.") and not _within(found.module, service):
            return f"the service {service} imports another service; share it via exegpt/"
        if _within(found.module, COMMANDS):
            return f"the service {service} imports the orchestration package {COMMANDS}"
    elif _within(where, "exegpt") and not _within(where, COMMANDS):
        if _within(found.module, "services"):
            return f"the library imports a service; only {COMMANDS} may"
        if _within(found.module, COMMANDS):
            return f"the library imports the orchestration package {COMMANDS}"
    return None


def layering_violations(imports: list[Import]) -> list[str]:
    return [
        f"{found.path}:{found.line}: import of {found.module}: {reason}"
        for found in imports
        if (reason := violation(found)) is not None
    ]


# Imports the walk must find, one of each kind it reads: one inside a function (`exegpt
# COMMAND` loads its module when it runs), one under TYPE_CHECKING, one at the top of a module.
KNOWN_IMPORTS = {
    ("exegpt/commands/cli.py", "services.worker"),
    ("exegpt/commands/calibration_pass.py", "services.scheduler.calibration"),
    ("services/router/__main__.py", "exegpt.command_line"),
}


def test_the_source_keeps_the_layering() -> None:
    imports = source_imports("exegpt") + source_imports("services")
    found = {(i.path, i.module) for i in imports}
    assert KNOWN_IMPORTS <= found, f"the walk missed {sorted(KNOWN_IMPORTS - found)}"
    violations = layering_violations(imports)
    assert not violations, "imports that break the layering:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("source", "path", "broken"),
    [
        ("from services.worker import engine", "services/router/x.py", True),
        ("def f():\n    import services.scheduler.search.plan", "services/worker/x.py", True),
        ("from services import profiler", "services/scheduler/x.py", True),
        ("from services.worker.modes import rra", "services/worker/stage/x.py", False),
        ("from exegpt.commands import launcher", "services/router/x.py", True),
        ("def f():\n    from services.scheduler import plan_cli", "exegpt/x.py", True),
        ("from services.scheduler import plan_cli", "exegpt/commands/x.py", False),
        ("from exegpt.commands.autoplan import AutoPlan", "exegpt/bench/x.py", True),
        ("if TYPE_CHECKING:\n    from exegpt.commands import autoplan", "exegpt/x.py", True),
        ("if TYPE_CHECKING:\n    from services.worker import engine", "exegpt/x.py", True),
        ("from exegpt.schedule import Schedule", "services/router/x.py", False),
        ("from ..commands import cli", "exegpt/bench/x.py", True),
        ("from .. import commands", "exegpt/bench/x.py", True),
        ("def f():\n    from ..scheduler import plan_cli", "services/router/x.py", True),
        ("from .modes import rra", "services/worker/x.py", False),
        ("from ..modes import rra", "services/worker/stage/x.py", False),
        ("from . import engine", "services/worker/__init__.py", False),
        ("from .. import router", "services/worker/__init__.py", True),
        ("from ... import router", "services/worker/modes/x.py", True),
    ],
)
def test_a_broken_rule_names_the_file_the_line_and_the_import(
    source: str, path: str, broken: bool
) -> None:
    imports = _imports_of(ast.parse(source), path)
    violations = layering_violations(imports)
    assert bool(violations) == broken, violations
    line = source.count("\n") + 1  # each case's import is on its last line
    for message in violations:
        assert message.startswith(f"{path}:{line}: import of {imports[-1].module}:"), message


def test_a_relative_import_above_the_top_level_package_is_refused_with_its_place() -> None:
    with pytest.raises(ValueError, match="^services/router/x.py:1: relative import beyond"):
        _imports_of(ast.parse("from ...exegpt import commands"), "services/router/x.py")
