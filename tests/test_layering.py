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


#: ARCHITECTURE.md's size rule ("no module over about 450 lines"): past it, look for the seam.
MAX_MODULE_LINES = 460


def unexplained_local_imports(source):
    """Line numbers of imports inside functions with no comment saying why: none on the import's
    line, on the other imports of its block, or on the line just above the block."""
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            first = node.lineno - 1
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1  # the block of imports this one belongs to
            block = lines[max(first - 1, 0):node.end_lineno]
            if not any("#" in line for line in block):
                found.append(node.lineno)
    return found


def test_unexplained_local_imports_finds_a_bare_one():
    source = ("def f():\n    import os\n    return os\n\n\n"
              "def g():\n    # optional dependency\n    import av\n    from av import open\n")
    assert unexplained_local_imports(source) == [2]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_local_imports_say_why_and_modules_stay_small(path):
    # Function-local imports are for optional dependencies and start-up time only, each with a reason.
    source = path.read_text()
    assert not unexplained_local_imports(source), (
        f"{path.relative_to(REPO)} imports inside a function without saying why, at lines "
        f"{unexplained_local_imports(source)}")
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(REPO)}: look for its seam"


def import_cycles(graph):
    """The strongly connected groups of more than one module in {module: imported modules}."""
    order, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = set()
            while not group or v not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in order:
            visit(v)
    return cycles


def test_import_cycles_finds_a_circle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_modules():
    # e.g. face3d/morphable -> tddfa -> toy -> morphable, which face3d/loading.py broke. Package
    # __init__ files are left out: `from . import x` names the sibling module x as well.
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
               for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    graph = {name: imported_modules(path, package_of(path)) & modules.keys() - {name}
             for name, path in modules.items()}
    assert not import_cycles(graph)
