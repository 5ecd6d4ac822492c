"""Relative links in the README and docs/ lead to files that exist, and their anchors to
headings there (GitHub's heading slugs)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests/slurm/README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target}: no such heading")
    assert not broken, broken


def test_slug_matches_github():
    assert slug("On a GPU: NVIDIA H100 80GB HBM3 (`--device cuda`)") == (
        "on-a-gpu-nvidia-h100-80gb-hbm3---device-cuda"
    )
    assert slug("The quickstart's wall time") == "the-quickstarts-wall-time"
