"""Distribution losses between teacher and student verbalized outputs (SPEC "Step 2", Table 4d).

All functions take log-probabilities (:func:`log_probs` of logits already cut to the shared
vocabulary ``V``) and return one loss per token. Softmax, log-softmax and the reductions over ``V`` run in float32
whatever the input dtype (bf16 logits lose too much in ``exp``/``log``), or in float64 when the
input is float64 (used by the exactness tests). Logits are assumed finite, as model logits are.

With ``P = softmax(teacher)`` and ``Q = softmax(student)``, per token:

* ``kld`` forward: ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)``
* ``kld`` reverse: ``KL(Q || P) = sum_v Q_v (log Q_v - log P_v)``
* ``ce``: ``-sum_v P_v log Q_v``  (= forward KL + entropy of P)
* ``l2``: ``sum_v (P_v - Q_v)^2``

:func:`chunked_head_ce` is the verbalization loss: next-token cross-entropy through a frozen LM
head, with one chunk of ``[chunk, V]`` logits alive at a time.
"""

from __future__ import annotations

from typing import Callable

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


# Response tokens per block of the chunked head CE (verbalization): 1024 x 151,936 x 4 bytes =
# 622 MB of float32 logits (plus as much for their gradient); large enough that the head matmul
# stays efficient.
CE_CHUNK_TOKENS = 1024


class _ChunkedHeadCE(torch.autograd.Function):
    """Summed CE of ``head(y)``; its gradient w.r.t. ``y`` is computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, y: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor],  # type: ignore[override]
                chunk_size: int) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(y) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=y.device)
        for a in range(0, y.shape[0], chunk_size):
            b = min(a + chunk_size, y.shape[0])
            with torch.enable_grad():  # Function.forward runs without grad; this chunk needs one
                yc = y[a:b].detach().requires_grad_(need_grad)
                ce = F.cross_entropy(head(yc).float(), targets[a:b], reduction="sum")
                if need_grad:
                    grad[a:b] = torch.autograd.grad(ce, yc)[0]
            total += ce.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def chunked_head_ce(
    y: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor], chunk_size: int = CE_CHUNK_TOKENS
) -> Tensor:
    """``sum_n CE(head(y[n]), targets[n])`` with only one chunk's ``[chunk, V]`` logits alive.

    Args:
        y: ``[N, d]`` inputs of the head (the verbalizer outputs); may require grad.
        targets: ``[N]`` token ids.
        head: frozen ``[n, d] -> [n, V]`` (final norm + LM head); no gradient reaches its
            parameters.
        chunk_size: tokens per block.

    Returns:
        float32 scalar, differentiable w.r.t. ``y`` (the gradient was computed in the forward).
    """
    if y.shape[0] != targets.shape[0]:
        raise ValueError(f"{y.shape[0]} inputs but {targets.shape[0]} targets")
    return _ChunkedHeadCE.apply(y, targets, head, chunk_size)
