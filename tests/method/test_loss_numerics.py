"""float32 numerics of the chunked interaction loss against a float64 reference, on adversarial
inputs: a confident student against a top-K teacher, huge logits, masked (-inf) ids, float16
storage, and the shape and parameter checks (issue: exact float32 numerics with a teacher cache).

The reference below is written from docs/method.md's formulas alone (no helper of ``vlsi.method.losses``): the
verbalizers are the identity, so the hidden states *are* the logits and the gradient is taken
with respect to the logits themselves.
"""

import math

import pytest
import torch

from vlsi.method.interaction import SparseTeacher, interaction_loss
from vlsi.method.matching import STRATEGIES

torch.set_num_threads(1)


def identity(index, h):
    """``fn(index, h) -> logits``: the hidden states are the logits."""
    return h


# ----------------------------------------------------------------------------- float64 reference

def ref_log_softmax(z):
    return torch.log_softmax(z.double(), dim=-1)


def ref_kl(log_p, log_q):
    """``sum_v p (log p - log q)`` with ``0 log 0 = 0``, per row."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(-1)


def ref_bucket_kl(ids, t_logp, t_tail, log_q):
    """``KL_K`` (docs/method.md#teacher-cache): ``sum_S p (log p - log q) + p_tail (log p_tail - log q_tail)``, ``q_tail`` a
    log-sum-exp over the ids outside S."""
    t_logp, t_tail = t_logp.double(), t_tail.double()
    p = t_logp.exp()
    s_top = log_q.gather(-1, ids)
    log_q_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    top = (p * torch.where(p > 0, t_logp - s_top, torch.zeros_like(p))).sum(-1)
    tail = t_tail * torch.where(t_tail > 0, t_tail.log() - log_q_tail, torch.zeros_like(t_tail))
    return top + tail


def ref_loss(student_logits, teacher, weights, bucketed=False, divergence="forward"):
    """``sum W[i, j] mean KL(P_j || Q_i) + mean KL(P_last || Q_last)`` in float64, with its
    gradient to the student logits ``[t_s + 1, N, V]``, and the full KLD matrix."""
    z = student_logits.detach().double().requires_grad_()
    log_q = ref_log_softmax(z)

    def kl(j, i):
        if bucketed:
            return ref_bucket_kl(teacher.ids[j], teacher.logp[j], teacher.tail[j], log_q[i])
        log_p = ref_log_softmax(teacher[j])
        return ref_kl(log_p, log_q[i]) if divergence == "forward" else ref_kl(log_q[i], log_p)

    t_s, t_l = z.shape[0] - 1, (teacher.ids if bucketed else teacher).shape[0] - 1
    loss = kl(t_l, t_s).mean()
    for i, j in weights.nonzero().tolist():
        loss = loss + float(weights[i, j]) * kl(j, i).mean()
    loss.backward()
    kld = torch.tensor([[float(kl(j, i).mean().detach()) for j in range(t_l)] for i in range(t_s)], dtype=torch.float64)
    return loss.detach(), z.grad, kld


def chunked(student_logits, teacher, *, dtype=torch.float32, **kwargs):
    """The chunked loss in ``dtype``: result and gradient to the student logits."""
    z = student_logits.detach().to(dtype).requires_grad_()
    t = teacher if isinstance(teacher, SparseTeacher) else teacher.to(dtype)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    result = interaction_loss(z, t, identity, None if isinstance(teacher, SparseTeacher) else identity,
                              vocab_size=z.shape[-1], **kwargs)
    result.loss.backward()
    return result, z.grad


def sparse_top_k(teacher_logits, k, storage=torch.float32):
    """Top-``k`` of every layer as the cache stores it: log-probs in ``storage``, tail in float32
    summed from the other ids."""
    log_p = ref_log_softmax(teacher_logits)
    top = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, top.indices, float("-inf")).logsumexp(-1).exp()
    return SparseTeacher(top.indices, top.values.to(storage).float(), tail.float())


def assert_close_rel(actual, expected, rtol):
    """``|actual - expected| <= rtol * max|expected|`` elementwise (float64 comparison)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape and expected.numel() > 0
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} x {scale:.3e}"


# ----------------------------------------------------------------------------- the audit's reproducer

def _confident_case():
    """V = 1000, K = 1: teacher p(id 0) = 0.5, tail 0.5; student logit 25 on id 0, 0 elsewhere."""
    V = 1000
    student = torch.zeros(1, 1, V)
    student[0, 0, 0] = 25.0
    teacher = SparseTeacher(torch.zeros(1, 1, 1, dtype=torch.long), torch.full((1, 1, 1), 0.5).log(),
                            torch.full((1, 1), 0.5))
    return student, teacher


