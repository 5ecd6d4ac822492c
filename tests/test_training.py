"""Fine-tuning: loss masking, early stopping, NaN detection, and kill-and-resume on a tiny model."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from eqtools.training import (
    TrainingError,
    accuracy_by_category,
    best_epoch,
    encode_examples,
    epoch_order,
    finetune,
    grade_together,
)
from helpers import ROOT, load_checkpoint

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RECIPE = {
    "method": "lora",
    "learning_rate": 5e-3,
    "batch_size": 4,
    "dropout": 0.05,
    "epochs": 6,
    "seed": 3,
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "dtype": "float32",
    "eval_dtype": "float32",
    "max_new_tokens": 4,
    "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
}


def frames():
    qs = [f"Who founded company number {i}?" for i in range(10)]
    train = pl.DataFrame(
        {
            "id": [str(i) for i in range(6)],
            "question": qs[:6],
            "answer": [f"Person {i}" for i in range(6)],
            "gold": [f"Person {i}" for i in range(6)],
            "category": ["Unknown", "HighlyKnown"] * 3,
        }
    )
    dev = pl.DataFrame({"question": qs[6:], "gold": ["x"] * 4, "category": ["Unknown"] * 4})
    return train, {"dev": dev, "test": dev}


def test_loss_only_on_the_answer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ((ids, labels),) = encode_examples(tok, ["What is the capital of France?"], ["Paris"])
    answer = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tok.decode(answer) == "Paris\n"
    assert (
        tok.decode(ids[: labels.index(answer[0])])
        == "Answer the following question. What is the capital of France?\n"
    )


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(10, 1, 2) == epoch_order(10, 1, 2)
    assert epoch_order(10, 1, 2) != epoch_order(10, 1, 3)
    assert sorted(epoch_order(10, 1, 2)) == list(range(10))


def test_best_epoch_is_the_earliest_best_dev_accuracy():
    lines = [
        {"epoch": 1, "dev_accuracy": 0.2},
        {"epoch": 2, "dev_accuracy": 0.5},
        {"epoch": 3, "dev_accuracy": 0.5},
        {"epoch": 4, "dev_accuracy": 0.4},
    ]
    assert best_epoch(lines) == 2
    assert best_epoch(lines[:1]) == 1
    assert best_epoch([{"epoch": 1}]) is None


def test_accuracy_by_category():
    frame = pl.DataFrame(
        {"gold": ["Paris", "Rome", "Oslo"], "category": ["HighlyKnown", "Unknown", "Unknown"]}
    )
    graded, summary = accuracy_by_category(frame, ["paris", "Milan", "Oslo."])
    assert graded["correct"].to_list() == [True, False, True]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["accuracy_Unknown"] == 0.5 and summary["n_HighlyKnown"] == 1


def test_bfloat16_recipe_is_mixed_precision_over_float32_weights(tiny_model_dir):
    from transformers import AutoTokenizer

    from eqtools.training import build_model, train_epoch

    model = build_model(
        str(tiny_model_dir), {**RECIPE, "method": "full", "dtype": "bfloat16"}, "cpu"
    )
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, _ = frames()
    examples = encode_examples(tok, train["question"].to_list(), train["answer"].to_list())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    total, tokens, _ = train_epoch(
        model,
        optimizer,
        scheduler,
        examples,
        list(range(6)),
        6,
        2,
        tok.eos_token_id,
        "cpu",
        1,
        "bfloat16",
    )
    assert seen and set(seen) == {torch.bfloat16}  # the matmuls ran in bf16
    assert math.isfinite(total / tokens)
    after = model.model.layers[0].mlp.down_proj.weight
    assert after.dtype == torch.float32
    # an lr-1e-5 step moves float32 weights; bf16 weights would mostly round it away
    assert (after != before).float().mean() > 0.9


def test_a_float32_lora_base_under_bf16_autocast_trains_as_autocast_does(tiny_model_dir):
    """FrozenCast (no bf16 copy of the frozen base kept for the backward) gives autocast's loss
    and adapter gradients, against an untouched model whose linear layers autocast alone casts;
    in float32 and outside autocast the layers compute as before."""
    from transformers import AutoTokenizer

    from eqtools.models import load
    from eqtools.settings import Lora
    from eqtools.training import FrozenCast, add_lora, build_model, collate, token_loss

    recipe = {**RECIPE, "dtype": "bfloat16", "eval_dtype": "float32", "dropout": 0.0}
    torch.manual_seed(0)
    ours = build_model(str(tiny_model_dir), recipe, "cpu")
    torch.manual_seed(0)
    plain = add_lora(load(tiny_model_dir, device="cpu")[0], Lora.coerce(recipe["lora"]), 0.0)
    plain.load_state_dict(ours.state_dict())
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, _ = frames()
    examples = encode_examples(tok, train["question"].to_list(), train["answer"].to_list())
    ids, labels, mask = collate(examples[:4], tok.eos_token_id)
    used = []
    apply = FrozenCast.apply
    FrozenCast.apply = lambda *a: used.append(1) or apply(*a)
    try:
        grads, losses = [], []
        for model in (ours, plain):
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = token_loss(logits, labels, False)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    finally:
        FrozenCast.apply = apply
    assert used  # the frozen layers went through it
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=0, msg=name)
    with torch.no_grad():  # float32, no autocast: the plain layers
        used.clear()
        assert torch.equal(ours(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert not used


def test_nan_loss_stops_with_a_clear_error(tiny_model_dir, tmp_path):
    train, evals = frames()
    recipe = {**RECIPE, "epochs": 2, "learning_rate": float("inf")}  # weights become inf/nan
    out = {k: tmp_path / k for k in ("early_stop", "convergence", "state")} | {
        "metrics": tmp_path / "m.jsonl"
    }
    torch.set_num_threads(1)
    with pytest.raises(TrainingError, match="loss is (nan|inf)"):
        finetune(str(tiny_model_dir), train, evals, recipe, out, eval_every={})


def outputs(root: Path) -> dict:
    out = {k: root / k for k in ("early_stop", "convergence", "state")} | {
        "metrics": root / "metrics.jsonl"
    }
    out["predictions"] = {
        stop: {"test": root / f"eval/{stop}/test.parquet"} for stop in ("early_stop", "convergence")
    }
    return out


@pytest.mark.parametrize("eval_every", [{}, {"test": 4}])
def test_predictions_at_both_stops_equal_an_evaluation_of_the_checkpoints(
    tiny_model_dir, tmp_path, eval_every
):
    # With eval_every 4 of 6 epochs the test set is evaluated at epochs 4 and 6 only, so an early
    # stop at another epoch needs the checkpoint evaluated at the end.
    from eqtools.engine import Generator

    train, evals = frames()
    evals["dev"] = evals["dev"].with_columns(gold=pl.Series(["Person 1", "x", "Person 3", "x"]))
    out = outputs(tmp_path)
    torch.set_num_threads(1)
    lines = finetune(str(tiny_model_dir), train, evals, RECIPE, out, eval_every=eval_every)
    tested = [x["epoch"] for x in lines if "test_accuracy" in x]
    assert tested == ([1, 2, 3, 4, 5, 6] if not eval_every else [4, 6])
    if eval_every:
        assert best_epoch(lines) not in tested  # the end-of-run evaluation of the early stop ran
    for stop in ("early_stop", "convergence"):
        model, tokenizer = load_checkpoint(str(tiny_model_dir), out[stop], "lora")
        generator = Generator(model, tokenizer, max_new_tokens=RECIPE["max_new_tokens"])
        expected, _ = grade_together(generator, {"test": evals["test"]})["test"]
        assert pl.read_parquet(out["predictions"][stop]["test"]).equals(expected), stop


def test_a_lora_checkpoint_lists_its_target_modules_sorted(tiny_model_dir, tmp_path):
    """peft saves `target_modules` in set order, which differs between processes; the checkpoint
    holds them sorted, so that reruns write the same bytes (14 module names here: they would
    come out sorted by chance about once in 10^10 runs)."""
    from eqtools import distributed
    from eqtools.checkpoint import save_checkpoint
    from eqtools.training import build_model

    lora = {"rank": 2, "alpha": 4, "target_modules": "all-linear"}
    model = build_model(str(tiny_model_dir), dict(RECIPE, lora=lora), "cpu")
    save_checkpoint(model, tmp_path / "checkpoint", distributed.ONE_PROCESS)
    saved = json.loads((tmp_path / "checkpoint/adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(saved["target_modules"])
    assert len(saved["target_modules"]) >= 7


def test_grade_together_equals_one_call_per_set(tiny_model_dir):
    from eqtools.engine import Generator
    from eqtools.training import answer_questions

    model, tokenizer = load_checkpoint(str(tiny_model_dir), tiny_model_dir, "full")
    generator = Generator(model, tokenizer, max_new_tokens=4)
    train, evals = frames()
    sets = {"train": train.select("question", "gold", "category")} | evals
    together = grade_together(generator, sets)
    for name, frame in sets.items():
        alone, summary = accuracy_by_category(
            frame, answer_questions(generator, frame["question"].to_list())
        )
        assert together[name][0].equals(alone) and together[name][1] == summary


RUNNER = """
import json, sys
sys.path[:0] = [{scripts!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from test_training import RECIPE, frames
from eqtools.training import finetune
train, evals = frames()
from pathlib import Path
from test_training import outputs
out = outputs(Path({out!r}))
# the exact comparison needs deterministic kernels
torch.use_deterministic_algorithms({device!r} == "cuda")
finetune(
    {model!r}, train, evals, {{**RECIPE, "dtype": {dtype!r}}}, out, eval_every={{}},
    device={device!r},
)
"""


def run(
    model_dir,
    out_dir: Path,
    kill_after_state_epoch: int | None = None,
    device="cpu",
    dtype="float32",
):
    code = RUNNER.format(
        scripts=str(ROOT / "workflow/scripts"),
        tests=str(ROOT / "tests"),
        out=str(out_dir),
        model=str(model_dir),
        device=device,
        dtype=dtype,
    )
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS determinism
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    if kill_after_state_epoch is None:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        return
    state = out_dir / "state" / "epoch" / "trainer.pt"
    deadline = time.time() + 600
    while time.time() < deadline:
        if (
            state.exists()
            and torch.load(state, weights_only=False)["epoch"] >= kill_after_state_epoch
        ):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere in the next epoch
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.e2e  # the same through snakemake: tests/test_e2e_finetune.py
@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", "float32"),
        pytest.param("cuda", "float32", marks=CUDA),
        pytest.param(
            "cuda", "bfloat16", marks=CUDA
        ),  # mixed precision; dropout draws from the CUDA RNG
    ],
)
def test_killed_run_resumes_to_the_same_metrics(tiny_model_dir, tmp_path, device, dtype):
    run(tiny_model_dir, tmp_path / "straight", device=device, dtype=dtype)
    run(tiny_model_dir, tmp_path / "killed", kill_after_state_epoch=2, device=device, dtype=dtype)
    assert not (tmp_path / "killed/convergence").exists()
    done = json.loads((tmp_path / "killed/metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    assert 2 <= done < RECIPE["epochs"]
    run(
        tiny_model_dir, tmp_path / "killed", device=device, dtype=dtype
    )  # the same command again resumes
    straight = (tmp_path / "straight/metrics.jsonl").read_text()
    assert (tmp_path / "killed/metrics.jsonl").read_text() == straight
    assert len(straight.splitlines()) == RECIPE["epochs"]
    from safetensors.torch import load_file

    for stop in ("convergence", "early_stop"):
        a = load_file(next((tmp_path / "straight" / stop).glob("*.safetensors")))
        b = load_file(next((tmp_path / "killed" / stop).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        predictions = f"eval/{stop}/test.parquet"
        assert pl.read_parquet(tmp_path / "killed" / predictions).equals(
            pl.read_parquet(tmp_path / "straight" / predictions)
        )
    # once the run is complete its optimizer state is removed
    assert not (tmp_path / "straight/state/epoch").exists()


def test_a_bf16_lora_recipe_keeps_its_frozen_base_in_bf16_for_a_bf16_evaluation(tiny_model_dir):
    """`dtype` and `eval_dtype` bfloat16: LoRA's frozen base in bf16 (half the memory), its
    adapters in float32 (the trained weights and AdamW state). With a float32 evaluation the base
    stays float32 (the engine computes in the weights' dtype); full fine-tuning keeps float32
    master weights."""
    from eqtools.training import build_model

    def dtypes(recipe, trainable):
        model = build_model(str(tiny_model_dir), recipe, "cpu")
        return {p.dtype for p in model.parameters() if p.requires_grad == trainable}

    bf16 = dict(RECIPE, dtype="bfloat16", eval_dtype="bfloat16")
    assert dtypes(bf16, False) == {torch.bfloat16} and dtypes(bf16, True) == {torch.float32}
    assert dtypes(dict(RECIPE, dtype="bfloat16"), False) == {torch.float32}
    assert dtypes(dict(bf16, method="full"), True) == {torch.float32}


@pytest.mark.parametrize("backend", ["levels", "reference"])
def test_evaluation_caches_the_instruction_and_sorts_waves_without_changing_answers(
    tiny_model_dir, backend
):
    """Evaluation encodes the instruction every question shares once (a cached prefix) and runs
    waves of similar prompt lengths: each question's greedy answer is the one of its whole
    prompt, in a wave of its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eqtools.engine import Generator, Request
    from eqtools.training import answer_questions, format_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    questions = [f"Which country is {name} located in?" for name in ("Lyon", "Kyoto", "Ur")]
    questions += ["What is the capital of " + " and ".join(["the Kingdom of Spain"] * 9) + "?"]
    questions += [f"Who is {name} married to?" for name in ("Ada", "Bo", "Cy", "Di", "Ed")]
    generator = Generator(model, tokenizer, max_new_tokens=5, max_batch_rows=3, backend=backend)
    answers = answer_questions(generator, questions)
    assert (
        len(generator.prefixes[generator.add_prefix("Answer the following question.")].tokens) > 3
    )

    alone = Generator(model, tokenizer, max_new_tokens=5, max_batch_rows=1, backend=backend)
    whole = alone.add_prefix("")
    for question, answer in zip(questions, answers, strict=True):
        request = Request(whole, alone.prompt_tokens(whole, format_prompt(question)))
        [(_, tokens)] = list(alone.generate([request]))
        assert answer == alone.decode(tokens), question


def test_dropping_the_weights_keeps_the_predictions_and_the_configs(tiny_model_dir, tmp_path):
    """`finetune.keep_weights: false` (disk): the checkpoints' weights go once the predictions
    are written; their configs stay, with a note of what was dropped; the bf16 checkpoint of a
    full fine-tune is written in the recipe's dtype."""
    train, evals = frames()
    recipe = {**RECIPE, "epochs": 2, "method": "full", "dtype": "bfloat16"}
    out = outputs(tmp_path)
    torch.set_num_threads(1)
    finetune(str(tiny_model_dir), train, evals, recipe, out, eval_every={}, keep_weights=False)
    for stop in ("early_stop", "convergence"):
        assert not (tmp_path / stop / "model.safetensors").exists()
        assert json.loads((tmp_path / stop / "config.json").read_text())["dtype"] == "bfloat16"
        assert "model.safetensors dropped" in (tmp_path / stop / "WEIGHTS_DROPPED.txt").read_text()
        assert pl.read_parquet(tmp_path / f"eval/{stop}/test.parquet").height == 4
    # nor does the finished state keep them, or the optimizer state
    assert not list((tmp_path / "state").rglob("*.safetensors"))
    assert not (tmp_path / "state/epoch").exists()


def test_without_a_dev_set_the_early_stop_is_the_last_epoch(tiny_model_dir, tmp_path):
    """No dev set, no best epoch: early_stop holds the convergence weights (the same files, hard
    links, not a second write) and the last epoch's predictions."""
    train, evals = frames()
    out = outputs(tmp_path)
    torch.set_num_threads(1)
    finetune(str(tiny_model_dir), train, {"test": evals["test"]}, {**RECIPE, "epochs": 2}, out, {})
    weights = "adapter_model.safetensors"
    early, last = tmp_path / "early_stop" / weights, tmp_path / "convergence" / weights
    assert early.read_bytes() == last.read_bytes() and early.stat().st_ino == last.stat().st_ino
    assert pl.read_parquet(tmp_path / "eval/early_stop/test.parquet").equals(
        pl.read_parquet(tmp_path / "eval/convergence/test.parquet")
    )
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["finished", "last-epoch"]
