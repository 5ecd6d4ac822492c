"""Lineage of a result file: walk its `.prov.json` sidecar and those of its inputs, recursively,
back to the dataset archive, and check that every input is still what was recorded.

    python workflow/scripts/audit.py results/figures/<model>/<run>/fig1_fitting_known_unknown.png
    make audit FIGURE=results/figures/...

Prints the lineage as a tree (each node: path, the rule that made it, its check) and exits
non-zero when a recorded input is missing or changed (sha256; size and mtime for files over
100 MB; per file for directories; by sha256 for the source files a materialised model links,
wherever they moved), when a sidecar is missing, or when a figure's embedded provenance id does
not match its sidecar.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eqtools.io import sha256_file  # noqa: E402
from eqtools.models import SOURCE_FILE  # noqa: E402
from eqtools.provenance import SUFFIX, record_id, sidecar_path  # noqa: E402


def check_entry(entry: dict, base: Path) -> list[str]:
    """Problems of one recorded input against the file system now (empty: unchanged)."""
    path = base / entry["path"]
    if "files" in entry:
        if not path.is_dir():
            return [f"{entry['path']}: directory missing"]
        problems = []
        recorded = {f["path"] for f in entry["files"]}
        for f in entry["files"]:
            problems += check_entry(f, base)
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.endswith(SUFFIX)]
        current = {
            str(p if Path(entry["path"]).is_absolute() else p.relative_to(base)) for p in files
        }
        problems += [f"{p}: not in the recorded directory" for p in sorted(current - recorded)]
        return problems + linked_problems(path)
    if not path.is_file():
        return [f"{entry['path']}: missing"]
    if entry.get("sha256") is None:
        st = path.stat()
        if st.st_size != entry.get("size") or st.st_mtime != entry.get("mtime"):
            return [
                f"{entry['path']}: size/mtime changed (recorded {entry.get('size')} bytes, mtime "
                f"{entry.get('mtime')})"
            ]
        return []
    if sha256_file(path) != entry["sha256"]:
        return [f"{entry['path']}: sha256 changed (recorded {entry['sha256'][:12]}…)"]
    return []


def linked_problems(model_dir: Path) -> list[str]:
    """Problems of the source files a materialised model directory links (its registry entry
    records their sha256): a linked file must not change after prepare_model. Each is checked
    where the directory's link leads now, so a source directory that moved (and was staged
    again by fetch_model) is no problem."""
    entry = model_dir / SOURCE_FILE
    if not entry.is_file():
        return []
    return [
        f"{problem} (linked by {model_dir})"
        for linked in json.loads(entry.read_text()).get("linked", [])
        for problem in check_entry(
            linked | {"path": str((model_dir / Path(linked["path"]).name).resolve())}, model_dir
        )
    ]


def embedded_id(path: Path) -> str | None:
    """The provenance id a figure carries in its metadata (PNG tEXt or SVG dc:identifier)."""
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as img:
            ident = img.text.get("Identifier")
    elif path.suffix == ".svg":
        import re

        m = re.search(r"<dc:identifier>([^<]*)</dc:identifier>", path.read_text())
        ident = m.group(1) if m else None
    else:
        return None
    return ident.removeprefix("prov:") if ident else None


def describe(record: dict) -> str:
    git = record.get("git") or {}
    commit = (git.get("commit") or "?")[:10] + ("-dirty" if git.get("dirty") else "")
    return (
        f"rule {record.get('rule')}, commit {commit}, id "
        f"{record.get('record_id') or record_id(record)}"
    )


class Audit:
    def __init__(self, base: Path):
        self.base = base
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.seen: set[str] = set()
        self.roots: set[str] = set()
        self.checked: dict[str, list[str]] = {}  # an input met again is not hashed again

    def check(self, entry: dict) -> list[str]:
        key = json.dumps(entry, sort_keys=True)
        if key not in self.checked:
            self.checked[key] = check_entry(entry, self.base)
        return self.checked[key]

    def fail(self, problem: str) -> str:
        self.problems.append(problem)
        return f"PROBLEM: {problem}"

    def load(self, sidecar: str) -> dict | None:
        try:
            return json.loads((self.base / sidecar).read_text())
        except (OSError, json.JSONDecodeError) as e:
            self.fail(
                f"{sidecar}: "
                + (
                    "sidecar missing"
                    if isinstance(e, FileNotFoundError)
                    else f"unreadable sidecar ({e.__class__.__name__})"
                )
            )
            return None

    def target(self, path: str) -> None:
        p = self.base / path
        sidecar = str(sidecar_path(path))
        if not p.exists():
            self.lines.append(f"{path}  {self.fail(f'{path}: missing')}")
            return
        if not (self.base / sidecar).is_file():
            self.lines.append(f"{path}  {self.fail(f'{path}: no sidecar {sidecar}')}")
            return
        record = self.load(sidecar)
        if record is None:
            return
        notes = [describe(record)]
        ident = embedded_id(p)
        if ident is not None:
            expected = record_id(record)
            notes.append(
                "embedded id matches"
                if ident == expected
                else self.fail(f"{path}: embedded provenance id {ident} != sidecar's {expected}")
            )
        self.lines.append(f"{path}  [{'; '.join(notes)}]")
        self.seen.add(sidecar)
        self.children(record, "")

    def children(self, record: dict, prefix: str) -> None:
        inputs = record.get("inputs") or []
        if not inputs:
            self.roots.add(record.get("rule") or "?")
        for i, entry in enumerate(inputs):
            last = i == len(inputs) - 1
            branch, indent = ("└── ", "    ") if last else ("├── ", "│   ")
            problems = self.check(entry)
            status = "ok" if not problems else "; ".join(self.fail(p) for p in problems)
            if "files" in entry:
                status += f" ({len(entry['files'])} files)"
            sidecar = entry.get("provenance")
            if sidecar is None:
                self.lines.append(
                    f"{prefix}{branch}{entry['path']}  {status}  "
                    f"{self.fail(entry['path'] + ': no sidecar recorded')}"
                )
                continue
            if sidecar in self.seen:
                self.lines.append(
                    f"{prefix}{branch}{entry['path']}  {status}  (lineage shown above)"
                )
                continue
            self.seen.add(sidecar)
            upstream = self.load(sidecar)
            if upstream is None:
                self.lines.append(f"{prefix}{branch}{entry['path']}  {status}")
                continue
            self.lines.append(f"{prefix}{branch}{entry['path']}  {status}  [{describe(upstream)}]")
            self.children(upstream, prefix + indent)


def audit(path: str, base: str | Path = ".") -> Audit:
    result = Audit(Path(base))
    result.target(path)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "path", help="a result file with a .prov.json sidecar (a figure, table, ...)"
    )
    parser.add_argument(
        "--directory", default=".", help="the workflow's working directory (default: .)"
    )
    args = parser.parse_args(argv)
    result = audit(args.path, args.directory)
    print("\n".join(result.lines))
    print()
    print(
        f"{len(result.seen)} sidecars read; lineage roots: "
        f"{', '.join(sorted(result.roots)) or 'none'}"
    )
    if result.problems:
        print(f"{len(result.problems)} problem(s):")
        for p in result.problems:
            print(f"  - {p}")
        return 1
    print("every recorded input is unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