def test_sparse_loss_of_a_confident_student_matches_float64():
    student, teacher = _confident_case()
    result, grad = chunked(student, teacher, intermediate_op="none")
    loss, ref_grad, _ = ref_loss(student, teacher, torch.zeros(0, 0), bucketed=True)
    log_q0 = -math.log1p(999 * math.exp(-25))  # the student's log q on id 0 and on the tail
    log_q_tail = math.log(999) - 25 + log_q0
    assert abs(float(loss) - (0.5 * (math.log(0.5) - log_q0) + 0.5 * (math.log(0.5) - log_q_tail))) < 1e-8  # teacher stored in float32
    assert_close_rel(result.loss, loss, 1e-6)
    assert abs(float(grad[0, 0, 0]) - 0.5) < 1e-6
    assert abs(float(grad[0, 0, 1:].sum()) + 0.5) < 1e-6
    assert_close_rel(grad, ref_grad, 1e-6)


def test_sparse_scoring_pass_of_a_confident_student_matches_float64():
    student, teacher = _confident_case()
    two = lambda t: torch.cat([t, t])  # one target layer, then the last layer
    layered = SparseTeacher(two(teacher.ids), two(teacher.logp), two(teacher.tail))
    result, _ = chunked(two(student), layered, strategy="vlsi")
    _, _, kld = ref_loss(two(student), layered, result.weights, bucketed=True)
    assert_close_rel(result.kld, kld, 1e-6)


@pytest.mark.parametrize("confidence", [1.0, 6.0, 12.0])
def test_sparse_loss_top32_lm_like_teacher_matches_float64(confidence):
    """K = 32 of V = 3000, a peaked teacher and a student up to very confident (tail ~1e-7)."""
    g = torch.Generator().manual_seed(1)
    t_s, t_l, n, V = 2, 3, 12, 3000
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    base = -1.1 * ranks.log()  # Zipf-like logits
    teacher_logits = torch.stack([base[torch.randperm(V, generator=g)] * 3 + torch.randn(n, V, generator=g)
                                  for _ in range(t_l + 1)])
    student = torch.stack([teacher_logits[min(i, t_l)] * confidence + torch.randn(n, V, generator=g)
                           for i in range(t_s + 1)])
    teacher = sparse_top_k(teacher_logits, 32)
    result, grad = chunked(student, teacher, chunk_size=5)
    loss, ref_grad, kld = ref_loss(student, teacher, result.weights, bucketed=True)
    scored = torch.isfinite(result.kld)
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(result.kld[scored], kld[scored], 1e-5)
    assert_close_rel(grad, ref_grad, 1e-5)


def test_float16_storage_gradient_is_exact_for_what_is_stored():
    """float16 log-probs make ``sum p + tail`` differ from 1; the gradient must be that of the
    stored buckets (float64 throughout, so the comparison is exact to 1e-10)."""
    g = torch.Generator().manual_seed(2)
    teacher_logits = torch.randn(3, 9, 50, generator=g, dtype=torch.float64) * 3
    student = torch.randn(3, 9, 50, generator=g, dtype=torch.float64) * 3
    stored = sparse_top_k(teacher_logits, 6, storage=torch.float16)
    teacher = SparseTeacher(stored.ids, stored.logp.double(), stored.tail.double())
    total = teacher.logp.exp().sum(-1) + teacher.tail
    assert (total - 1).abs().max() > 1e-6  # the storage does round the sum away from 1
    assert (total - 1).abs().max() < 2 ** -11  # float16's relative rounding bounds it
    result, grad = chunked(student, teacher, dtype=torch.float64, chunk_size=4)
    loss, ref_grad, _ = ref_loss(student, teacher, result.weights, bucketed=True)
    torch.testing.assert_close(result.loss, loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- huge logits

@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("make", ["uniform_1e4", "randn_3e4"])
def test_dense_loss_with_huge_logits_matches_float64(make, divergence):
    g = torch.Generator().manual_seed(3)
    t_s, t_l, n, V = 2, 4, 10, 500
    if make == "uniform_1e4":
        teacher = torch.rand(t_l + 1, n, V, generator=g) * 1e4
    else:
        teacher = torch.randn(t_l + 1, n, V, generator=g) * 5 + 3e4
    student = teacher[[0, 2, t_l]] * 1.0 + torch.randn(t_s + 1, n, V, generator=g) * 3
    result, grad = chunked(student, teacher, chunk_size=4, divergence=divergence)
    loss, ref_grad, kld = ref_loss(student, teacher, result.weights, divergence=divergence)
    assert_close_rel(result.kld[torch.isfinite(result.kld)], kld[torch.isfinite(result.kld)], 1e-5)
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("shift", [0.0, 1e4, 3e4])
def test_student_equal_to_teacher_scores_zero_whatever_the_shift(shift):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 8, 400, generator=g) * 5 + shift  # float32, t_s = t_l = 2
    result, _ = chunked(logits, logits.clone(), strategy="uniform")
    diagonal = result.kld.diagonal()
    assert diagonal.abs().max() < 1e-5, diagonal


