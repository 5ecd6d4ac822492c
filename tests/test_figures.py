"""Figures: the pure data functions on synthetic metrics and predictions, byte-identical
re-rendering, metadata (commit, provenance id) in PNG and SVG; P(True) scoring."""

import json
import math
import re
from types import SimpleNamespace

import polars as pl
import pytest

import make_figures as mf
from eqtools import ptrue
from eqtools.figures import save_figure
from eqtools.provenance import build_record, read_provenance, record_id
from eqtools.study import input_name, mixture_share
from helpers import ROOT, read_png_text, read_svg_identifier

CATS = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


def metrics_line(epoch: int, train: dict, dev: float, test: float | None = None) -> dict:
    """A metrics.jsonl line; `train` maps category -> (n, accuracy)."""
    line = {"epoch": epoch, "train_loss": 1.0 / epoch, "dev_accuracy": dev, "dev_n": 10}
    for cat, (n, acc) in train.items():
        line[f"train_n_{cat}"] = n
        line[f"train_accuracy_{cat}"] = acc
    if test is not None:
        line |= {
            "test_accuracy": test,
            "test_n": 10,
            "ood_test_accuracy": test / 2,
            "ood_test_n": 6,
        }
    return line


# ---------------------------------------------------------------- data functions


def test_fitting_by_epoch_weights_known_categories_by_their_counts():
    lines = [
        metrics_line(
            1, {"HighlyKnown": (1, 1.0), "MaybeKnown": (3, 0.0), "Unknown": (4, 0.0)}, 0.1
        ),
        metrics_line(
            2, {"HighlyKnown": (1, 1.0), "MaybeKnown": (3, 1.0), "Unknown": (4, 0.25)}, 0.2
        ),
    ]
    data = mf.fitting_by_epoch(lines)
    assert data["epoch"].to_list() == [1, 2]
    assert data["train_known"].to_list() == [0.25, 1.0]
    assert data["train_unknown"].to_list() == [0.0, 0.25]
    assert data["dev"].to_list() == [0.1, 0.2]


def test_fitting_by_epoch_empty_group_is_null():
    data = mf.fitting_by_epoch([metrics_line(1, {"Unknown": (4, 0.5)}, 0.0)])
    assert data["train_known"].to_list() == [None]
    assert data["train_unknown"].to_list() == [0.5]


def test_duration_accuracy_uses_predictions_for_stops_and_metrics_for_epochs():
    metrics = [metrics_line(e, {}, 0.0, test=e / 10) for e in (1, 2, 3)]
    acc = mf.duration_accuracy({"early_stop": 0.4, "convergence": 0.3}, metrics, [2, 5], "test")
    assert acc == {"EARLY_STOP": 0.4, "CONVERGENCE": 0.3, "epoch 2": 0.2, "epoch 5": None}
    assert mf.duration_accuracy({}, metrics, [1], "ood_test")["epoch 1"] == 0.05


def test_accuracy_vs_share_drops_missing_points_and_sorts_by_share():
    points = [
        {"share": 50, "variant": "D", "duration": "EARLY_STOP", "split": "test", "accuracy": 0.4},
        {"share": 0, "variant": "D", "duration": "EARLY_STOP", "split": "test", "accuracy": 0.5},
        {"share": 0, "variant": "D", "duration": "epoch 3", "split": "test", "accuracy": None},
    ]
    data = mf.accuracy_vs_share(points)
    assert data["share"].to_list() == [0, 50]
    assert mf.accuracy_vs_share([]).height == 0


def test_category_fitting_lists_only_present_categories():
    lines = {
        "natural": [metrics_line(1, {"HighlyKnown": (2, 1.0), "Unknown": (2, 0.0)}, 0.0)],
        "unknown": [metrics_line(1, {"Unknown": (4, 0.5)}, 0.0)],
    }
    data = mf.category_fitting(lines)
    assert data.select("mixture", "category", "accuracy").rows() == [
        ("natural", "HighlyKnown", 1.0),
        ("natural", "Unknown", 0.0),
        ("unknown", "Unknown", 0.5),
    ]


