"""The import layering of ARCHITECTURE.md, checked on the source (no imports run):

- nothing in ``reenact`` below the command layer imports ``reenact.cli``: only ``reenact/cli/``
  itself and the subsystems' ``commands.py`` do;
- no module of the ``face3d`` model formats imports :mod:`reenact.face3d.loading` (it sits above them);
- benchmarks import ``bench/_common.py`` and the packages, never a test module or another
  benchmark, and no test imports a benchmark.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "reenact"


def imported_modules(path, package):
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def package_of(path):
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


def test_imported_modules_resolves_relative_imports(tmp_path):
    # The checker itself can fail: a planted relative import of the CLI is seen as reenact.cli.
    source = tmp_path / "planted.py"
    source.write_text("from ..cli import CommandError\nfrom . import pncc\n")
    assert {"reenact.cli", "reenact.cli.CommandError", "reenact.data.pncc"} <= imported_modules(source, "reenact.data")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_command_layer_imports_the_cli(path):
    if path.name == "commands.py" or path.parent.name == "cli" or path.relative_to(PACKAGE) == pathlib.Path("__main__.py"):
        return  # the command layer, and `python -m reenact` above it
    cli = {name for name in imported_modules(path, package_of(path))
           if name == "reenact.cli" or name.startswith("reenact.cli.")}
    assert not cli, f"{path.relative_to(REPO)} imports {sorted(cli)}: domain code raises domain errors instead"


def test_model_formats_do_not_import_the_loader():
    for name in ("morphable", "toy", "tddfa", "eos_sfm", "mediapipe_face", "registry"):
        path = PACKAGE / "face3d" / f"{name}.py"
        assert "reenact.face3d.loading" not in imported_modules(path, "reenact.face3d"), path


def test_benchmarks_and_tests_stay_apart():
    benches = {p.stem for p in (REPO / "bench").glob("bench_*.py")} | {"_common"}  # (sass_report is a tool)
    tests = {p.stem for p in (REPO / "tests").glob("*.py")}
    for path in (REPO / "bench").glob("bench_*.py"):
        names = {n.split(".")[0] for n in imported_modules(path, "")}
        assert not names & tests, f"{path.name} imports test modules {sorted(names & tests)}"
        assert not names & (benches - {"_common", path.stem}), f"{path.name} imports another benchmark"
    for path in (REPO / "tests").glob("*.py"):
        names = {n.split(".")[0] for n in imported_modules(path, "")}
        assert not names & benches, f"{path.name} imports benchmark modules {sorted(names & benches)}"
