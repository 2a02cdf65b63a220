"""Interaction loss with bounded memory (docs/method.md#interaction, docs/method.md#chunked-loss).

``loss = sum_{i,j} W[i, j] * OP(P_j, Q_i) + LAST(P_last, Q_last)``, every term a mean over the
``N`` response tokens, where ``Q_i`` is the student's verbalized distribution at target layer
``i``, ``P_j`` the teacher's at target layer ``j``, ``W`` the matching of
:func:`vlsi.method.matching.select_pairs` computed from ``KLD[i, j]``, and ``*_last`` the models' own
output distributions. The op ``ce`` is ``-log Q_i(y_n)`` against the ground-truth next token
``y_n`` (``labels``): the teacher layer ``j`` then only decides that the pair counts, and its
distribution is not computed in the gradient pass.

Materialising ``[N, V]`` float32 log-probabilities for all ``t_s + t_l`` layers costs tens of GB at
``V = 151,936`` (:func:`naive_interaction_loss` does exactly that and is the test reference).
:func:`interaction_loss` instead walks over chunks of ``chunk_size`` response tokens twice:

1. scoring pass (``no_grad``): per chunk, the student log-probs of the scored layers are cached
   once (``[t_s, chunk, V]``) and teacher layers are taken :data:`TEACHER_GROUP` at a time, so
   the working set is about ``(t_s + 4) * chunk * V`` floats (the group, the verbalizer's logits
   and one temporary). Only the entries of :func:`vlsi.method.matching.needed_mask` are kept.
   ``KL(P || Q_i) = sum P log P - P . log Q_i`` turns the scores of all cached student layers
   against a group of teacher layers into one batched matmul ``[c, t_s, V] x [c, V, g]``
   instead of a ``[chunk, V]`` temporary per pair.
2. selection of ``W`` on the ``[t_s, t_l]`` matrix.
3. gradient pass: only student layers with a selected pair plus the last layer, recomputing the
   student (with grad) and the teacher (without) chunk by chunk. The gradient with respect to
   the student logits has a closed form (:func:`vlsi.method.losses.pair_loss_and_logit_grad`, e.g.
   ``Q - P`` for forward KL), summed over the layer's pairs into one ``[chunk, V]`` buffer and
   taken back through the verbalizer in one backward. Each chunk's gradient with respect to its
   slice of ``student_hidden`` is written into one ``[t_s + 1, N, d_s]`` buffer, so no graph
   outlives its chunk. The loss returned is attached to ``student_hidden`` by a small autograd
   function whose backward hands that buffer over, scaled by the incoming gradient.

All ``[chunk, V]`` results are written into one pool of buffers (:class:`_Workspace`) that both
passes share, never into fresh tensors. Peak memory is therefore about ``(t_s + 4) * chunk * V``
floats plus the gradient buffer (the size of ``student_hidden`` itself), whatever ``N`` is. The
price is computing the selected student and teacher verbalizers a second time (``2 t_s``
verbalizer forwards on top of the ``t_s + t_l + 2`` that the naive loss also runs); ``vlsi
bench loss`` measures the loss against the head matmuls and log-softmaxes it cannot avoid.

Contract for the ``*_logits_fn`` callables: ``fn(index, h[n, d]) -> logits[n, >= V]``, acting on
each token independently (tokens are split into chunks); ``index < t`` is target layer
``index``'s verbalizer, ``index == t`` the model's own LM head applied to the last hidden state,
which is already final-normed. Their parameters must be frozen (the interaction step freezes
verbalizers and LM heads): the chunked loss gives gradient to ``student_hidden`` only, and
raises if it finds a student-side parameter that requires grad. For a sequence-mixing verbalizer
(``decoder`` architecture) run its transform over whole sequences first and pass a per-token
head as the callable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from vlsi.method.losses import (DEFAULT_JSD_BETA, DIVERGENCES, OPS, SPARSE_OPS, compute_dtype, finite_floor,
                                kl_direction, label_ce_and_logit_grad, log_probs, pair_loss_and_logit_grad,
                                pair_loss_logprobs, row_dot, sparse_bucket_kl, sparse_pair_loss_and_logit_grad,
                                tail_log_mass)
from vlsi.method.matching import STRATEGIES, Matching, match, needed_mask

# Response tokens per chunk of the two-pass interaction loss: 256 tokens x 151,936 vocab x 4 bytes
# = 155 MB per [chunk, V] float32 buffer; the scoring pass holds about t_s + 4 of them (1.7 GB at
# t_s = 7). Large enough that the LM-head matmuls stay efficient, small enough to sit beside a
# 72B teacher, and ~20x below the naive peak at 2k tokens.
DEFAULT_CHUNK_SIZE = 256


LogitsFn = Callable[[int, Tensor], Tensor]


@dataclass
class InteractionResult:
    """What one interaction-loss call returns.

    Attributes:
        loss: scalar (float32; float64 for float64 inputs) with gradient to ``student_hidden``.
        kld: float32 ``[t_s, t_l]`` mean KLD scores; NaN where not computed.
        weights: float32 ``[t_s, t_l]`` matching weights (rows sum to 1; zeros when the
            intermediate op is ``none`` or there is no response token).
        pair_losses: float32 ``[t_s, t_l]`` mean op loss of the selected pairs, 0 elsewhere.
        last_loss: mean last-layer loss (0.0 when the last op is ``none``).
        matching_entropy: float32 ``[t_s]`` on the device, entropy (nats) of the distribution each student
            layer's pair was drawn from (:meth:`vlsi.method.matching.Matching.entropy`); NaN when no
            pair was selected.
        seconds: wall time of the chunked loss's parts, ``scoring`` (scoring pass and
            matching) and ``gradient`` (gradient pass); empty for the naive loss. On CUDA the
            matching's copy to the CPU waits for the scoring pass; the gradient pass's last
            kernels may still run when it is read.
    """

    loss: Tensor
    kld: Tensor
    weights: Tensor
    pair_losses: Tensor
    last_loss: float
    matching_entropy: Tensor
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class SparseTeacher:
    """A teacher known by its top-K per token (an offline cache, :mod:`vlsi.train.teacher_cache`).

    Layers are laid out as ``teacher_hidden`` is: target layers, then the last layer.

    Attributes:
        ids: long ``[t_l + 1, N, K]``, ids into the shared vocabulary, distinct per token.
        logp: float ``[t_l + 1, N, K]``, the teacher's log-probabilities of those ids.
        tail: float ``[t_l + 1, N]``, the teacher's probability of every other id together.
    """

    ids: Tensor
    logp: Tensor
    tail: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 3 or self.ids.dtype != torch.long:
            raise ValueError(f"SparseTeacher.ids must be long [layers, N, K], got {self.ids.dtype} "
                             f"{list(self.ids.shape)}")
        if self.logp.shape != self.ids.shape or not self.logp.is_floating_point():
            raise ValueError(f"SparseTeacher.logp must be float {list(self.ids.shape)} like ids, got "
                             f"{self.logp.dtype} {list(self.logp.shape)}")
        if self.tail.shape != self.ids.shape[:2] or not self.tail.is_floating_point():
            raise ValueError(f"SparseTeacher.tail must be float {list(self.ids.shape[:2])} (layers, N), got "
                             f"{self.tail.dtype} {list(self.tail.shape)}")

    @property
    def shape(self) -> torch.Size:
        """``[t_l + 1, N, K]``, standing in for the hidden states' ``[t_l + 1, N, d]``."""
        return self.ids.shape

    def dim(self) -> int:
        return self.ids.dim()

    def layer(self, j: int, a: int, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Layer ``j`` on tokens ``a:b``: ids ``[c, K]``, log-probs and tail in ``dtype``."""
        return self.ids[j, a:b], self.logp[j, a:b].to(dtype), self.tail[j, a:b].to(dtype)


@dataclass
class _Problem:
    """Validated inputs shared by the passes."""

    student_hidden: Tensor  # [t_s + 1, N, d_s]
    teacher_hidden: Tensor | SparseTeacher  # [t_l + 1, N, d_t], or the top-K of each layer
    student_fn: LogitsFn
    teacher_fn: LogitsFn | None
    vocab_size: int
    intermediate_op: str
    last_op: str
    divergence: str
    jsd_beta: float = DEFAULT_JSD_BETA
    labels: Tensor | None = None  # long [N], the ground-truth next tokens (op ce)

    @property
    def direction(self) -> str | None:
        """``forward``/``reverse`` for a plain KL, ``None`` for a Jensen-Shannon mixture."""
        return kl_direction(self.divergence, self.jsd_beta)

    @property
    def t_s(self) -> int:
        return self.student_hidden.shape[0] - 1

    @property
    def t_l(self) -> int:
        return self.teacher_hidden.shape[0] - 1

    @property
    def n_tokens(self) -> int:
        return self.student_hidden.shape[1]

    @property
    def sparse(self) -> bool:
        return isinstance(self.teacher_hidden, SparseTeacher)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.student_hidden.dtype)

    def student_logp(self, index: int, h: Tensor) -> Tensor:
        """Student log-probs ``[n, V]`` (graph kept if ``h`` requires grad)."""
        return log_probs(_cut(self.student_fn(index, h), self.vocab_size))

    def teacher_logp(self, index: int, h: Tensor) -> Tensor:
        """Teacher log-probs ``[n, V]``, never with a graph."""
        with torch.no_grad():
            return log_probs(_cut(self.teacher_fn(index, h), self.vocab_size))


def _cut(logits: Tensor, vocab_size: int) -> Tensor:
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} entries, fewer than vocab_size={vocab_size}")
    return logits[..., :vocab_size]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _validate(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    vocab_size: int,
    strategy: str,
    intermediate_op: str,
    last_op: str,
    divergence: str,
    chunk_size: int,
    jsd_beta: float = DEFAULT_JSD_BETA,
    labels: Tensor | None = None,
) -> None:
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise ValueError(
            "hidden states must be [layers + 1, N, d]; got student "
            f"{tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}"
        )
    if student_hidden.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(
            f"student has {student_hidden.shape[1]} response tokens, teacher {teacher_hidden.shape[1]}"
        )
    for name, op in (("intermediate_op", intermediate_op), ("last_op", last_op)):
        if op not in OPS:
            raise ValueError(f"unknown {name} {op!r}; supported: {', '.join(OPS)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; supported: {', '.join(DIVERGENCES)}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown matching strategy {strategy!r}; supported: {', '.join(STRATEGIES)}")
    t_s, t_l = student_hidden.shape[0] - 1, teacher_hidden.shape[0] - 1
    if intermediate_op != "none" and not 1 <= t_s <= t_l:
        raise ValueError(f"the intermediate loss needs 1 <= t_s <= t_l, got t_s={t_s}, t_l={t_l}")
    if chunk_size < 1 or vocab_size < 1:
        raise ValueError(f"chunk_size and vocab_size must be >= 1, got {chunk_size}, {vocab_size}")
    if isinstance(teacher_hidden, SparseTeacher):
        unsupported = [op for op in (intermediate_op, last_op) if op not in (*SPARSE_OPS, "none")]
        if unsupported or divergence != "forward":
            raise ValueError(f"a top-K teacher supports the ops {', '.join(SPARSE_OPS)} with the forward "
                             f"divergence, got ops {intermediate_op}/{last_op}, divergence {divergence}")
    if "ce" in (intermediate_op, last_op):
        _validate_labels(labels, student_hidden.shape[1], vocab_size)


def _validate_labels(labels: Tensor | None, n: int, vocab_size: int) -> None:
    """The ``ce`` op's labels: long ``[N]`` ids below ``vocab_size`` (one host sync)."""
    if labels is None:
        raise ValueError("op 'ce' is the cross-entropy against the ground-truth tokens: pass labels (long [N])")
    if tuple(labels.shape) != (n,) or labels.dtype != torch.long:
        raise ValueError(f"labels must be long [{n}] (one per response token), got {labels.dtype} {list(labels.shape)}")
    if n and bool(((labels < 0) | (labels >= vocab_size)).any()):
        raise ValueError(f"labels must be ids in [0, vocab_size={vocab_size})")


def _empty_result(problem: _Problem) -> InteractionResult:
    """No response token: a zero loss still connected to the graph (DDP needs every rank's)."""
    device = problem.student_hidden.device
    shape = (problem.t_s, problem.t_l)
    loss = (problem.student_hidden.sum() * 0).to(problem.dtype)
    return InteractionResult(
        loss=loss,
        kld=torch.full(shape, float("nan"), device=device),
        weights=torch.zeros(shape, device=device),
        pair_losses=torch.zeros(shape, device=device),
        last_loss=0.0,
        matching_entropy=torch.full((problem.t_s,), float("nan"), device=device),
    )


def _needed(problem: _Problem, strategy: str) -> Tensor:
    """Entries to score (CPU bool ``[t_s, t_l]``): none when there is no intermediate term."""
    if problem.intermediate_op == "none":
        return torch.zeros(problem.t_s, problem.t_l, dtype=torch.bool)
    return needed_mask(strategy, problem.t_s, problem.t_l)


# Teacher layers scored together against the student cache: one batched matmul reads the cache
# once per group instead of once per teacher layer; each member holds one [chunk, V] buffer.
TEACHER_GROUP = 2


class _Workspace:
    """``slots`` reusable ``[chunk, V]`` buffers shared by both passes, sliced to each chunk.

    Log-softmaxes and exponentials are written into these (``out=``) instead of fresh tensors:
    on the CPU every new buffer of that size is mapped and page-faulted anew, which can cost
    more than the operation itself. The scoring pass uses ``r + TEACHER_GROUP + 1`` slots, the
    gradient pass :data:`GRADIENT_SLOTS`; they run one after the other on the same slots.
    """

    def __init__(self, problem: "_Problem", chunk_size: int, slots: int):
        rows = min(chunk_size, problem.n_tokens)
        self.pool = torch.empty(slots, rows, problem.vocab_size, dtype=problem.dtype,
                                device=problem.student_hidden.device)

    def slots(self, first: int, count: int, c: int) -> Tensor:
        """Slots ``first .. first + count - 1`` for a chunk of ``c`` tokens: ``[count, c, V]``."""
        return self.pool[first : first + count, :c]

    def slot(self, index: int, c: int) -> Tensor:
        """Slot ``index`` for a chunk of ``c`` tokens, ``[c, V]`` (contiguous)."""
        return self.pool[index, :c]


GRADIENT_SLOTS = 5  # log Q, Q, dL/dz, log P, scratch


def scoring_slots(rows: int) -> int:
    """Slots the scoring pass needs with ``rows`` cached student layers (0 when none)."""
    return rows + TEACHER_GROUP + 1 if rows else 0


def _log_softmax_into(logits: Tensor, vocab_size: int, out: Tensor) -> Tensor:
    """``log_softmax`` of ``logits[:, :V]`` in ``out``'s dtype, written into ``out`` ``[c, V]``;
    ``-inf`` (masked ids) floored to the lowest finite value (:func:`vlsi.method.losses.finite_floor`)."""
    return finite_floor(torch.log_softmax(_cut(logits, vocab_size), dim=-1, dtype=out.dtype, out=out))


def _softmax_into(logits: Tensor, vocab_size: int, out: Tensor, log_out: Tensor) -> Tensor:
    """``P = softmax(logits[:, :V])`` written into ``out`` ``[c, V]``; returns ``sum_v P log P`` ``[c]``.

    ``log P`` is a log-softmax (shifted by the row's largest logit before anything is summed)
    written into ``log_out`` ``[c, V]``, so the self term keeps float32 precision however large
    the logits are, and masked ids give ``0 log 0 = 0``.
    """
    log_p = _log_softmax_into(logits, vocab_size, log_out)
    p = torch.exp(log_p, out=out)
    return row_dot(p, log_p)


def _student_cache(problem: _Problem, rows: list[int], a: int, b: int,
                   workspace: _Workspace) -> tuple[Tensor, Tensor | None]:
    """Per-chunk student side of the scoring pass.

    Returns ``cache [len(rows), c, V]`` holding ``log Q_i`` (forward KL) or ``Q_i`` (reverse KL),
    and for reverse KL the self term ``sum_v Q_i log Q_i`` as ``[c, len(rows)]``.
    """
    c = b - a
    cache = workspace.slots(0, len(rows), c)
    self_terms = None
    if problem.direction == "reverse":
        self_terms = torch.empty(c, len(rows), dtype=problem.dtype, device=cache.device)
        log_q = workspace.slot(len(rows) + TEACHER_GROUP, c)
    for k, i in enumerate(rows):
        with torch.no_grad():
            logits = problem.student_fn(i, problem.student_hidden[i, a:b])
        if self_terms is None:
            _log_softmax_into(logits, problem.vocab_size, cache[k])
        else:
            _log_softmax_into(logits, problem.vocab_size, log_q)
            torch.exp(log_q, out=cache[k])
            self_terms[:, k] = row_dot(cache[k], log_q)
        del logits
    return cache, self_terms


def _teacher_group(problem: _Problem, group: list[int], first: int, a: int, b: int,
                   workspace: _Workspace) -> tuple[Tensor, Tensor | None]:
    """Teacher side of one group of scored layers on tokens ``a:b``.

    Returns ``side [len(group), c, V]`` holding ``P_j`` (forward KL) or ``log P_j`` (reverse KL)
    and, for forward KL, the self terms ``sum_v P_j log P_j`` ``[c, len(group)]``.
    """
    c = b - a
    side = workspace.slots(first, len(group), c)
    self_terms = None
    if problem.direction == "forward":
        self_terms = torch.empty(c, len(group), dtype=problem.dtype, device=side.device)
    for g, j in enumerate(group):
        with torch.no_grad():
            logits = problem.teacher_fn(j, problem.teacher_hidden[j, a:b])
        if self_terms is None:
            _log_softmax_into(logits, problem.vocab_size, side[g])
        else:
            self_terms[:, g] = _softmax_into(logits, problem.vocab_size, side[g],
                                             workspace.slot(first + TEACHER_GROUP, c))
        del logits
    return side, self_terms


def _sparse_chunk_kl(problem: _Problem, j: int, a: int, b: int, cache: Tensor, positions: list[int],
                     scratch: Tensor) -> list[Tensor]:
    """Bucketed ``KL(P_j || Q_i)`` on tokens ``a:b`` for the cached student layers at ``positions``
    of ``cache`` ``[r, c, V]``: one ``[c]`` tensor each (the formula of
    :func:`vlsi.method.losses.sparse_pair_loss_and_logit_grad`); ``scratch`` ``[c, V]`` is overwritten."""
    ids, logp, tail = problem.teacher_hidden.layer(j, a, b, cache.dtype)
    out = []
    for k in positions:
        log_q_tail, _ = tail_log_mass(cache[k], ids, scratch)
        out.append(sparse_bucket_kl(logp, tail, cache[k].gather(1, ids), log_q_tail))
    return out


@torch.no_grad()
def _score_kld(problem: _Problem, needed: Tensor, chunk_size: int, workspace: _Workspace) -> Tensor:
    """Scoring pass: mean over response tokens of ``KL`` for the ``needed`` entries.

    Per chunk the scored student layers are cached (``[r, c, V]``); teacher layers come in groups
    of :data:`TEACHER_GROUP` (``[g, c, V]``), and one batched matmul gives the cross terms
    ``[c, r, g]`` of every cached student layer against the group (entries outside ``needed``
    are computed there too, and dropped). ``KL(P || Q_i) = P . log P - P . log Q_i`` and
    ``KL(Q_i || P) = Q_i . log Q_i - Q_i . log P``.

    Which entries are needed is decided on the host once, before the chunks: inside the loop
    results are accumulated by index tensors built on the device once, so the pass issues no
    host-device synchronisation per chunk.

    Args:
        needed: CPU bool ``[t_s, t_l]``.

    Returns:
        float32 ``[t_s, t_l]``, NaN outside ``needed``.
    """
    device = problem.student_hidden.device
    rows = needed.any(dim=1).nonzero().flatten().tolist()
    needed_cells = needed.tolist()
    columns = [j for j in range(problem.t_l) if any(needed_cells[i][j] for i in rows)]
    groups = [columns[k : k + TEACHER_GROUP] for k in range(0, len(columns), TEACHER_GROUP)]
    sums = torch.zeros(len(rows), problem.t_l, dtype=torch.float64, device=device)  # [r, t_l]
    chunks = _chunks(problem.n_tokens, chunk_size) if rows else []  # nothing to score: no pass
    if problem.sparse:
        positions = {j: [k for k, i in enumerate(rows) if needed_cells[i][j]] for j in columns}
    else:
        group_index = [torch.tensor(group, device=device) for group in groups]
    for a, b in chunks:
        cache, student_self = _student_cache(problem, rows, a, b, workspace)
        if problem.sparse:
            scratch = workspace.slot(len(rows), b - a)
            for j in columns:
                for k, kl in zip(positions[j], _sparse_chunk_kl(problem, j, a, b, cache, positions[j], scratch)):
                    sums[k, j] += kl.sum().to(torch.float64)
            continue
        for group, index in zip(groups, group_index):
            side, teacher_self = _teacher_group(problem, group, len(rows), a, b, workspace)
            # [c, r, V] x [c, V, g] -> [c, r, g]
            if problem.direction is None:
                kl = _jsd_group(problem, cache, side, rows, group, needed_cells, workspace.slot(len(rows) + TEACHER_GROUP,
                                                                                             b - a))
                sums.index_add_(1, index, kl.sum(dim=0).to(torch.float64))
                continue
            cross = torch.bmm(cache.permute(1, 0, 2), side.permute(1, 2, 0))
            if teacher_self is not None:
                kl = teacher_self.unsqueeze(1) - cross
            else:
                kl = student_self.unsqueeze(2) - cross
            sums.index_add_(1, index, kl.sum(dim=0).to(torch.float64))  # [r, g]
    kld = torch.full((problem.t_s, problem.t_l), float("nan"), device=device)
    if rows:
        kld[torch.tensor(rows, device=device)] = (sums / problem.n_tokens).float()
    return kld.masked_fill(~needed.to(device), float("nan"))


def _jsd_group(problem: _Problem, cache: Tensor, side: Tensor, rows: list[int], group: list[int],
               needed_cells: list[list[bool]], scratch: Tensor) -> Tensor:
    """JSD of the cached student layers (``log Q_i``, ``[r, c, V]``) against a group of teacher
    layers (``log P_j``, ``[g, c, V]``) on one chunk: ``[c, r, g]``, zero outside ``needed``.

    The mixture ``M`` depends on both sides, so each needed pair costs its own elementwise pass
    (no batched matmul as for a plain KL); ``scratch`` ``[c, V]`` is overwritten.
    """
    out = torch.zeros(cache.shape[1], len(rows), len(group), dtype=cache.dtype, device=cache.device)
    for k, i in enumerate(rows):
        q = None
        for g, j in enumerate(group):
            if needed_cells[i][j]:
                q = torch.exp(cache[k]) if q is None else q
                out[:, k, g] = pair_loss_and_logit_grad("kld", side[g], cache[k], q, scratch,
                                                        divergence="jsd", beta=problem.jsd_beta)
    return out


def _trainable_leaves(output: Tensor, allowed: Tensor) -> list[Tensor]:
    """Leaves of ``output``'s graph that require grad, other than ``allowed``."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # only AccumulateGrad nodes have one
        if variable is not None and variable is not allowed:
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _check_frozen(s_logp: Tensor, h: Tensor, index: int) -> None:
    leaves = _trainable_leaves(s_logp, h)
    if leaves:
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves[:3])
        raise ValueError(
            f"student_logits_fn({index}, ...) uses parameters that require grad (shapes {shapes}); "
            "the chunked interaction loss only gives gradient to student_hidden, so freeze the "
            "verbalizers and the LM head (requires_grad_(False)) as the interaction step does"
        )


# One loss term: (teacher index, weight, op) for a given student index.
_Term = tuple[int, float, str]


def _plan(problem: _Problem, matching: Matching | None) -> dict[int, list[_Term]]:
    """Student index -> terms of the loss; the last layer is student ``t_s`` vs teacher ``t_l``."""
    plan: dict[int, list[_Term]] = {}
    if matching is not None:
        weights_cpu = matching.weights.cpu()
        for i, j in weights_cpu.nonzero().tolist():
            plan.setdefault(i, []).append((j, float(weights_cpu[i, j]), problem.intermediate_op))
    if problem.last_op != "none":
        plan[problem.t_s] = [(problem.t_l, 1.0, problem.last_op)]
    return plan


def _student_layer_chunk(
    problem: _Problem, i: int, terms: list[_Term], a: int, b: int, sums: Tensor, need_grad: bool, check: bool,
    workspace: _Workspace,
) -> Tensor | None:
    """One student layer on tokens ``a:b``: adds per-term loss sums, returns d(loss)/d(h) ``[c, d_s]``.

    The gradient with respect to the student logits is summed over the layer's terms in closed
    form (:func:`vlsi.method.losses.pair_loss_and_logit_grad`) into one ``[c, V]`` buffer, then taken
    back through the verbalizer in one backward, so the student verbalizer runs forward and
    backward once per chunk however many teacher layers it is paired with. ``ce`` terms read no
    teacher: their per-token loss is computed once for all of them, with their summed weight.
    """
    c = b - a
    h = problem.student_hidden[i, a:b].detach().requires_grad_(need_grad)
    # the first chunk also runs with grad when the caller has grad on but student_hidden needs
    # none, so that trainable verbalizer parameters are found rather than silently left out
    check = check and torch.is_grad_enabled()
    with torch.set_grad_enabled(need_grad or check):
        logits = problem.student_fn(i, h)
    if check:
        _check_frozen(logits, h, i)
    with torch.no_grad():
        log_q = _log_softmax_into(logits.detach(), problem.vocab_size, workspace.slot(0, c))
        q = torch.exp(log_q, out=workspace.slot(1, c))
        grad = workspace.slot(2, c).zero_() if need_grad else None
        ce_terms = [(j, weight) for j, weight, op in terms if op == "ce"]
        if ce_terms:
            per_token = label_ce_and_logit_grad(log_q, q, problem.labels[a:b], workspace.slot(4, c), grad,
                                                sum(w for _, w in ce_terms) / problem.n_tokens).sum().to(torch.float64)
            for j, _ in ce_terms:
                sums[i, j] += per_token
        for j, weight, op in terms:
            if op == "ce":
                continue
            if problem.sparse:
                ids, t_logp, t_tail = problem.teacher_hidden.layer(j, a, b, log_q.dtype)
                per_token = sparse_pair_loss_and_logit_grad(op, ids, t_logp, t_tail, log_q, q, workspace.slot(4, c),
                                                            grad, weight / problem.n_tokens)
                sums[i, j] += per_token.sum().to(torch.float64)
                continue
            t_logits = problem.teacher_fn(j, problem.teacher_hidden[j, a:b])
            log_p = _log_softmax_into(t_logits, problem.vocab_size, workspace.slot(3, c))
            del t_logits
            per_token = pair_loss_and_logit_grad(op, log_p, log_q, q, workspace.slot(4, c), grad,
                                                 weight / problem.n_tokens, problem.divergence, problem.jsd_beta)
            sums[i, j] += per_token.sum().to(torch.float64)
    if not need_grad:
        return None
    if logits.shape[-1] != problem.vocab_size or logits.dtype != grad.dtype:
        full = torch.zeros_like(logits)
        full[:, : problem.vocab_size] = grad
        grad = full
    (grad_h,) = torch.autograd.grad(logits, h, grad_outputs=grad)
    return grad_h


def _gradient_pass(
    problem: _Problem, plan: dict[int, list[_Term]], chunk_size: int, grad_buffer: Tensor | None,
    workspace: _Workspace,
) -> Tensor:
    """Loss-term sums over all tokens ``[t_s + 1, t_l + 1]`` (float64); fills ``grad_buffer``."""
    sums = torch.zeros(problem.t_s + 1, problem.t_l + 1, dtype=torch.float64, device=problem.student_hidden.device)
    need_grad = grad_buffer is not None
    for chunk_index, (a, b) in enumerate(_chunks(problem.n_tokens, chunk_size)):
        for i, terms in plan.items():
            grad_h = _student_layer_chunk(problem, i, terms, a, b, sums, need_grad, chunk_index == 0, workspace)
            if grad_h is not None:
                grad_buffer[i, a:b] = grad_h
    return sums


class _PrecomputedGradient(torch.autograd.Function):
    """A scalar whose gradient w.r.t. ``inputs`` was computed in the forward pass.

    The buffer is handed over (scaled in place) by the first backward, so that it is not held
    twice; a second backward through the same loss raises.
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, value: Tensor, grad: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grad = grad
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("the chunked interaction loss supports one backward pass only")
        ctx.grad = None
        return grad.mul_(grad_output.to(grad.dtype)), None, None


def _resolve_matching(
    problem: _Problem,
    kld: Tensor,
    weights: Tensor | None,
    strategy: str,
    generator: torch.Generator | None,
    matching_kwargs: dict | None,
) -> Matching | None:
    """The matching (float32 ``[t_s, t_l]`` on the hidden states' device); ``None`` without an
    intermediate term."""
    device = problem.student_hidden.device
    shape = (problem.t_s, problem.t_l)
    if problem.intermediate_op == "none":
        return None
    if weights is not None:
        if tuple(weights.shape) != shape:
            raise ValueError(f"weights must be {list(shape)}, got {list(weights.shape)}")
        fixed = weights.detach().to(device=device, dtype=torch.float32)
        return Matching(fixed, fixed)
    return match(kld, strategy, generator=generator, **(matching_kwargs or {}))


def _result(problem: _Problem, loss: Tensor, kld: Tensor, matching: Matching | None,
            sums: Tensor) -> InteractionResult:
    """Pack per-term sums ``[t_s + 1, t_l + 1]`` into means."""
    device = problem.student_hidden.device
    if matching is None:
        weights = torch.zeros(problem.t_s, problem.t_l, device=device)
        entropy = torch.full((problem.t_s,), float("nan"), device=device)
    else:
        weights, entropy = matching.weights, matching.entropy()
    means = sums / problem.n_tokens
    pair_losses = (means[: problem.t_s, : problem.t_l] * (weights > 0)).float()
    return InteractionResult(loss, kld, weights, pair_losses, float(means[problem.t_s, problem.t_l]),
                             entropy)


def interaction_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor | SparseTeacher,
    student_logits_fn: LogitsFn,
    teacher_logits_fn: LogitsFn | None,
    *,
    vocab_size: int,
    strategy: str = "vlsi",
    intermediate_op: str = "kld",
    last_op: str = "kld",
    divergence: str = "forward",
    jsd_beta: float = DEFAULT_JSD_BETA,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    generator: torch.Generator | None = None,
    matching_kwargs: dict | None = None,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
) -> InteractionResult:
    """Chunked interaction loss; peak memory independent of the number of response tokens.

    Args:
        student_hidden: ``[t_s + 1, N, d_s]``: target-layer hidden states of the ``N`` response
            tokens, then (index ``t_s``) the final-normed last hidden state. May require grad.
        teacher_hidden: ``[t_l + 1, N, d_t]``, same layout; never receives gradient. Or a
            :class:`SparseTeacher` (its top-K per layer and token, ``teacher_logits_fn=None``):
            every KL is then computed over the ``K`` ids plus one tail bucket (forward ``kld``
            only, see :func:`vlsi.method.losses.sparse_pair_loss_and_logit_grad`; ``ce`` reads no teacher).
        student_logits_fn, teacher_logits_fn: ``fn(index, h[n, d]) -> logits[n, >= V]`` with
            frozen parameters (see the module docstring).
        vocab_size: shared vocabulary ``V``; logits are cut to ``[..., :V]``.
        strategy: matching strategy (:data:`vlsi.method.matching.STRATEGIES`); it also decides which
            KLD entries the scoring pass computes.
        intermediate_op, last_op: ``kld``, ``ce`` (cross-entropy against ``labels``), ``l2`` or
            ``none`` (term dropped).
        divergence: ``forward`` (``KL(P_teacher || Q_student)``), ``reverse`` or ``jsd`` (the
            generalised Jensen-Shannon divergence of ``jsd_beta``, :mod:`vlsi.method.losses`); used
            for the scores and for the ``kld`` op.
        jsd_beta: the JSD's ``beta`` in ``[0, 1]`` (0: forward KL, 1: reverse KL).
        chunk_size: response tokens per chunk (see :data:`DEFAULT_CHUNK_SIZE`).
        generator: CPU generator for the sampling strategies.
        matching_kwargs: extra :func:`vlsi.method.matching.select_pairs` arguments (scale, eps, k, ...).
        weights: optional fixed ``[t_s, t_l]`` matching used instead of selecting one.
        labels: long ``[N]``, the ground-truth next token of each response position, in the order
            of the hidden states (:func:`vlsi.method.verbalizer.response_labels`); required when an op is
            ``ce``, ignored otherwise.

    Returns:
        :class:`InteractionResult`.
    """
    _validate(student_hidden, teacher_hidden, vocab_size, strategy, intermediate_op, last_op, divergence, chunk_size,
              jsd_beta, labels)
    # autocast (a bf16 Trainer) would run the float32 inner products and the batched scoring
    # matmul in bf16: off here, the verbalizers run in their weights' dtype
    with torch.autocast(student_hidden.device.type, enabled=False):
        return _interaction_loss(student_hidden, teacher_hidden, student_logits_fn, teacher_logits_fn, vocab_size,
                                 strategy, intermediate_op, last_op, divergence, chunk_size, generator,
                                 matching_kwargs, weights, jsd_beta, labels)