def test_seeds_fitting_is_the_mean_over_seeds_with_a_band():
    seeds = [
        [metrics_line(1, {"HighlyKnown": (2, 1.0), "Unknown": (2, 0.0)}, 0.1)],
        [metrics_line(1, {"HighlyKnown": (2, 0.5), "Unknown": (2, 0.5)}, 0.3)],
    ]
    data = mf.seeds_fitting(seeds)
    assert data["epoch"].to_list() == [1]
    assert data["train_known"].to_list() == [0.75] and data["train_unknown"].to_list() == [0.25]
    assert data["dev"].to_list() == pytest.approx([0.2])
    assert data["train_known_low"][0] < 0.75 < data["train_known_high"][0]


def test_seeds_category_fitting_bands_each_category():
    runs = [
        {"natural": [metrics_line(1, {"HighlyKnown": (2, 1.0), "Unknown": (2, 0.0)}, 0.0)]},
        {"natural": [metrics_line(1, {"HighlyKnown": (2, 0.5), "Unknown": (2, 0.0)}, 0.0)]},
    ]
    data = mf.seeds_category_fitting(runs)
    assert data.select("category", "accuracy", "n").rows() == [
        ("HighlyKnown", 0.75, 2),
        ("Unknown", 0.0, 2),
    ]
    unknown = data.filter(pl.col("category") == "Unknown")
    assert unknown["accuracy_low"][0] == unknown["accuracy_high"][0] == 0.0


def test_mixture_share():
    assert mixture_share("unknown_50") == ("unknown", 50)
    assert mixture_share("known_only_25") == ("known_only", 25)
    assert mixture_share("natural") is None
    assert mixture_share("unknown_150") is None


def graded_and_ptrue():
    """8 test questions: SliCK calls 4 Unknown (1 answered right after fine-tuning); P(True)
    ranks 2 Unknown and 2 known questions lowest."""
    graded = pl.DataFrame(
        {
            "id": [f"q{i}" for i in range(8)],
            "category": ["Unknown"] * 4
            + ["WeaklyKnown", "MaybeKnown", "HighlyKnown", "HighlyKnown"],
            "correct": [False, False, False, True, False, True, True, True],
        }
    )
    p = pl.DataFrame(
        {"id": [f"q{i}" for i in range(8)], "p_true": [0.1, 0.2, 0.9, 0.8, 0.3, 0.05, 0.6, 0.7]}
    )
    return graded, p


def test_slick_points_and_ptrue_at_equal_share():
    graded, p = graded_and_ptrue()
    slick = mf.slick_unknown_points(graded)
    assert slick.rows() == [("Unknown", 0.5, 4, 0.25), ("Unknown + WeaklyKnown", 0.625, 5, 0.2)]
    # the 4 lowest P(True): q5 (right), q0, q1, q4 -> 1/4
    assert mf.ptrue_at_share(graded, p, 4) == 0.25
    assert mf.ptrue_at_share(graded, p, 1) == 1.0


def test_ptrue_curve_is_cumulative_accuracy_of_the_lowest_scores():
    graded, p = graded_and_ptrue()
    curve = mf.ptrue_unknown_curve(graded, p, n_points=8)
    assert curve["n"].to_list() == list(range(1, 9))
    assert curve["share"].to_list() == [k / 8 for k in range(1, 9)]
    assert curve["accuracy"][0] == 1.0 and curve["accuracy"][-1] == 4 / 8
    assert curve["accuracy"][3] == mf.ptrue_at_share(graded, p, 4)


# ---------------------------------------------------------------- rendering


