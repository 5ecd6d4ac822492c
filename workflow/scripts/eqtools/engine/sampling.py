"""Counter-based random streams: the token a sampled row takes is the Gumbel-max choice among
the top-k logits at the temperature, with noise hashed from (request key, step, rank among the
top-k), so a sample does not depend on its batch, its wave or the path that decodes it."""

import torch

_M32 = 0xFFFFFFFF


def pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG-RXS-M-XS 32-bit hash (Jarzynski & Olano 2020) of int64 tensors holding uint32 values."""
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return ((word >> 22) ^ word) & _M32


def gumbel_noise(keys: torch.Tensor, step: int, k: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, k], a pure function of (key, step, rank)."""
    base = pcg_hash((keys ^ int(pcg_hash(torch.tensor(step + 1)))) & _M32)
    ranks = torch.arange(k, device=keys.device)
    bits = pcg_hash((base[:, None] + ranks[None, :] * 0x9E3779B9) & _M32)
    u = (bits.double() + 0.5) / 4294967296.0
    return -torch.log(-torch.log(u))


def choose_tokens(
    logits: torch.Tensor,
    keys: torch.Tensor,
    sample: torch.Tensor,
    step: int,
    temperature: float,
    top_k: int,
) -> torch.Tensor:
    """Greedy (argmax) for rows with sample=False; top-k sampling at `temperature` for the rest."""
    greedy = logits.argmax(dim=-1)
    if not bool(sample.any()):
        return greedy
    k = min(top_k, logits.shape[-1])
    values, indices = logits[sample].float().topk(k, dim=-1)
    scores = values.double() / temperature + gumbel_noise(keys[sample], step, k)
    sampled = indices.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
    out = greedy.clone()
    out[sample] = sampled
    return out