def _interaction_loss(student_hidden, teacher_hidden, student_logits_fn, teacher_logits_fn, vocab_size, strategy,
                      intermediate_op, last_op, divergence, chunk_size, generator, matching_kwargs,
                      weights, jsd_beta, labels) -> InteractionResult:
    """:func:`interaction_loss` once its arguments are checked, autocast off."""
    problem = _Problem(student_hidden, teacher_hidden, student_logits_fn, teacher_logits_fn,
                       vocab_size, intermediate_op, last_op, divergence, jsd_beta, labels)
    if problem.n_tokens == 0:
        return _empty_result(problem)
    start = time.perf_counter()
    needed = _needed(problem, strategy)
    workspace = _Workspace(problem, chunk_size, max(scoring_slots(int(needed.any(dim=1).sum())), GRADIENT_SLOTS))
    kld = _score_kld(problem, needed, chunk_size, workspace)
    matching = _resolve_matching(problem, kld, weights, strategy, generator, matching_kwargs)
    plan = _plan(problem, matching)
    scored = time.perf_counter()

    need_grad = student_hidden.requires_grad and torch.is_grad_enabled()
    grad_buffer = torch.zeros_like(student_hidden) if need_grad else None
    sums = _gradient_pass(problem, plan, chunk_size, grad_buffer, workspace)
    del workspace
    seconds = {"scoring": scored - start, "gradient": time.perf_counter() - scored}

    terms = [(i, j, w) for i, group in plan.items() for j, w, _ in group]
    value = sum((w * sums[i, j] for i, j, w in terms), torch.zeros((), dtype=torch.float64, device=sums.device))
    value = (value / problem.n_tokens).to(problem.dtype)
    loss = _PrecomputedGradient.apply(student_hidden, value, grad_buffer) if need_grad else value
    result = _result(problem, loss, kld, matching, sums)
    result.seconds = seconds
    return result


