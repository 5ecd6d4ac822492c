"""Plotting helpers: reading the per-epoch metrics and test predictions, one matplotlib style, and
saving a figure as PNG and SVG whose bytes depend only on the data, the code and the commit.

A figure carries in its metadata the git commit and the id of its provenance record
(`provenance.record_id`), so a PNG found on its own can be matched to its `.prov.json` sidecar.
Nothing time-dependent is embedded: re-rendering the same inputs at the same commit gives
identical bytes.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from eqtools.analysis import read_metrics  # noqa: E402, F401 (re-exported for the figure scripts)
from eqtools.io import atomic_path  # noqa: E402
from eqtools.provenance import record_id, write_record  # noqa: E402
from eqtools.study import KNOWN  # noqa: E402

STYLE = {
    "svg.hashsalt": "slick-figures",  # fixed ids in the SVG instead of random ones
    "svg.fonttype": "path",  # glyphs as paths: the SVG looks the same without the fonts
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "standard",
}
CATEGORY_COLORS = {
    "HighlyKnown": "#1b7837",
    "MaybeKnown": "#7fbf7b",
    "WeaklyKnown": "#f1a340",
    "Unknown": "#b2182b",
}


def use_style() -> None:
    plt.rcParams.update(STYLE)


def group_accuracy(line: dict, split: str, categories) -> float | None:
    """Accuracy of `split` on the examples of `categories` at one epoch: the count-weighted mean
    of the per-category accuracies; None when the group is empty or was not evaluated."""
    correct = n = 0.0
    for cat in categories:
        k = line.get(f"{split}_n_{cat}") or 0
        acc = line.get(f"{split}_accuracy_{cat}")
        if k and acc is not None:
            correct += acc * k
            n += k
    return correct / n if n else None


def known_accuracy(line: dict, split: str) -> float | None:
    return group_accuracy(line, split, KNOWN)


def eval_accuracy(path: str | Path) -> float | None:
    """Share of correct predictions in an evaluation parquet (results/eval/...)."""
    frame = pl.read_parquet(path, columns=["correct"])
    return float(frame["correct"].mean()) if frame.height else None


def figure_metadata(record: dict, title: str) -> dict[str, dict]:
    """PNG and SVG metadata: title, git commit and provenance id; no date."""
    git = record.get("git") or {}
    commit = git.get("commit") or "unknown"
    source = f"git:{commit}{'-dirty' if git.get('dirty') else ''}"
    ident = f"prov:{record_id(record)}"
    return {
        "png": {"Title": title, "Source": source, "Identifier": ident},
        "svg": {"Title": title, "Source": source, "Identifier": ident, "Date": None},
    }


def save_figure(fig, outputs: dict[str, str | Path], record: dict, title: str) -> None:
    """Save `fig` as each of `outputs` (format -> path; png and/or svg) with the record's id in
    the metadata, then write the record as every output's sidecar."""
    meta = figure_metadata(record, title)
    for fmt, path in outputs.items():
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=meta[fmt])
    plt.close(fig)
    write_record(record, list(outputs.values()))
