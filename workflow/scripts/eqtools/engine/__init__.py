"""The one generation engine: batched greedy and sampled decoding that stops at the first newline,
for SliCK labelling (few-shot) and evaluation (zero-shot). Backend: transformers (CPU or CUDA).

Two exact paths behind one entry point, `Generator`:

- "levels", the fast path, for models whose every layer is attention that goes through
  transformers' AttentionInterface and writes its cache with `update`:
  - a prompt prefix (the 4-shot exemplars) is encoded once; its KV cache is shared by every row
    that uses it, so only the question is prefilled;
  - requests with the same (prefix, prompt) share one prefill: the 16 samples of a question draw
    their first token from the same logits, and their rows start from the same KV cache;
  - a wave runs many rows at once (across questions and exemplar sets) in one preallocated KV
    buffer: no reallocation per step, and finished or cancelled rows are dropped from the batch.
  KV caches are kept at the level where they are shared, never copied per row: one per prefix,
  one per (prefix, prompt) group, and one per row for its generated tokens. A custom attention
  function (registered with transformers' AttentionInterface) attends over the levels with one
  softmax across them, as a single concatenated cache would, and does what the model's own
  attention does: its scaling, per-layer sliding windows, logit softcapping and attention sinks.
  An attention argument it does not implement makes it refuse, never ignore.
- "reference", for everything else (latent-attention caches, recurrent or convolutional layers,
  ALiBi, custom caches, a model spread over several devices): transformers' own `generate` with
  the model's own cache, in batches of prompts of equal length, so no row is ever padded.

`Generator` picks the path by inspecting the model and checking the fast path on a probe
against the model's own forward (one log line names the path and the reason); `backend` forces
one. The attention implementation is switched only for the duration of the engine's own forward
calls, so training, `generate` and P(True) always see the model's own attention.

Decoding stops at the first newline; the caller can cancel requests whose outcome is settled.
Sampling is reproducible independently of batching and of the path: the noise for a sampled
token comes from a counter-based hash of (request key, step, rank among the top-k tokens), and
the token is the Gumbel-max choice among the top-k logits at the temperature. So a sample's
outcome does not depend on which other rows share its batch, on the wave size, on which
requests were skipped, or on the path.

A model sharded over ranks (FSDP2) is generated with in lockstep (`lockstep`): each rank answers
its share of the requests on the sharded model itself, every forward gathers the layers as
training does, and a rank with nothing left to do steps with placeholder forwards until every
rank is done, as transformers' `generate(synced_gpus=True)` does. `compute_dtype` runs the
forwards under bf16 autocast over fp32 weights.

Modules: `generator` (`Generator`: the model's shapes and stop tokens, prefixes and prompts,
requests in waves, answers; and `check_generation`), `probe` (choosing the path: the static
obstacles and the probe against the model's own forward), `levels` (the fast path: the levels,
their attention, the attention switch, prefill and the decoding wave), `reference` (the second
path: transformers' `generate`), `lockstep` (the ranks of a sharded model kept in step, and
each rank's share of the requests), `sampling` (the counter-based random streams) and `base`
(requests, statistics, errors).
"""

from eqtools.engine.base import EngineError, LevelsUnsupported, Request, Stats
from eqtools.engine.generator import (
    BACKENDS,
    PROBE_PREFIX,
    PROBE_PROMPT,
    Generator,
    check_generation,
)
from eqtools.engine.lockstep import Lockstep, gather_answers, share
from eqtools.engine.sampling import choose_tokens, gumbel_noise, pcg_hash

__all__ = [
    "BACKENDS",
    "PROBE_PREFIX",
    "PROBE_PROMPT",
    "EngineError",
    "Generator",
    "LevelsUnsupported",
    "Lockstep",
    "Request",
    "Stats",
    "check_generation",
    "choose_tokens",
    "gather_answers",
    "gumbel_noise",
    "pcg_hash",
    "share",
]
