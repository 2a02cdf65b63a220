"""Distribution losses between teacher and student verbalized outputs (paper Table 4d).

The ops and divergences: docs/method.md#ops and docs/method.md#divergences.

All functions take log-probabilities (:func:`log_probs` of logits already cut to the shared
vocabulary ``V``) and return one loss per token. Softmax, log-softmax and the reductions over ``V`` run in float32
whatever the input dtype (bf16 logits lose too much in ``exp``/``log``), or in float64 when the
input is float64 (used by the exactness tests). Logits may be ``-inf`` (masked ids): an id of
probability 0 contributes ``0 log 0 = 0``; logits must not be NaN.

With ``P = softmax(teacher)`` and ``Q = softmax(student)``, per token:

* ``kld`` forward: ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)``
* ``kld`` reverse: ``KL(Q || P) = sum_v Q_v (log Q_v - log P_v)``
* ``kld`` jsd: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024)
  with ``M = beta P + (1 - beta) Q``: ``beta KL(P || M) + (1 - beta) KL(Q || M)``; ``beta = 0``
  is forward KL and ``beta = 1`` reverse KL (the convention of TRL's GKD trainer)
* ``ce``: ``-log Q_{y}``, the autoregressive cross-entropy against the ground-truth next token
  ``y`` of each response position (the teacher plays no part)
* ``l2``: ``sum_v (P_v - Q_v)^2``

:func:`chunked_head_ce` is the verbalization and SFT loss: next-token cross-entropy through a
frozen LM head, with one chunk of ``[chunk, V]`` logits alive at a time (on CUDA the SFT step
uses Liger-Kernel's fused kernel instead when it is installed, :func:`liger_fused_linear_ce`).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = ("kld", "ce", "l2", "none")
DIVERGENCES = ("forward", "reverse", "jsd")
DEFAULT_JSD_BETA = 0.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_probs(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last dim in float32 (float64 for float64 input); same shape."""
    return torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)


def finite_floor(t: Tensor) -> Tensor:
    """Replace ``-inf`` log-probabilities (masked ids) by the dtype's lowest finite value, in place.

    Inner products with probabilities then give ``0 * log 0 = 0`` where both sides mask an id,
    instead of ``0 * -inf = nan``; mass on an id the other side masks still weighs
    ``p * 3.4e38`` (float32), i.e. an overflowing or astronomically large divergence.
    """
    return t.clamp_(min=torch.finfo(t.dtype).min)


def _plogp_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``p (log p - log q)`` elementwise, 0 where ``p = 0`` (``0 log 0 = 0``)."""
    return p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))


def kl_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P || Q)`` per row from log-probabilities ``[n, V]``; returns ``[n]`` (``0 log 0 = 0``)."""
    return _plogp_ratio(log_p.exp(), log_p, log_q).sum(dim=-1)


def label_ce_logprobs(log_q: Tensor, labels: Tensor) -> Tensor:
    """``-log Q(y_n)`` per row from log-probabilities ``[n, V]`` and label ids long ``[n]``; ``[n]``."""
    return -log_q.gather(1, labels.unsqueeze(1)).squeeze(1)


def l2_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_v (P_v - Q_v)^2`` per row from log-probabilities; ``[n]``."""
    return (log_p.exp() - log_q.exp()).square().sum(dim=-1)


def _check_op(op: str, divergence: str, beta: float = DEFAULT_JSD_BETA) -> None:
    if op not in OPS:
        raise ValueError(f"unknown loss op {op!r}; supported: {', '.join(OPS)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; supported: {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")


def kl_direction(divergence: str, beta: float) -> str | None:
    """``forward`` or ``reverse`` when ``divergence`` is (or, for ``jsd`` at ``beta`` 0 or 1,
    reduces to) a plain KL; ``None`` for a proper Jensen-Shannon mixture."""
    if divergence != "jsd":
        return divergence
    return "forward" if beta == 0.0 else "reverse" if beta == 1.0 else None


def jsd_logprobs(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Generalised JSD ``beta KL(P || M) + (1 - beta) KL(Q || M)`` per row, ``M = beta P +
    (1 - beta) Q``, from log-probabilities ``[n, V]`` (``0 < beta < 1``); ``[n]``, differentiable."""
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return (beta * _plogp_ratio(log_p.exp(), log_p, log_m).sum(dim=-1)
            + (1 - beta) * _plogp_ratio(log_q.exp(), log_q, log_m).sum(dim=-1))


def _need_labels(labels: Tensor | None) -> Tensor:
    if labels is None:
        raise ValueError("op 'ce' is the cross-entropy against the ground-truth tokens: pass labels")
    return labels


