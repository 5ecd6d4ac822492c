"""Pairing sbatch calls with SLURM job ids by log path (slurm_output.py), on made-up
`snakemake --verbose` output: no cluster needed, runs in `make test`."""

import pytest
from slurm_output import pair_submissions, sbatch_output

LOGS = "/tmp/w/logs/slurm"


def call(rule, wildcards, extra, output=None):
    output = output or f"{LOGS}/rule_{rule}/{wildcards}/%j.log"
    return (
        f"sbatch call: sbatch --parsable --job-name 5d39 --output {output} --export=ALL "
        f"--comment rule_{rule}_wildcards_{wildcards}  -A my_account  -p gpu -t 60 --mem 2000 "
        f'{extra} --wrap="/v/bin/python -m snakemake --target-jobs \\"{rule}:x=1\\" --cores 1"'
    )


def submitted(job, jobid, rule, wildcards):
    log = f"{LOGS}/rule_{rule}/{wildcards}/{jobid}.log"
    return f"Job {job} has been submitted with SLURM jobid {jobid} (log: {log})."


def cmd(line):
    """The sbatch command line of a made-up 'sbatch call: ...' line."""
    return line.removeprefix("sbatch call: ")


LORA = call("finetune", "tiny_lora_natural", "--cpus-per-task=1 --gpus=1")
DDP = call("finetune", "tiny_lora_ddp_natural", "--cpus-per-task=2 --gpus=2")


def test_submission_lines_in_the_other_order_than_the_calls():
    # The failure seen under load: both calls, then the 2-GPU job's line first.
    output = "\n".join(
        [
            "rule finetune:",
            LORA,
            DDP,
            submitted(7, 21, "finetune", "tiny_lora_ddp_natural"),
            submitted(6, 22, "finetune", "tiny_lora_natural"),
        ]
    )
    jobs = pair_submissions(output)
    assert jobs == {"finetune": [("22", cmd(LORA)), ("21", cmd(DDP))]}
    assert "--gpus=2" in dict(jobs["finetune"])["21"]


def test_same_order_and_other_rules():
    split = call("prepare_splits", "P17", "--ntasks=1").replace("-p gpu", "-p cpu")
    output = "\n".join(
        [
            LORA,
            submitted(6, 22, "finetune", "tiny_lora_natural"),
            split,
            DDP,
            submitted(3, 24, "prepare_splits", "P17"),
            submitted(7, 23, "finetune", "tiny_lora_ddp_natural"),
        ]
    )
    jobs = pair_submissions(output)
    assert [j for j, _ in jobs["finetune"]] == ["22", "23"]
    assert jobs["prepare_splits"] == [("24", cmd(split))]


def test_a_retry_comes_after_its_failed_attempt():
    retry = LORA.replace("--mem 2000", "--mem 4000")
    output = "\n".join(
        [
            LORA,
            submitted(6, 5, "finetune", "tiny_lora_natural"),
            "Error in rule finetune: ...",
            retry,
            submitted(6, 9, "finetune", "tiny_lora_natural"),
        ]
    )
    assert pair_submissions(output) == {"finetune": [("5", cmd(LORA)), ("9", cmd(retry))]}


def test_rule_without_wildcards_and_quoted_output():
    # No wildcards: <logdir>/rule_<rule>/%j.log; a path with a space is shell-quoted.
    output = "/tmp/my w/logs/slurm/rule_count_words/%j.log"
    line = call("count_words", "", "--ntasks=1", output=f"'{output}'")
    assert sbatch_output(cmd(line)) == output
    log = output.replace("%j", "3")
    done = f"Job 3 has been submitted with SLURM jobid 3 (log: {log})."
    assert pair_submissions(f"{line}\n{done}") == {"count_words": [("3", cmd(line))]}


def test_a_submission_line_without_its_call_fails():
    output = "\n".join([LORA, submitted(7, 21, "finetune", "tiny_lora_ddp_natural")])
    with pytest.raises(ValueError, match=r"line 2: 0 sbatch calls .* SLURM job 21"):
        pair_submissions(output)


def test_a_call_without_its_submission_line_fails():
    output = "\n".join([LORA, DDP, submitted(6, 22, "finetune", "tiny_lora_natural")])
    with pytest.raises(ValueError, match=r"no submission line \(lines 2\).*tiny_lora_ddp_natural"):
        pair_submissions(output)


def test_two_calls_waiting_on_one_log_path_fail():
    with pytest.raises(ValueError, match=r"line 2: a second sbatch call .* cannot be told apart"):
        pair_submissions(f"{LORA}\n{LORA}")


def test_an_unexpected_submission_line_fails():
    with pytest.raises(ValueError, match="unexpected submission line"):
        pair_submissions(f"{LORA}\nJob 6 has been submitted with SLURM jobid 22.")


def test_a_call_without_output_fails():
    with pytest.raises(ValueError, match="no single --output"):
        pair_submissions("sbatch call: sbatch --parsable -p cpu --wrap=true")
