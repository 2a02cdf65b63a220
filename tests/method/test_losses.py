"""Distribution losses (vlsi.method.losses): properties and known values, and the chunked head CE."""

import math

import pytest
import torch

from vlsi.method.losses import OPS, chunked_head_ce, log_probs, pair_loss_logprobs


def _logits(n: int = 5, v: int = 11, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


def _loss(op: str, t: torch.Tensor, s: torch.Tensor, divergence: str = "forward", labels=None) -> torch.Tensor:
    if labels is None and op == "ce":
        labels = torch.arange(s.shape[0]) % s.shape[1]
    return pair_loss_logprobs(op, log_probs(t), log_probs(s), divergence, labels=labels)


def test_ops_constant():
    assert OPS == ("kld", "ce", "l2", "none")


@pytest.mark.parametrize("op,divergence", [("kld", "forward"), ("kld", "reverse"), ("l2", "forward")])
def test_zero_for_identical_distributions(op, divergence):
    x = _logits()
    torch.testing.assert_close(_loss(op, x, x, divergence), torch.zeros(5), atol=1e-6, rtol=0)
    # a shift of the logits does not change the distribution
    torch.testing.assert_close(_loss(op, x, x + 3.0, divergence), torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", ["kld", "ce", "l2"])
def test_non_negative_float32_per_token(op):
    out = _loss(op, _logits(seed=1, dtype=torch.bfloat16), _logits(seed=2, dtype=torch.bfloat16))
    assert out.shape == (5,) and out.dtype == torch.float32
    assert (out >= 0).all() and (out > 0).any()


def test_forward_and_reverse_differ_on_asymmetric_inputs():
    t = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    s = torch.tensor([[1.0, 1.0, 0.0, -1.0]])
    fwd, rev = _loss("kld", t, s), _loss("kld", t, s, "reverse")
    assert abs(fwd.item() - rev.item()) > 1e-2
    torch.testing.assert_close(rev, _loss("kld", s, t))


def test_forward_kl_matches_torch_kl_div():
    t, s = _logits(seed=3), _logits(seed=4)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(_loss("kld", t, s), ref)


def test_ce_is_the_cross_entropy_against_the_labels_whatever_the_teacher():
    t, s = _logits(seed=5, dtype=torch.float64), _logits(seed=6, dtype=torch.float64)
    labels = torch.tensor([3, 0, 10, 3, 7])
    expected = torch.nn.functional.cross_entropy(s, labels, reduction="none")
    torch.testing.assert_close(_loss("ce", t, s, labels=labels), expected, rtol=0, atol=1e-12)
    assert _loss("ce", t, s, labels=labels).dtype == torch.float64
    # neither the teacher nor the divergence enters
    torch.testing.assert_close(_loss("ce", -3 * t, s, "reverse", labels=labels), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(pair_loss_logprobs("ce", None, log_probs(s), labels=labels), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pass labels"):
        pair_loss_logprobs("ce", log_probs(t), log_probs(s))


def test_l2_known_value():
    # P = [1/2, 1/2], Q = [1/4, 3/4]  ->  (1/4)^2 + (1/4)^2 = 1/8
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, math.log(3.0)]])
    torch.testing.assert_close(_loss("l2", t, s), torch.tensor([0.125]))


def test_kl_known_value():
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(_loss("kld", t, s), torch.tensor([expected]))


def test_bad_ops_are_refused():
    t, s = log_probs(_logits(seed=7)), log_probs(_logits(seed=8))
    with pytest.raises(ValueError, match="supported: kld, ce, l2, none"):
        pair_loss_logprobs("mse", t, s)
    with pytest.raises(ValueError, match="divergence"):
        pair_loss_logprobs("kld", t, s, divergence="sideways")
    with pytest.raises(ValueError, match="none"):
        pair_loss_logprobs("none", t, s)


def test_student_gradient_of_forward_kl_is_q_minus_p():
    t, s = _logits(seed=9), _logits(seed=10).requires_grad_()
    _loss("kld", t, s).sum().backward()
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - torch.softmax(t, -1))


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_head_ce_equals_plain_ce(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 13).requires_grad_(False)
    y = torch.randn(7, 6, requires_grad=True)
    targets = torch.randint(0, 13, (7,))
    chunked = chunked_head_ce(y, targets, head, chunk)
    (grad,) = torch.autograd.grad(chunked * 2.0, y)
    y_ref = y.detach().requires_grad_()
    plain = torch.nn.functional.cross_entropy(head(y_ref), targets, reduction="sum")
    (ref,) = torch.autograd.grad(plain * 2.0, y_ref)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(grad, ref)
    assert head.weight.grad is None


def test_chunked_head_ce_without_tokens_is_a_connected_zero():
    head = torch.nn.Linear(4, 5, bias=False).requires_grad_(False)
    y = torch.zeros(0, 4, requires_grad=True)
    loss = chunked_head_ce(y, torch.zeros(0, dtype=torch.long), head)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert y.grad.shape == (0, 4)