# ----------------------------------------------------------------------------- masked ids

def _masked_case(seed=5, t_s=2, t_l=4, n=9, V=300):
    """Logits with the same 10 % of ids at -inf on both sides (a masked vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    masked = torch.randperm(V, generator=g)[: V // 10]
    teacher = torch.randn(t_l + 1, n, V, generator=g) * 3
    student = torch.randn(t_s + 1, n, V, generator=g) * 3
    teacher[..., masked] = float("-inf")
    student[..., masked] = float("-inf")
    return student, teacher, masked


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masked_ids_give_finite_exact_results_for_every_strategy(strategy):
    student, teacher, _ = _masked_case()
    result, grad = chunked(student, teacher, strategy=strategy, chunk_size=4)
    loss, ref_grad, kld = ref_loss(student, teacher, result.weights)
    assert torch.isfinite(result.loss) and torch.isfinite(grad).all()
    scored = torch.isfinite(result.kld)
    if strategy not in ("random", "uniform"):  # these two score nothing
        assert_close_rel(result.kld[scored], kld[scored], 1e-5)
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_masked_ids_reverse_and_forward_with_every_op(divergence):
    student, teacher, _ = _masked_case(seed=6)
    for op in ("kld", "l2") if divergence == "forward" else ("kld",):
        result, grad = chunked(student, teacher, intermediate_op=op, last_op=op, divergence=divergence)
        assert torch.isfinite(result.loss) and torch.isfinite(grad).all(), op
        assert torch.isfinite(result.kld).any()


def test_teacher_mass_on_an_id_the_student_masks_is_a_huge_divergence_not_nan():
    student, teacher, masked = _masked_case(seed=7)
    teacher[..., masked[0]] = 2.0  # the teacher gives mass to an id the student masks
    result, _ = chunked(student, teacher, strategy="uniform")
    assert not torch.isnan(result.loss) and float(result.loss) > 1e30


def test_sparse_teacher_with_minus_inf_stored_log_probs():
    """float16 storage turns log-probs below -65504 into -inf: they are probability 0."""
    _, teacher_logits, masked = _masked_case(seed=8)
    student = torch.randn(3, teacher_logits.shape[1], teacher_logits.shape[2], generator=torch.Generator().manual_seed(9))
    teacher = sparse_top_k(teacher_logits, teacher_logits.shape[-1] - 5)  # K reaches the masked ids
    assert torch.isinf(teacher.logp).any()
    result, grad = chunked(student, teacher, chunk_size=4)
    loss, ref_grad, kld = ref_loss(student, teacher, result.weights, bucketed=True)
    assert torch.isfinite(result.loss) and torch.isfinite(grad).all()
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(grad, ref_grad, 1e-5)


# ----------------------------------------------------------------------------- checks on the inputs

def test_sparse_teacher_shapes_are_checked():
    ids = torch.zeros(2, 5, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="logp must be"):
        SparseTeacher(ids, torch.zeros(2, 5, 1), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="tail must be"):
        SparseTeacher(ids, torch.zeros(2, 5, 4), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="ids must be"):
        SparseTeacher(ids.float(), torch.zeros(2, 5, 4), torch.zeros(2, 5))


def test_trainable_verbalizer_parameters_are_refused_without_student_grad():
    head = torch.nn.Linear(6, 20)  # requires grad
    student_hidden = torch.randn(2, 4, 6)  # does not
    teacher_hidden = torch.randn(2, 4, 20)
    with pytest.raises(ValueError, match="require grad"):
        interaction_loss(student_hidden, teacher_hidden, lambda i, h: head(h), identity, vocab_size=20)
    with torch.no_grad():  # nobody asks for a gradient: nothing to refuse
        interaction_loss(student_hidden, teacher_hidden, lambda i, h: head(h), identity, vocab_size=20)


def test_autocast_does_not_lower_the_loss_to_bf16():
    """A bf16 Trainer runs compute_loss under autocast, which casts matmuls to bf16: the loss
    turns it off, so its float32 inner products stay float32."""
    g = torch.Generator().manual_seed(10)
    student = torch.randn(3, 16, 2000, generator=g) * 4
    teacher = torch.randn(5, 16, 2000, generator=g) * 4
    plain, plain_grad = chunked(student, teacher, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_grad = chunked(student, teacher, chunk_size=5)
    assert torch.equal(cast.weights, plain.weights)
    assert_close_rel(cast.loss, plain.loss, 1e-6)
    scored = torch.isfinite(plain.kld)
    assert_close_rel(cast.kld[scored], plain.kld[scored], 1e-6)
    assert_close_rel(cast_grad, plain_grad, 1e-6)
