"""Distribution losses: properties and known values."""

import math

import pytest
import torch

from vlsi.losses import (
    OPS,
    kl_forward,
    kl_reverse,
    l2_prob,
    masked_mean,
    next_token_ce,
    pair_loss,
    soft_ce,
)


def _logits(n: int = 5, v: int = 11, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


def test_ops_constant():
    assert OPS == ("kld", "ce", "l2", "none")


@pytest.mark.parametrize("fn", [kl_forward, kl_reverse, l2_prob])
def test_zero_for_identical_distributions(fn):
    x = _logits()
    torch.testing.assert_close(fn(x, x), torch.zeros(5), atol=1e-6, rtol=0)
    # a shift of the logits does not change the distribution
    torch.testing.assert_close(fn(x, x + 3.0), torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", [kl_forward, kl_reverse, soft_ce, l2_prob])
def test_non_negative_float32_per_token(fn):
    out = fn(_logits(seed=1, dtype=torch.bfloat16), _logits(seed=2, dtype=torch.bfloat16))
    assert out.shape == (5,) and out.dtype == torch.float32
    assert (out >= 0).all() and (out > 0).any()


def test_forward_and_reverse_differ_on_asymmetric_inputs():
    t = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    s = torch.tensor([[1.0, 1.0, 0.0, -1.0]])
    fwd, rev = kl_forward(t, s), kl_reverse(t, s)
    assert abs(fwd.item() - rev.item()) > 1e-2
    torch.testing.assert_close(kl_reverse(t, s), kl_forward(s, t))


def test_forward_kl_matches_torch_kl_div():
    t, s = _logits(seed=3), _logits(seed=4)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(kl_forward(t, s), ref)


def test_ce_is_kl_plus_teacher_entropy():
    t, s = _logits(seed=5, dtype=torch.float64), _logits(seed=6, dtype=torch.float64)
    log_p = torch.log_softmax(t, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(soft_ce(t, s), kl_forward(t, s) + entropy, rtol=0, atol=1e-12)
    assert soft_ce(t, s).dtype == torch.float64


def test_l2_known_value():
    # P = [1/2, 1/2], Q = [1/4, 3/4]  ->  (1/4)^2 + (1/4)^2 = 1/8
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, math.log(3.0)]])
    torch.testing.assert_close(l2_prob(t, s), torch.tensor([0.125]))


def test_kl_known_value():
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(kl_forward(t, s), torch.tensor([expected]))


def test_pair_loss_dispatch():
    t, s = _logits(seed=7), _logits(seed=8)
    torch.testing.assert_close(pair_loss("kld", t, s), kl_forward(t, s))
    torch.testing.assert_close(pair_loss("kld", t, s, divergence="reverse"), kl_reverse(t, s))
    torch.testing.assert_close(pair_loss("ce", t, s, divergence="reverse"), soft_ce(t, s))
    torch.testing.assert_close(pair_loss("l2", t, s), l2_prob(t, s))
    with pytest.raises(ValueError, match="supported: kld, ce, l2, none"):
        pair_loss("mse", t, s)
    with pytest.raises(ValueError, match="divergence"):
        pair_loss("kld", t, s, divergence="sideways")
    with pytest.raises(ValueError, match="none"):
        pair_loss("none", t, s)


def test_student_gradient_of_forward_kl_is_q_minus_p():
    t, s = _logits(seed=9), _logits(seed=10).requires_grad_()
    kl_forward(t, s).sum().backward()
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - torch.softmax(t, -1))


def test_masked_mean_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor((1 + 3 + 6) / 3))


def test_masked_mean_empty_is_zero_with_finite_grad():
    x = torch.tensor([[1.0, float("inf")], [float("nan"), 2.0]], requires_grad=True)
    out = masked_mean(x, torch.zeros(2, 2, dtype=torch.bool))
    assert out.item() == 0.0 and out.dtype == torch.float32
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 2))


def test_masked_mean_shape_mismatch():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(torch.zeros(3), torch.ones(2, dtype=torch.bool))


def test_next_token_ce_shift():
    v = 6
    logits = torch.full((1, 4, v), -20.0)
    # position t puts all mass on token t + 1: perfect prediction of the *next* label
    for t in range(4):
        logits[0, t, t + 1] = 20.0
    labels = torch.tensor([[0, 1, 2, 3]])
    assert next_token_ce(logits, labels).item() < 1e-6
    # without the shift the same labels would be predicted badly
    unshifted = torch.nn.functional.cross_entropy(logits[0], labels[0])
    assert unshifted.item() > 10


def test_next_token_ce_ignores_and_averages():
    logits = _logits(2 * 5, 7, seed=11).reshape(2, 5, 7)
    labels = torch.tensor([[-100, 3, -100, 1, 2], [-100, -100, 6, -100, -100]])
    expected = torch.stack([
        torch.nn.functional.cross_entropy(logits[0, 0], labels[0, 1]),
        torch.nn.functional.cross_entropy(logits[0, 2], labels[0, 3]),
        torch.nn.functional.cross_entropy(logits[0, 3], labels[0, 4]),
        torch.nn.functional.cross_entropy(logits[1, 1], labels[1, 2]),
    ]).mean()
    torch.testing.assert_close(next_token_ce(logits, labels), expected)
    assert next_token_ce(logits.to(torch.bfloat16), labels).dtype == torch.float32


def test_next_token_ce_no_supervision_is_zero_with_grad():
    logits = _logits(3, 4, seed=12).reshape(1, 3, 4).requires_grad_()
    out = next_token_ce(logits, torch.full((1, 3), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(logits.grad).all()