def write_run(
    base,
    model="m",
    run="lora",
    mixtures=("unknown_0", "unknown_50", "unknown_100", "known_only_50", "natural", "unknown"),
):
    """Synthetic metrics and predictions of a run under base/results; returns the figure rules'
    named inputs, {eqtools.study.input_name(...): path}."""
    paths = {}
    for k, mixture in enumerate(mixtures):
        d = base / f"results/finetune/{model}/{run}/{mixture}"
        d.mkdir(parents=True)
        lines = [
            metrics_line(
                e,
                {"HighlyKnown": (2, min(1.0, e / 3)), "Unknown": (2, e / 6)},
                0.1 * e,
                test=0.1 * e,
            )
            for e in (1, 2, 3)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        paths[input_name("metrics", model, mixture)] = str(d / "metrics.jsonl")
        for stop in ("early_stop", "convergence"):
            for split in ("test", "ood_test"):
                graded, _ = graded_and_ptrue()
                graded = graded.with_columns(
                    pl.col("correct").shift(k + (stop == "convergence"), fill_value=False)
                )
                out = base / f"results/eval/{model}/{run}/{mixture}/{stop}/{split}.parquet"
                out.parent.mkdir(parents=True, exist_ok=True)
                graded.write_parquet(out)
                paths[input_name("eval", model, mixture, stop, split)] = str(out)
    _, p = graded_and_ptrue()
    out = base / f"results/labels/{model}/ptrue_test.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    p.write_parquet(out)
    return paths | {input_name("ptrue", model, "test"): str(out)}


SPECS = {
    "fig1": {"mixture": "unknown_50"},
    "fig3a": {"mixtures": ["unknown_0", "unknown_50", "unknown_100"], "epochs": [2]},
    "fig3b": {"unknown": ["unknown_50"], "known_only": ["known_only_50"]},
    "fig4": {"mixtures": ["natural", "unknown"]},
    "fig5": {"mixture": "natural", "stop": "early_stop"},
    "comparison": {"models": ["m", "m2"], "mixtures": ["unknown_0", "unknown_50", "unknown_100"]},
}


def fake_job(inputs, out_dir, figure, scriptdir):
    spec = {"figure": figure, "title": "m, lora"} | SPECS[figure]
    return SimpleNamespace(
        rule=f"figure_{figure}",
        wildcards={} if figure == "comparison" else {"model": "m", "recipe": "lora", "seed": ""},
        params=SimpleNamespace(spec=json.dumps(spec, sort_keys=True)),
        input=inputs,
        output=SimpleNamespace(
            png=str(out_dir / f"{figure}.png"), svg=str(out_dir / f"{figure}.svg")
        ),
        log=[str(out_dir / f"{figure}.log")],
        scriptdir=scriptdir,
    )


@pytest.mark.parametrize("figure", list(SPECS))
def test_every_figure_renders_byte_identically_with_metadata(tmp_path, monkeypatch, figure):
    monkeypatch.chdir(
        tmp_path
    )  # inputs are recorded relative to the working directory, as in a job
    from pathlib import Path

    from snakemake.iocontainers import InputFiles

    named = write_run(tmp_path) | (
        write_run(tmp_path, model="m2") if figure == "comparison" else {}
    )
    inputs = InputFiles(fromdict={k: str(Path(p).relative_to(tmp_path)) for k, p in named.items()})
    scriptdir = str(Path(mf.__file__).parent)
    outputs = []
    for attempt in ("a", "b"):
        out = tmp_path / "figures" / attempt
        out.mkdir(parents=True)
        job = fake_job(inputs, out, figure, scriptdir)
        mf.main(job)
        outputs.append((Path(job.output.png), Path(job.output.svg)))
    (png_a, svg_a), (png_b, svg_b) = outputs
    assert png_a.read_bytes() == png_b.read_bytes()
    assert svg_a.read_bytes() == svg_b.read_bytes()
    record = read_provenance(png_a)
    assert record["record_id"] == record_id(record)
    assert read_provenance(svg_a) == record
    assert {e["path"] for e in record["inputs"]} == set(inputs)
    text = read_png_text(png_a)
    assert text["Identifier"] == f"prov:{record['record_id']}"
    assert text["Source"].startswith("git:")
    assert read_svg_identifier(svg_a) == f"prov:{record['record_id']}"
    assert "<dc:date>" not in svg_a.read_text()


def test_record_id_ignores_device_and_big_file_mtime(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("x")
    record = build_record("r", {}, {"a": 1}, [str(f)], tmp_path)
    moved = json.loads(json.dumps(record))
    moved["device"] = {"host": "elsewhere", "slurm_job_id": "42"}
    moved["inputs"][0]["mtime"] = 123.0
    assert record_id(moved) == record_id(record)
    moved["config"] = {"a": 2}
    assert record_id(moved) != record_id(record)


def test_save_figure_writes_sidecars_after_the_images(tmp_path):
    from eqtools.figures import plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    record = {
        "rule": "r",
        "wildcards": {},
        "config": None,
        "inputs": [],
        "git": {"commit": "abc", "dirty": False},
    }
    save_figure(fig, {"png": tmp_path / "f.png", "svg": tmp_path / "f.svg"}, record, "t")
    assert read_png_text(tmp_path / "f.png")["Source"] == "git:abc"
    assert read_provenance(tmp_path / "f.png")["record_id"] == record_id(record)
    assert not list(tmp_path.glob(".*part"))


# ---------------------------------------------------------------- P(True)


def test_proposals_all_or_first():
    labels = pl.DataFrame(
        {"id": ["a", "b"], "question": ["qa", "qb"], "greedy_answers": [["x", "y"], [None, "z"]]}
    )
    assert ptrue.proposals(labels, "all")["answer"].to_list() == ["x", "y", "", "z"]
    assert ptrue.proposals(labels, "first")["answer"].to_list() == ["x", ""]
    with pytest.raises(ValueError):
        ptrue.proposals(labels, "best")


def test_combine_and_question_scores():
    assert ptrue.combine([0.75, 0.0], [0.25, 0.0]) == [0.75, 0.5]
    rows = pl.DataFrame({"id": ["a", "a", "b"]})
    out = ptrue.question_scores(rows, [0.2, 0.6, 1.0])
    assert out.rows() == [("a", 0.4, 2), ("b", 1.0, 1)]


def test_prompt_is_the_papers():
    assert ptrue.format_prompt("Q?", "A1") == (
        "Question: Q?\nProposed Answer: A1\nIs the proposed answer:\n"
        "(A) True\n(B) False\nThe proposed answer is:"
    )


@pytest.mark.slow
def test_batched_scores_equal_one_sequence_at_a_time(tiny_model_dir):
    import torch

    from eqtools.models import load

    model, tokenizer, device = load(tiny_model_dir, device="cpu")
    prompts = [
        ptrue.format_prompt(q, a)
        for q, a in (("Who wrote Hamlet?", "Shakespeare"), ("What is the capital of France?", ""))
    ]
    conts = ptrue.TRUE + ptrue.FALSE
    batched = ptrue.continuation_logprobs(model, tokenizer, prompts, conts, device, batch_rows=64)
    for prompt, got_row in zip(prompts, batched, strict=True):
        for cont, got in zip(conts, got_row, strict=True):
            p_ids = tokenizer(prompt, add_special_tokens=True).input_ids
            c_ids = tokenizer(cont, add_special_tokens=False).input_ids
            with torch.inference_mode():
                logp = torch.log_softmax(model(torch.tensor([p_ids + c_ids])).logits[0].float(), -1)
            want = sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids))
            assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4), (prompt, cont)
    rows = pl.DataFrame(
        {
            "id": ["a", "a"],
            "question": ["Who wrote Hamlet?"] * 2,
            "answer": ["Shakespeare", "Shakespeare"],
        }
    )
    scores = ptrue.score_p_true(model, tokenizer, rows, device, batch_rows=3)
    assert scores[0] == scores[1] and 0.0 < scores[0] < 1.0


@pytest.mark.parametrize(
    "caption", sorted((ROOT / "workflow/report").glob("*.rst")), ids=lambda p: p.name
)
def test_report_captions_are_valid_restructuredtext(caption):
    """Captions are rendered with docutils in `snakemake --report`; an error there (e.g. `|D|`
    read as a substitution) shows up as an error box in the report."""
    import docutils.core
    import docutils.utils

    text = re.sub(
        r"\{\{[^}]*\}\}|\{[a-z_]+\}", "X", caption.read_text()
    )  # jinja and wildcard fields
    docutils.core.publish_doctree(
        text,
        settings_overrides={"halt_level": docutils.utils.Reporter.WARNING_LEVEL, "report_level": 5},
    )