def pair_loss_logprobs(op: str, t_logp: Tensor | None, s_logp: Tensor, divergence: str = "forward",
                       beta: float = DEFAULT_JSD_BETA, labels: Tensor | None = None) -> Tensor:
    """Per-token loss ``[n]`` of ``op`` between teacher and student log-probabilities ``[n, V]``.

    ``op`` is ``kld`` (forward ``KL(P_t || Q_s)``, reverse ``KL(Q_s || P_t)`` or the JSD of
    ``beta``, by ``divergence``), ``ce`` (``-log Q_s(labels)``, labels long ``[n]``; the teacher
    is not read and may be ``None``) or ``l2``; ``none`` is not a loss and raises.
    """
    _check_op(op, divergence, beta)
    if op == "ce":
        return label_ce_logprobs(s_logp, _need_labels(labels))
    if op == "kld":
        direction = kl_direction(divergence, beta)
        if direction is None:
            return jsd_logprobs(t_logp, s_logp, beta)
        return kl_logprobs(t_logp, s_logp) if direction == "forward" else kl_logprobs(s_logp, t_logp)
    if op == "l2":
        return l2_logprobs(t_logp, s_logp)
    raise ValueError("op 'none' has no loss value; skip the term instead")


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_v a[n, v] * b[n, v]`` -> ``[n]`` without an ``[n, V]`` temporary."""
    return torch.matmul(a.unsqueeze(1), b.unsqueeze(-1)).view(-1)


def pair_loss_and_logit_grad(
    op: str,
    t_logp: Tensor | None,
    s_logp: Tensor,
    s_prob: Tensor,
    scratch: Tensor,
    grad: Tensor | None = None,
    weight: float = 1.0,
    divergence: str = "forward",
    beta: float = DEFAULT_JSD_BETA,
    labels: Tensor | None = None,
) -> Tensor:
    """Per-token loss ``[n]`` of ``op`` and its gradient w.r.t. the student's logits, in closed form.

    Same value as :func:`pair_loss_logprobs` for log-probabilities passed through
    :func:`finite_floor` (masked ids at the lowest finite value, not ``-inf``). When ``grad`` is given, ``weight * dL_n/dz_n`` is
    added to it in place, ``z`` being the student logits (``s_logp = log_softmax(z)``), with
    the softmax Jacobian folded in:

    * ``kld`` forward: ``Q - P`` (uses ``sum_v P_v = 1``);
    * ``ce``: ``Q - onehot(labels)`` (:func:`label_ce_and_logit_grad`; ``t_logp`` is not read);
    * ``kld`` reverse: ``Q * (log Q - log P - L)`` (at the most probable id without cancellation,
      :func:`_add_centered_grad`);
    * ``kld`` jsd: ``(1 - beta) Q * (log Q - log M - KL(Q || M))`` (``dL/dQ = (1 - beta) log(Q / M)``;
      two ``[n, V]`` temporaries besides ``scratch``);
    * ``l2``: ``2 Q * (d - <Q, d>)`` with ``d = Q - P``.

    Args:
        t_logp, s_logp: teacher and student log-probabilities ``[n, V]``.
        s_prob: ``exp(s_logp)`` ``[n, V]``.
        scratch: ``[n, V]`` buffer, overwritten.
        grad: ``[n, V]`` accumulator, or ``None`` for the value only.
        labels: long ``[n]`` ground-truth ids (op ``ce`` only).
    """
    _check_op(op, divergence, beta)
    if op == "none":
        raise ValueError("op 'none' has no loss value; skip the term instead")
    if op == "ce":
        return label_ce_and_logit_grad(s_logp, s_prob, _need_labels(labels), scratch, grad, weight)
    direction = kl_direction(divergence, beta) if op == "kld" else "forward"
    if direction is None:
        return _jsd_and_logit_grad(t_logp, s_logp, s_prob, scratch, grad, weight, beta)
    if direction == "reverse":
        diff = torch.sub(s_logp, t_logp, out=scratch)  # log Q - log P
        loss = row_dot(s_prob, diff)
        if grad is not None:
            _add_centered_grad(grad, s_prob, diff, loss, weight)
        return loss
    p = torch.exp(t_logp, out=scratch)
    if op == "l2":
        d = p.sub_(s_prob).neg_()  # Q - P
        loss = row_dot(d, d)
        if grad is not None:
            grad.add_(d.sub_(row_dot(s_prob, d).unsqueeze(1)).mul_(s_prob), alpha=2 * weight)
        return loss
    loss = row_dot(p, t_logp) - row_dot(p, s_logp)
    if grad is not None:
        grad.add_(s_prob, alpha=weight).sub_(p, alpha=weight)
    return loss


def label_ce_and_logit_grad(s_logp: Tensor, s_prob: Tensor, labels: Tensor, scratch: Tensor,
                            grad: Tensor | None = None, weight: float = 1.0) -> Tensor:
    """``-log Q(y_n)`` per token ``[n]`` and, into ``grad``, ``weight * (Q - onehot(y))``.

    Neither side cancels when the student is confident: with ``r = sum_{u != y} Q_u`` computed
    from the other ids (:func:`tail_log_mass`), the loss is ``log(1 + r / Q_y)`` (a softplus of
    ``log r - log Q_y``) and the gradient at ``y`` is ``-r``, not ``Q_y - 1``. A label the
    student masks (floored log-probability, :func:`finite_floor`) gives a huge finite loss.

    Args:
        s_logp, s_prob: student log-probabilities and probabilities ``[n, V]`` (``s_logp`` floored).
        labels: long ``[n]``, ids below ``V``.
        scratch: ``[n, V]`` buffer, overwritten; grad: ``[n, V]`` accumulator or ``None``.
    """
    ids = labels.unsqueeze(1)
    log_rest, _ = tail_log_mass(s_logp, ids, scratch)
    x = log_rest - s_logp.gather(1, ids).squeeze(1)
    loss = x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))  # softplus without F.softplus's cutoff at x > 20
    if grad is not None:
        rest = log_rest.exp().unsqueeze(1).to(scratch.dtype)
        grad.add_(scratch.copy_(s_prob).scatter_(1, ids, rest.neg_()), alpha=weight)
    return loss


def _jsd_and_logit_grad(t_logp: Tensor, s_logp: Tensor, s_prob: Tensor, scratch: Tensor, grad: Tensor | None,
                        weight: float, beta: float) -> Tensor:
    """:func:`pair_loss_and_logit_grad` for the JSD of ``0 < beta < 1``. Every KL is an inner
    product with a difference of log-probabilities (no cancelling sums); floored log-probs
    (:func:`finite_floor`) give ``0 log 0 = 0`` as in the other divergences."""
    shifted = torch.add(t_logp, math.log(beta))  # [n, V] temporary
    log_m = torch.logaddexp(shifted, torch.add(s_logp, math.log1p(-beta)), out=scratch)
    diff = torch.sub(t_logp, log_m, out=shifted)  # log P - log M
    kl_p = row_dot(torch.exp(t_logp), diff)
    diff = torch.sub(s_logp, log_m, out=shifted)  # log Q - log M
    kl_q = row_dot(s_prob, diff)
    if grad is not None:
        _add_centered_grad(grad, s_prob, diff, kl_q, (1 - beta) * weight)
    return beta * kl_p + (1 - beta) * kl_q


def _add_centered_grad(grad: Tensor, s_prob: Tensor, diff: Tensor, mean: Tensor, alpha: float) -> None:
    """``grad += alpha * Q * (diff - mean)`` ``[n, V]``, ``mean = <Q, diff>`` ``[n]``: the softmax
    Jacobian applied to ``dL/dQ = diff``; ``diff`` is overwritten.

    At a row's most probable id ``a`` the bracket cancels when ``Q_a`` is near 1 (a confident
    student: ``Q_a`` rounds to 1 in float32 and ``diff_a - mean`` to 0); there it is computed as
    ``sum_u Q_u (diff_a - diff_u)``, which has no cancellation (one ``[n, V]`` temporary).
    """
    top = s_prob.argmax(dim=1, keepdim=True)  # [n, 1]
    spread = torch.where(s_prob > 0, diff.gather(1, top) - diff, 0.0)  # [n, V]; 0 where Q masks an id
    at_top = row_dot(s_prob, spread).unsqueeze(1) * s_prob.gather(1, top)  # [n, 1]
    del spread
    diff.sub_(mean.unsqueeze(1)).mul_(s_prob).scatter_(1, top, at_top)
    grad.add_(diff, alpha=alpha)


SPARSE_OPS = ("kld", "ce")  # ops the loss supports with a top-K teacher (forward divergence; ce reads no teacher)


def tail_log_mass(s_logp: Tensor, ids: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """``log q_tail = logsumexp_{u not in ids} log q_u`` per row, and the tail's shape.

    Computed from the ids outside ``ids`` themselves, never as ``log(1 - sum_k q_k)``, which
    cancels once the student puts almost all its mass on ``ids``.

    Args:
        s_logp: student log-probabilities ``[n, V]``; ids: long ``[n, K]``.
        scratch: ``[n, V]`` buffer; on return it holds ``exp(log q_u - m)`` outside ``ids`` and 0
            on them (``m`` the row's largest tail log-probability).

    Returns:
        ``log q_tail`` ``[n]`` (``-inf`` for an empty or fully masked tail) and the row sums
        ``sum_u scratch[n, u]`` ``[n]`` (>= 1, or 0 for an empty tail), so that
        ``scratch / sums`` is the student's distribution within the tail.
    """
    scratch.copy_(s_logp).scatter_(1, ids, float("-inf"))
    m = scratch.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    sums = scratch.sub_(m).exp_().sum(dim=1)
    return sums.log() + m.squeeze(1), sums


def sparse_bucket_kl(t_logp: Tensor, t_tail: Tensor, s_top: Tensor, log_q_tail: Tensor) -> Tensor:
    """The ``K + 1`` bucket KL per row from the student's log-probabilities on the ids
    (``s_top`` ``[..., K]``) and on the tail (``log_q_tail`` ``[...]``); see
    :func:`sparse_pair_loss_and_logit_grad`. One sum of ``p (log p - log q)``: no cancellation of
    two sums of size ``~log V``."""
    return _plogp_ratio(t_logp.exp(), t_logp, s_top).sum(dim=-1) + _plogp_ratio(t_tail, t_tail.log(), log_q_tail)


def sparse_pair_loss_and_logit_grad(
    op: str,
    ids: Tensor,
    t_logp: Tensor,
    t_tail: Tensor,
    s_logp: Tensor,
    s_prob: Tensor,
    scratch: Tensor,
    grad: Tensor | None = None,
    weight: float = 1.0,
) -> Tensor:
    """Per-token ``kld`` ``[n]`` against a top-K teacher, and its gradient w.r.t. the student logits.

    The teacher is known on ``K`` ids per token (``t_logp``) plus the mass of all other ids
    together (``t_tail``); the student is bucketed the same way: its log-probabilities on those
    ids and ``log q_tail``, the log-sum-exp of its log-probabilities outside them
    (:func:`tail_log_mass`). Over these ``K + 1`` buckets,
    ``sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)``, with ``0 log 0 = 0``
    for teacher buckets of probability 0 (masked ids, or log-probabilities stored as ``-inf``).

    Bias: this is the KL of the two bucketed distributions, which by the log-sum inequality is
    at most the full ``KL(P || Q)``; the gap is the disagreement of ``P`` and ``Q`` *within*
    the tail, zero when ``K = V`` (empty tail) or when ``Q`` is proportional to ``P`` there.

    Gradient, exact for the stored buckets whatever their sum ``s = sum_k p_k + p_tail``
    (float16 storage rounds it away from 1): ``s q_u - p_u`` on the ``K`` ids and
    ``s q_u - p_tail q_u / q_tail`` elsewhere; ``q_u / q_tail`` is taken from
    :func:`tail_log_mass`, so nothing cancels when the student is confident.

    Args:
        ids: long ``[n, K]`` (distinct per row); t_logp: ``[n, K]``; t_tail: ``[n]``.
        s_logp, s_prob: student log-probabilities and probabilities ``[n, V]``.
        scratch: ``[n, V]`` buffer, overwritten; grad: ``[n, V]`` accumulator or ``None``.
    """
    if op != "kld":
        raise ValueError(f"the bucketed loss is kld only, not {op!r} (ce reads no teacher: label_ce_and_logit_grad)")
    s_top = s_logp.gather(1, ids)
    log_q_tail, tail_sums = tail_log_mass(s_logp, ids, scratch)
    loss = sparse_bucket_kl(t_logp, t_tail, s_top, log_q_tail)
    if grad is not None:
        p = t_logp.exp()
        total = p.sum(dim=-1) + t_tail
        grad.addcmul_(s_prob, (weight * total).unsqueeze(1))
        in_tail = (t_tail > 0) & (tail_sums > 0)
        tail_coef = torch.where(in_tail, -weight * t_tail / tail_sums.clamp_min(1), torch.zeros_like(t_tail))
        grad.addcmul_(scratch, tail_coef.unsqueeze(1))
        grad.scatter_add_(1, ids, -weight * p)
    return loss


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


def liger_fused_linear_ce() -> type | None:
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA, Triton), or ``None`` when the
    optional ``liger-kernel`` package is not installed. An installed package that fails to
    import raises: no silent fallback."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss
