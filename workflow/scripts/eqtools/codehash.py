"""What a rule script's results depend on in the shared package: its transitive `eqtools`
imports, read from the source (never kept by hand), and their content hash.

Snakemake reruns a script rule when the script file changes, not when a module it imports
changes, so every rule passes `script_code(<its script>)` as a param (workflow/rules/common.smk).
An import counts wherever it is written (module level or inside a function): a lazy import is a
dependency once the function runs, and over-counting only reruns a job, never skips one.
A subpackage (eqtools/engine/) is one module: any import of it or of its modules names it, and
its hash covers all of its files.

The bookkeeping modules `io` (atomic writes, logging), `progress` (progress lines), `partial`
(a killed job's saved groups) and `provenance` (the sidecars) are left out: they change no
result, and hashing them would rerun the whole study for a logging tweak.
Each sidecar records the commit of the code that actually wrote it.
"""

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "eqtools"
BOOKKEEPING = frozenset({"io", "partial", "progress", "provenance"})
ROOT = Path(__file__).resolve().parent


def module_files(name: str, package: Path = ROOT) -> list[Path]:
    """The files of module `name`: `<name>.py`, or every .py file of the subpackage `<name>/`
    sorted by relative path."""
    folder = Path(package) / name
    if folder.is_dir():
        return sorted(folder.rglob("*.py"), key=lambda f: f.relative_to(folder).as_posix())
    return [Path(package) / f"{name}.py"]


def imported_modules(path: str | Path, package: Path = ROOT) -> set[str]:
    """The eqtools modules `path` imports (`from eqtools import x`, `from eqtools.x import y`,
    `import eqtools.x`, and relative imports inside the package), anywhere in the file; an
    import of `eqtools.x.y` names the subpackage `x`."""
    st = Path(path).stat()  # the parse is cached per file version: every rule asks again
    modules, names = _parsed_imports(str(path), str(package), st.st_mtime_ns, st.st_size)
    # from eqtools import x: x is a module or subpackage of the package, or a name its
    # __init__ defines
    return set(modules) | {
        n for n in names if (Path(package) / f"{n}.py").exists() or (Path(package) / n).is_dir()
    }


def _absolute(node: ast.ImportFrom, path: Path, package: Path) -> str | None:
    """The module an import-from names, a relative import resolved inside the package (None for
    one in a file outside it)."""
    if node.level == 0:
        return node.module
    try:
        folder = path.resolve().parent.relative_to(package.resolve()).parts
    except ValueError:
        return None
    if node.level - 1 > len(folder):
        return None
    parts = [PACKAGE, *folder[: len(folder) - node.level + 1]]
    return ".".join(parts + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=1024)
def _parsed_imports(
    path: str, package: str, mtime_ns: int, size: int
) -> tuple[frozenset, frozenset]:
    """(modules named as eqtools.<x>, names of `from eqtools import ...`) of one file version."""
    found, names = set(), set()
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=path)):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, Path(path), Path(package))
            parts = module.split(".") if module else []
            if not parts or parts[0] != PACKAGE:
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(parts[1])
    return frozenset(found), frozenset(names)


def reached_modules(script: str | Path, package: Path = ROOT) -> set[str]:
    """The eqtools modules `script` imports, directly or through other eqtools modules."""
    seen: set[str] = set()
    todo = list(imported_modules(script, package))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            for path in module_files(name, package):
                todo += imported_modules(path, package)
    return seen


def code_modules(script: str | Path, package: Path = ROOT) -> list[str]:
    """The modules of `reached_modules(script)` that can change a result (all but the
    bookkeeping ones), sorted: what the script's code hash covers."""
    return sorted(reached_modules(script, package) - BOOKKEEPING)


def code_hash(script: str | Path, package: Path = ROOT) -> str:
    """Content hash of the modules of `code_modules(script)` (names and bytes; for a
    subpackage, each file's relative path and bytes)."""
    h = hashlib.sha256()
    for name in code_modules(script, package):
        h.update(name.encode())
        folder = Path(package) / name
        for path in module_files(name, package):
            if folder.is_dir():
                h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
