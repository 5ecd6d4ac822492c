"""Pair the sbatch calls in `snakemake --verbose` output (slurm executor plugin 2.8.0) with the
SLURM job ids they got. Pure: tested in test_slurm_output.py without a cluster.

Both lines of one submission name the job's SLURM log file (plugin `run_job`):

    sbatch call: sbatch ... --output <logdir>/rule_<rule>/<wildcards>/%j.log ... --wrap="..."
    Job <n> has been submitted with SLURM jobid <id> (log: <same directory>/<id>.log).

(`<wildcards>` is the job's wildcard values joined by `_`, absent with its `/` for a rule without
wildcards; `<logdir>` is absolute; `--output` is shell-quoted.) A submission line belongs to the
sbatch call whose `--output`, with `%j` replaced by the job id, is its log path. Submissions run
in threads, so two jobs' calls may be printed in one order and their submission lines in the
other. Calls share a `--output` when they are attempts of one job (same rule and wildcards), and
a retry is only submitted after the previous attempt was submitted and failed, so at most one
call per `--output` awaits its job id. Anything else (a submission line that matches no waiting
call, two calls waiting on one `--output`, as two jobs whose wildcard values join to the same
string would give, a call that never got a job id) raises ValueError: nothing is paired by order.
"""

import re
import shlex

SBATCH_CALL = re.compile(r"^sbatch call: (sbatch .*)$")
SUBMITTED_MARK = "has been submitted with SLURM jobid"
SUBMITTED = re.compile(r"^Job \S+ has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$")
# <logdir>/rule_<rule>[/<wildcards>]/%j.log
RULE_LOG = re.compile(r"/rule_(\w+)/(?:[^/]+/)?%j\.log$")


def sbatch_output(call):
    """The `--output` of an sbatch command line, unquoted as the shell does (the plugin runs
    the call with shell=True)."""
    try:
        args = shlex.split(call)
    except ValueError as err:
        raise ValueError(f"cannot split the sbatch call ({err}): {call}") from None
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--output"]
    values += [arg.removeprefix("--output=") for arg in args if arg.startswith("--output=")]
    if len(values) != 1 or "%j" not in values[0]:
        raise ValueError(f"no single --output with %j in the sbatch call: {call}")
    return values[0]


def pair_submissions(output):
    """{rule: [(slurm job id, sbatch call), ...]}, each rule's jobs in the order of their sbatch
    calls (so a retry comes after its failed attempt). Raises ValueError, saying which line,
    where a call and a submission line cannot be paired by their log path."""
    waiting = {}  # --output template -> (position, call) of a call still without a job id
    paired = []  # (position of the call, rule, job id, call)
    for number, line in enumerate(output.splitlines(), 1):
        if match := SBATCH_CALL.match(line):
            call = match.group(1)
            template = sbatch_output(call)
            if template in waiting:
                raise ValueError(
                    f"line {number}: a second sbatch call with --output {template} before the "
                    f"first one (line {waiting[template][0]}) was submitted: their job ids "
                    "cannot be told apart"
                )
            waiting[template] = (number, call)
        elif SUBMITTED_MARK in line:
            if not (match := SUBMITTED.match(line)):
                raise ValueError(f"line {number}: unexpected submission line: {line}")
            jobid, log = match.groups()
            found = [t for t in waiting if t.replace("%j", jobid) == log]
            if len(found) != 1:
                raise ValueError(
                    f"line {number}: {len(found)} sbatch calls waiting for a job id have an "
                    f"--output that gives the log {log} of SLURM job {jobid} (waiting: "
                    f"{sorted(waiting) or 'none'})"
                )
            position, call = waiting.pop(found[0])
            if not (rule := RULE_LOG.search(found[0])):
                raise ValueError(f"line {position}: no rule_<rule>/ in --output {found[0]}")
            paired.append((position, rule.group(1), jobid, call))
    if waiting:
        lines = ", ".join(str(position) for position, _ in waiting.values())
        raise ValueError(f"sbatch calls with no submission line (lines {lines}): {list(waiting)}")
    jobs = {}
    for _, rule, jobid, call in sorted(paired):
        jobs.setdefault(rule, []).append((jobid, call))
    return jobs
