"""What a rule script's results depend on in the shared package: its transitive `eqtools`
imports, read from the source (never kept by hand), and their content hash.

Snakemake reruns a script rule when the script file changes, not when a module it imports
changes, so every rule passes `script_code(<its script>)` as a param (workflow/rules/common.smk).
An import counts wherever it is written (module level or inside a function): a lazy import is a
dependency once the function runs, and over-counting only reruns a job, never skips one.

The bookkeeping modules `io` (atomic writes, logging) and `provenance` (the sidecars) are left
out: they change no result, and hashing them would rerun the whole study for a logging tweak.
Each sidecar records the commit of the code that actually wrote it.
"""

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "eqtools"
BOOKKEEPING = frozenset({"io", "provenance"})
ROOT = Path(__file__).resolve().parent


def imported_modules(path: str | Path, package: Path = ROOT) -> set[str]:
    """The eqtools modules `path` imports (`from eqtools import x`, `from eqtools.x import y`,
    `import eqtools.x`), anywhere in the file."""
    st = Path(path).stat()  # the parse is cached per file version: every rule asks again
    modules, names = _parsed_imports(str(path), st.st_mtime_ns, st.st_size)
    # from eqtools import x: x is a module of the package, or a name its __init__ defines
    return set(modules) | {n for n in names if (Path(package) / f"{n}.py").exists()}


@functools.lru_cache(maxsize=1024)
def _parsed_imports(path: str, mtime_ns: int, size: int) -> tuple[frozenset, frozenset]:
    """(modules named as eqtools.<x>, names of `from eqtools import ...`) of one file version."""
    found, names = set(), set()
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=path)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != PACKAGE:
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
            todo += imported_modules(package / f"{name}.py", package)
    return seen


def code_modules(script: str | Path, package: Path = ROOT) -> list[str]:
    """The modules of `reached_modules(script)` that can change a result (all but the
    bookkeeping ones), sorted: what the script's code hash covers."""
    return sorted(reached_modules(script, package) - BOOKKEEPING)


def code_hash(script: str | Path, package: Path = ROOT) -> str:
    """Content hash of the modules of `code_modules(script)` (names and bytes)."""
    h = hashlib.sha256()
    for name in code_modules(script, package):
        h.update(name.encode())
        h.update((package / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]
