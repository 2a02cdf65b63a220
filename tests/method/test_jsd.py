"""The generalised Jensen-Shannon divergence (``divergence="jsd"``) against a float64 reference.

The reference is written from the definition alone: ``M = beta P + (1 - beta) Q`` (as a
log-sum-exp of the two weighted log-probabilities), ``JSD = beta KL(P || M) + (1 - beta) KL(Q || M)``, its
gradient by autograd; ``beta = 0`` and ``1`` are forward and reverse KL (TRL's GKD convention).
The verbalizers are the identity, so hidden states are logits.
"""

import math

import pytest
import torch

from vlsi.method.interaction import interaction_loss, naive_interaction_loss
from vlsi.method.losses import pair_loss_and_logit_grad, pair_loss_logprobs
from vlsi.train.config import ConfigError, load_config

torch.set_num_threads(1)


def identity(index, h):
    return h


def ref_kl(log_p, log_q):
    """``sum p log(p / q)`` in float64, ``0 log 0 = 0``."""
    p = log_p.exp()
    keep = p > 0  # log-probabilities masked before the difference, so autograd sees no -inf - -inf
    return (p * (torch.where(keep, log_p, 0.0) - torch.where(keep, log_q, 0.0))).sum(-1)


def ref_jsd(teacher_logits, student_logits, beta):
    log_p = torch.log_softmax(teacher_logits.double(), -1)
    log_q = torch.log_softmax(student_logits.double(), -1)
    if beta == 0.0:
        return ref_kl(log_p, log_q)
    if beta == 1.0:
        return ref_kl(log_q, log_p)
    # log M = log(beta p + (1 - beta) q), in log space (p underflows for huge logits); ids both
    # sides mask are floored so that autograd's logsumexp sees no all -inf column
    log_m = torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]).clamp(min=-1e300).logsumexp(0)
    return beta * ref_kl(log_p, log_m) + (1 - beta) * ref_kl(log_q, log_m)


def closed_form(teacher_logits, student_logits, beta, dtype):
    """Value ``[n]`` and logit gradient ``[n, V]`` of :func:`pair_loss_and_logit_grad` in ``dtype``."""
    t_logp = torch.log_softmax(teacher_logits.to(dtype), -1).clamp(min=torch.finfo(dtype).min)
    s_logp = torch.log_softmax(student_logits.to(dtype), -1).clamp(min=torch.finfo(dtype).min)
    grad = torch.zeros_like(s_logp)
    value = pair_loss_and_logit_grad("kld", t_logp, s_logp, s_logp.exp(), torch.empty_like(s_logp), grad,
                                     divergence="jsd", beta=beta)
    return value, grad


def reference(teacher_logits, student_logits, beta):
    z = student_logits.detach().double().requires_grad_()
    value = ref_jsd(teacher_logits, z, beta)
    value.sum().backward()
    return value.detach(), z.grad


def cases():
    g = torch.Generator().manual_seed(0)
    n, V = 6, 50
    friendly = (torch.randn(n, V, generator=g), torch.randn(n, V, generator=g))
    peaked_t = torch.randn(n, V, generator=g)
    peaked_t[:, 3] += 30.0  # a teacher with p(3) = 1 - 1e-12
    confident_s = torch.randn(n, V, generator=g)
    confident_s[:, 7] += 25.0  # a student confident on another id
    huge = (torch.rand(n, V, generator=g) * 1e4, torch.randn(n, V, generator=g) * 5 + 3e4)
    masked_t, masked_s = torch.randn(n, V, generator=g), torch.randn(n, V, generator=g)
    masked_t[:, :10] = float("-inf")  # ids masked on one side or both
    masked_s[:, 5:15] = float("-inf")
    return {"friendly": friendly, "peaked_vs_confident": (peaked_t, confident_s), "huge": huge,
            "masked": (masked_t, masked_s)}


# a plain KL (beta 0 or 1) with mass on an id the other side masks is infinite: test_loss_numerics
CASES = [(case, beta) for case in cases() for beta in (0.0, 0.1, 0.5, 0.9, 1.0)
         if not (case == "masked" and beta in (0.0, 1.0))]


