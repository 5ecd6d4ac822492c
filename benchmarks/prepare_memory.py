"""Peak host memory of `prepare_model` (eqtools.models.materialise with the engine check, as the
rule runs it) for a local safetensors directory, which is linked, and for the same weights as
`pytorch_model.bin`, which are converted once.

    python benchmarks/prepare_memory.py [--hidden 2048 --layers 16] [--json out.json]

A random-init Llama (default 0.92 B parameters with the embedded model's tokenizer), saved in
bf16 to a temporary directory; each case runs `materialise` in a fresh process with the registry
entry `dtype: bfloat16` and reports its peak RSS (VmHWM), the RSS after the imports, and
the wall time with and without the engine check. One copy of the weights in bf16 is the goal.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow" / "scripts"), str(ROOT / "tests")]


def build(directory: Path, as_bin: Path, hidden: int, layers: int) -> int:
    """The random model as bf16 safetensors in `directory` and as pytorch_model.bin in `as_bin`."""
    import torch
    from conftest import embedded_gguf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_gguf()[0], gguf_file=embedded_gguf()[1])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 512,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    as_bin.mkdir()
    model.config.save_pretrained(as_bin)
    torch.save(model.state_dict(), as_bin / "pytorch_model.bin")
    tokenizer.save_pretrained(as_bin)
    return sum(p.numel() for p in model.parameters())


def high_water_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, it does not
    inherit the peak of the parent this process was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(source: Path, out: Path) -> None:
    """One `materialise` in this process; prints one JSON line."""
    import torch

    from eqtools.engine import check_generation
    from eqtools.models import materialise, stage

    torch.set_num_threads(2)
    after_imports = high_water_gib()
    checked = {}

    def timed_check(*args):
        started = time.perf_counter()
        result = check_generation(*args)
        checked["s"] = time.perf_counter() - started
        return result

    started = time.perf_counter()
    staged = out.with_name(f"{out.name}.source")  # as fetch_model stages it
    stage("bench", {"path": str(source)}, staged)
    entry = materialise("bench", staged, out, "bfloat16", "cpu", check=timed_check)
    wall = time.perf_counter() - started
    print(
        "RESULT "
        + json.dumps(
            {
                "peak_rss_gib": high_water_gib(),
                "rss_after_imports_gib": after_imports,
                "wall_s": wall,
                "without_engine_check_s": wall - checked["s"],
                "logit_check": entry["logit_check"],
                "linked": "linked" in entry,
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--measure", nargs=2, type=Path, help=argparse.SUPPRESS)  # (source, out)
    args = ap.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = build(tmp / "safetensors", tmp / "bin", args.hidden, args.layers)
        weights = sum(f.stat().st_size for f in (tmp / "safetensors").glob("*.safetensors"))
        results = {"parameters": n, "bf16_weights_gib": weights / 2**30}
        print(f"random Llama: {n / 1e9:.2f} B parameters, {weights / 2**30:.2f} GiB in bf16")
        for case in ("safetensors", "bin"):
            command = [
                sys.executable,
                __file__,
                "--measure",
                str(tmp / case),
                str(tmp / f"{case}-out"),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-4000:])
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            results[case] = json.loads(line.removeprefix("RESULT "))
            print(case, results[case])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