def naive_interaction_loss(student_hidden: Tensor, teacher_hidden: Tensor, student_logits_fn: LogitsFn,
                           teacher_logits_fn: LogitsFn, *, vocab_size: int, strategy: str = "vlsi",
                           intermediate_op: str = "kld", last_op: str = "kld", divergence: str = "forward",
                           jsd_beta: float = DEFAULT_JSD_BETA, chunk_size: int = DEFAULT_CHUNK_SIZE, generator: torch.Generator | None = None,
                           matching_kwargs: dict | None = None, weights: Tensor | None = None,
                           labels: Tensor | None = None) -> InteractionResult:
    """Reference implementation with plain autograd over full ``[N, V]`` tensors.

    Same arguments and result as :func:`interaction_loss` (``chunk_size`` is ignored). It
    materialises float32 log-probs for every used layer at once (the student's with their
    graphs), scores each needed KLD entry with its own per-pair KL as Algorithm 1 writes it
    (without gradient: selection is not differentiable), selects (unless ``weights`` is given)
    and sums the selected terms. Memory grows linearly with ``N``: use it for tests and
    benchmarks.
    """
    del chunk_size
    _validate(student_hidden, teacher_hidden, vocab_size, strategy, intermediate_op, last_op, divergence, 1, jsd_beta,
              labels)
    problem = _Problem(student_hidden, teacher_hidden, student_logits_fn, teacher_logits_fn,
                       vocab_size, intermediate_op, last_op, divergence, jsd_beta, labels)
    if problem.n_tokens == 0:
        return _empty_result(problem)
    needed = _needed(problem, strategy)
    score_rows = needed.any(dim=1).tolist() if problem.intermediate_op != "none" else [False] * problem.t_s
    s_logp = {i: problem.student_logp(i, student_hidden[i]) for i in range(problem.t_s) if score_rows[i]}
    t_logp = {j: problem.teacher_logp(j, teacher_hidden[j]) for j in range(problem.t_l) if needed[:, j].any()}

    kld = torch.full((problem.t_s, problem.t_l), float("nan"), device=student_hidden.device)
    for i, j in needed.nonzero().tolist():
        kld[i, j] = pair_loss_logprobs("kld", t_logp[j], s_logp[i].detach(), divergence, jsd_beta).mean().float()
    matching = _resolve_matching(problem, kld, weights, strategy, generator, matching_kwargs)
    plan = _plan(problem, matching)

    sums = torch.zeros(problem.t_s + 1, problem.t_l + 1, dtype=torch.float64, device=student_hidden.device)
    loss = (student_hidden.sum() * 0).to(problem.dtype)
    for i, terms in plan.items():
        if i not in s_logp:
            s_logp[i] = problem.student_logp(i, student_hidden[i])
        for j, weight, op in terms:
            if j not in t_logp and op != "ce":  # ce reads the labels, not the teacher
                t_logp[j] = problem.teacher_logp(j, teacher_hidden[j])
            mean = pair_loss_logprobs(op, t_logp.get(j), s_logp[i], divergence, jsd_beta, labels).mean()
            sums[i, j] = mean.detach().to(torch.float64) * problem.n_tokens
            loss = loss + weight * mean
    return _result(problem, loss, kld, matching, sums)