@pytest.mark.parametrize("case,beta", CASES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_value_and_logit_gradient_match_float64(case, beta, dtype, rtol):
    """Errors relative to the largest entry, none absolute: a confident student's gradient is
    about 1e-9 here, and its largest entry must still be right. (In float64 the reference's own
    softmax backward is exact to about 1e-16 absolute only, hence 1e-6 relative there.)"""
    t, s = (x.to(dtype) for x in cases()[case])  # the reference sees the same rounded logits
    value, grad = closed_form(t, s, beta, dtype)
    ref_value, ref_grad = reference(t, s, beta)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (value.double() - ref_value).abs().max() <= rtol * ref_value.abs().max()
    assert (grad.double() - ref_grad).abs().max() <= rtol * ref_grad.abs().max()


@pytest.mark.parametrize("beta,direction", [(0.0, "forward"), (1.0, "reverse")])
def test_beta_zero_and_one_are_forward_and_reverse_kl(beta, direction):
    t, s = cases()["friendly"]
    t_logp, s_logp = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    jsd = pair_loss_logprobs("kld", t_logp, s_logp, "jsd", beta)
    kl = pair_loss_logprobs("kld", t_logp, s_logp, direction)
    assert torch.equal(jsd, kl)
    jsd_value, jsd_grad = closed_form(t, s, beta, torch.float64)
    grad = torch.zeros_like(s_logp)
    kl_value = pair_loss_and_logit_grad("kld", t_logp, s_logp, s_logp.exp(), torch.empty_like(s_logp), grad,
                                        divergence=direction)
    assert torch.equal(jsd_value, kl_value) and torch.equal(jsd_grad, grad)


def test_half_jsd_is_symmetric_and_reaches_its_bound_on_disjoint_supports():
    t, s = cases()["friendly"]
    a = pair_loss_logprobs("kld", torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1), "jsd", 0.5)
    b = pair_loss_logprobs("kld", torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1), "jsd", 0.5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # P on ids 0-4 only, Q on ids 5-9 only: JSD_beta = -beta log beta - (1 - beta) log(1 - beta)
    p_logits = torch.full((1, 10), float("-inf"))
    p_logits[0, :5] = 0.0
    q_logits = torch.full((1, 10), float("-inf"))
    q_logits[0, 5:] = 0.0
    for beta in (0.2, 0.5):
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        value, grad = closed_form(p_logits, q_logits, beta, torch.float32)
        assert abs(float(value) - bound) < 1e-6 and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("strategy", ["vlsi", "uniform"])
def test_chunked_interaction_loss_with_jsd_equals_the_naive_loss(dtype, rtol, strategy):
    g = torch.Generator().manual_seed(3)
    t_s, t_l, n, V = 3, 6, 11, 40
    student = (torch.randn(t_s + 1, n, V, generator=g) * 3).to(dtype)
    teacher = (torch.randn(t_l + 1, n, V, generator=g) * 3).to(dtype)
    teacher[:, :, :4] = float("-inf")  # masked ids on the teacher's side
    results = {}
    for name, fn, chunk in (("naive", naive_interaction_loss, 1), ("chunked", interaction_loss, 4)):
        z = student.clone().requires_grad_()
        result = fn(z, teacher, identity, identity, vocab_size=V, strategy=strategy, divergence="jsd",
                    jsd_beta=0.3, chunk_size=chunk, generator=torch.Generator().manual_seed(1))
        result.loss.backward()
        results[name] = (result, z.grad)
    (naive, naive_grad), (chunk, chunk_grad) = results["naive"], results["chunked"]
    assert torch.equal(naive.weights, chunk.weights)
    torch.testing.assert_close(chunk.loss.double(), naive.loss.double(), rtol=rtol, atol=0)
    torch.testing.assert_close(chunk_grad, naive_grad, rtol=rtol, atol=rtol * float(naive_grad.abs().max()))
    scored = torch.isfinite(naive.kld)
    assert torch.equal(scored, torch.isfinite(chunk.kld))
    torch.testing.assert_close(chunk.kld[scored], naive.kld[scored], rtol=rtol, atol=1e-6)


def test_matching_scores_use_the_jsd():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(3, 7, 30, generator=g).double(), torch.randn(5, 7, 30, generator=g).double()
    result = interaction_loss(student, teacher, identity, identity, vocab_size=30, divergence="jsd", jsd_beta=0.5,
                              generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([[float(ref_jsd(teacher[j], student[i], 0.5).mean()) for j in range(4)] for i in range(2)])
    scored = torch.isfinite(result.kld)
    assert scored.sum() >= 4  # Algorithm 1's band: every student layer scores several teacher layers
    torch.testing.assert_close(result.kld.double()[scored], expected.double()[scored], rtol=1e-6, atol=1e-9)


def test_config_checks_jsd_beta_and_the_teacher_cache(tmp_path):
    def write(extra: str):
        path = tmp_path / "run.yaml"
        path.write_text("teacher: t\nstudent: s\noutput_dir: out\ndata: {train: [x.json]}\n" + extra)
        return load_config(path)

    assert write("interaction: {divergence: jsd, jsd_beta: 0.25}\n").interaction.jsd_beta == 0.25
    with pytest.raises(ConfigError, match="jsd_beta must be in"):
        write("interaction: {divergence: jsd, jsd_beta: 1.5}\n")
    with pytest.raises(ConfigError, match="forward divergence"):
        write("interaction: {divergence: jsd, teacher_cache: cache}\n")
