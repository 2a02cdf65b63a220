"""Distribution losses between teacher and student verbalized outputs (SPEC "Step 2", Table 4d).

All functions take logits (or log-probabilities) already cut to the shared vocabulary ``V`` and
return one loss per token. Softmax, log-softmax and the reductions over ``V`` run in float32
whatever the input dtype (bf16 logits lose too much in ``exp``/``log``), or in float64 when the
input is float64 (used by the exactness tests). Logits are assumed finite, as model logits are.

With ``P = softmax(teacher)`` and ``Q = softmax(student)``, per token:

* ``kld`` forward: ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)``
* ``kld`` reverse: ``KL(Q || P) = sum_v Q_v (log Q_v - log P_v)``
* ``ce``: ``-sum_v P_v log Q_v``  (= forward KL + entropy of P)
* ``l2``: ``sum_v (P_v - Q_v)^2``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = ("kld", "ce", "l2", "none")
DIVERGENCES = ("forward", "reverse")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_probs(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last dim in float32 (float64 for float64 input); same shape."""
    return torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)


def kl_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P || Q)`` per row from log-probabilities ``[n, V]``; returns ``[n]``."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def ce_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Soft cross-entropy ``-sum_v P_v log Q_v`` per row from log-probabilities; ``[n]``."""
    return -(log_p.exp() * log_q).sum(dim=-1)


def l2_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_v (P_v - Q_v)^2`` per row from log-probabilities; ``[n]``."""
    return (log_p.exp() - log_q.exp()).square().sum(dim=-1)


def _check_op(op: str, divergence: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown loss op {op!r}; supported: {', '.join(OPS)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; supported: {', '.join(DIVERGENCES)}")


def pair_loss_logprobs(op: str, t_logp: Tensor, s_logp: Tensor, divergence: str = "forward") -> Tensor:
    """Per-token loss ``[n]`` of ``op`` between teacher and student log-probabilities ``[n, V]``.

    ``op`` is ``kld`` (forward ``KL(P_t || Q_s)`` or reverse ``KL(Q_s || P_t)``), ``ce`` or ``l2``;
    ``none`` is not a loss and raises.
    """
    _check_op(op, divergence)
    if op == "kld":
        return kl_logprobs(t_logp, s_logp) if divergence == "forward" else kl_logprobs(s_logp, t_logp)
    if op == "ce":
        return ce_logprobs(t_logp, s_logp)
    if op == "l2":
        return l2_logprobs(t_logp, s_logp)
    raise ValueError("op 'none' has no loss value; skip the term instead")


def kl_forward(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """``KL(P_t || Q_s)`` per token. Logits ``[n, V]`` (any dtype) -> float32 ``[n]``."""
    return kl_logprobs(log_probs(t_logits), log_probs(s_logits))


def kl_reverse(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """``KL(Q_s || P_t)`` per token. Logits ``[n, V]`` -> float32 ``[n]``."""
    return kl_logprobs(log_probs(s_logits), log_probs(t_logits))


def soft_ce(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """``-sum_v P_t log Q_s`` per token. Logits ``[n, V]`` -> float32 ``[n]``."""
    return ce_logprobs(log_probs(t_logits), log_probs(s_logits))


def l2_prob(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """``sum_v (P_t - Q_s)^2`` per token. Logits ``[n, V]`` -> float32 ``[n]``."""
    return l2_logprobs(log_probs(t_logits), log_probs(s_logits))


def pair_loss(op: str, t_logits: Tensor, s_logits: Tensor, divergence: str = "forward") -> Tensor:
    """Per-token loss ``[n]`` of ``op`` in ``{"kld", "ce", "l2"}`` from logits ``[n, V]``.

    ``divergence`` picks forward or reverse KL for ``op="kld"`` and is ignored otherwise.
    """
    _check_op(op, divergence)
    return pair_loss_logprobs(op, log_probs(t_logits), log_probs(s_logits), divergence)


def masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_token`` over ``mask`` (same shape, ``[B, T]`` or ``[n]``); float32 scalar.

    An empty mask gives exactly 0.0, not NaN, and the result stays connected to the graph of
    ``per_token`` (masked positions get zero gradient, even when they hold inf or NaN).
    """
    if mask.shape != per_token.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(per_token.shape)}")
    values = per_token.to(compute_dtype(per_token.dtype))
    mask = mask.to(torch.bool)
    total = values.masked_fill(~mask, 0.0).sum()
    # clamp instead of a Python branch: no host sync, and 0 / 1 = 0 for an empty mask
    return total / mask.sum().clamp(min=1).to(values.dtype)


def next_token_ce(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy over supervised positions; float32 scalar.

    Args:
        logits: ``[B, T, V]``; position ``t`` predicts token ``t + 1``.
        labels: ``[B, T]`` token ids, ``ignore_index`` where unsupervised.

    Returns:
        ``mean over {t : labels[:, t + 1] != ignore_index} of -log softmax(logits[:, t])[labels[:, t + 1]]``;
        0.0 (graph-connected) when no position is supervised. Only supervised rows are cast to
        float32, so the float32 copy is ``[response tokens, V]``, not ``[B, T, V]``.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    shifted_logits = logits[:, :-1]
    shifted_labels = labels[:, 1:]
    keep = shifted_labels != ignore_index
    rows = shifted_logits[keep].to(compute_dtype(logits.dtype))
    total = F.cross_entropy(rows, shifted_labels[keep], reduction="sum")
    return total / keep.sum().clamp(min=1).to(total.dtype)
