"""Chunked interaction loss against the naive full-tensor reference."""

import itertools

import pytest
import torch

from vlsi.method.interaction import InteractionResult, interaction_loss, naive_interaction_loss
from vlsi.method.matching import needed_mask

torch.set_num_threads(1)

V, PAD = 37, 3  # shared vocabulary and extra (padding) logits the callables also return
T_S, T_L, N = 3, 6, 13  # N = 13 tokens: chunk sizes 4 and 5 do not divide it


class TinyVerbalizers:
    """Frozen per-token verbalizers: ``head(norm(h + tanh(h A_index)))``; index ``t`` = head only."""

    def __init__(self, layers: int, width: int, seed: int, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(layers, width, width, generator=g, dtype=dtype) / width**0.5
        self.head = torch.randn(V + PAD, width, generator=g, dtype=dtype) * 1.5
        self.layers = layers
        self.calls: list[tuple[int, int]] = []  # (index, tokens) of every call

    def __call__(self, index: int, h: torch.Tensor) -> torch.Tensor:
        self.calls.append((index, h.shape[0]))
        if index < self.layers:
            h = h + torch.tanh(h @ self.mix[index])
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h @ self.head.T


def _setup(n=N, t_s=T_S, t_l=T_L, d_s=8, d_t=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    student_hidden = torch.randn(t_s + 1, n, d_s, generator=g, dtype=dtype).requires_grad_()
    teacher_hidden = torch.randn(t_l + 1, n, d_t, generator=g, dtype=dtype)
    return (student_hidden, teacher_hidden,
            TinyVerbalizers(t_s, d_s, seed, dtype), TinyVerbalizers(t_l, d_t, seed + 1, dtype))


def _labels(n: int, seed: int = 7) -> torch.Tensor:
    """Ground-truth ids long ``[n]`` for the ``ce`` op."""
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def _run(fn, student_hidden, teacher_hidden, s_fn, t_fn, **kwargs) -> tuple[InteractionResult, torch.Tensor]:
    """Loss result and the gradient it gives to ``student_hidden`` (labels for ``ce`` by default)."""
    kwargs.setdefault("labels", _labels(student_hidden.shape[1]))
    student_hidden.grad = None
    result = fn(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V, **kwargs)
    result.loss.backward()
    grad = student_hidden.grad.clone() if student_hidden.grad is not None else torch.zeros_like(student_hidden)
    return result, grad


def _compare(kwargs_chunked: dict, *, dtype=torch.float64, atol=1e-10, rtol=1e-10, d_t=8, **shape):
    """Chunked with its own selection, naive with the same weights: loss, grad, logs agree."""
    student_hidden, teacher_hidden, s_fn, t_fn = _setup(dtype=dtype, d_t=d_t, **shape)
    chunked, g_chunked = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn,
                              generator=torch.Generator().manual_seed(0), **kwargs_chunked)
    naive_kwargs = {k: v for k, v in kwargs_chunked.items() if k != "chunk_size"}
    naive, g_naive = _run(naive_interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn,
                          weights=chunked.weights, **naive_kwargs)
    torch.testing.assert_close(chunked.loss, naive.loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_chunked, g_naive, atol=atol, rtol=rtol)
    torch.testing.assert_close(chunked.kld, naive.kld, equal_nan=True, atol=max(atol, 1e-6), rtol=1e-5)
    torch.testing.assert_close(chunked.pair_losses, naive.pair_losses, atol=max(atol, 1e-6), rtol=1e-5)
    assert abs(chunked.last_loss - naive.last_loss) <= max(atol, 1e-6) * (1 + abs(naive.last_loss))
    return chunked, naive, g_chunked


@pytest.mark.parametrize("intermediate_op,last_op", list(itertools.product(["kld", "ce", "l2", "none"], repeat=2)))
def test_chunked_equals_naive_every_op(intermediate_op, last_op):
    chunked, _, grad = _compare(dict(intermediate_op=intermediate_op, last_op=last_op, chunk_size=5))
    if intermediate_op == "none" and last_op == "none":
        assert chunked.loss.item() == 0.0 and not grad.any()
    else:
        assert chunked.loss.item() > 0 and grad.abs().sum() > 0
    # rows without a selected pair, and the last slot without a last op, get no gradient
    assert grad[:T_S].abs().sum().item() > 0 if intermediate_op != "none" else not grad[:T_S].any()
    assert grad[T_S].abs().sum().item() > 0 if last_op != "none" else not grad[T_S].any()


@pytest.mark.parametrize("op", ["kld", "ce", "l2"])
def test_chunked_equals_naive_reverse_kl(op):
    chunked, naive, _ = _compare(dict(divergence="reverse", intermediate_op=op, last_op="kld", chunk_size=4))
    # reverse scores differ from forward ones
    forward, _, _ = _compare(dict(divergence="forward", intermediate_op=op, chunk_size=4))
    band = needed_mask("vlsi", T_S, T_L)
    assert not torch.allclose(chunked.kld[band], forward.kld[band])


@pytest.mark.parametrize("strategy", ["vlsi", "bottom-k", "uniform", "random", "multinomial", "multinomial+range"])
@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
def test_chunked_equals_naive_strategies_and_chunks(strategy, chunk_size):
    kwargs = dict(strategy=strategy, chunk_size=chunk_size)
    if strategy == "bottom-k":
        kwargs["matching_kwargs"] = {"k": 2}  # two terms per student layer, weight 1/2 each
    chunked, _, _ = _compare(kwargs)
    torch.testing.assert_close(chunked.weights.sum(dim=1), torch.ones(T_S))


def test_float32_chunked_equals_naive():
    _compare(dict(chunk_size=5, intermediate_op="kld", last_op="ce"), dtype=torch.float32, atol=1e-5, rtol=1e-5)


def test_student_and_teacher_of_different_widths():
    chunked, _, _ = _compare(dict(chunk_size=5), d_s=6, d_t=11)
    assert chunked.loss.item() > 0


@pytest.mark.parametrize("strategy", ["vlsi", "bottom-k", "uniform", "random"])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_scoring_pass_matches_naive_kld_on_needed_entries(strategy, divergence):
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    kwargs = dict(strategy=strategy, divergence=divergence, vocab_size=V)
    chunked = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, chunk_size=4, **kwargs)
    naive = naive_interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, **kwargs)
    needed = needed_mask(strategy, T_S, T_L)
    assert torch.isnan(chunked.kld[~needed]).all()
    assert torch.isfinite(chunked.kld[needed]).all()
    torch.testing.assert_close(chunked.kld[needed], naive.kld[needed], rtol=1e-6, atol=1e-7)
    # KL is positive on these random verbalizers
    assert (chunked.kld[needed] > 0).all()


def test_loss_is_weighted_pair_losses_plus_last():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    result = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V,
                              strategy="bottom-k", chunk_size=4)
    expected = (result.weights.double() * result.pair_losses.double()).sum() + result.last_loss
    torch.testing.assert_close(result.loss, expected, atol=1e-6, rtol=1e-6)
    assert not result.pair_losses[result.weights == 0].any()
    assert set(result.seconds) == {"scoring", "gradient"} and min(result.seconds.values()) >= 0
    # with op kld the selected pair losses are the selection's KLD scores
    selected = result.weights > 0
    torch.testing.assert_close(result.pair_losses[selected], result.kld[selected], rtol=1e-5, atol=1e-7)


def test_zero_response_tokens():
    for fn in (interaction_loss, naive_interaction_loss):
        student_hidden, teacher_hidden, s_fn, t_fn = _setup(n=0)
        result, grad = _run(fn, student_hidden, teacher_hidden, s_fn, t_fn)
        assert result.loss.item() == 0.0 and result.loss.requires_grad
        assert torch.isfinite(grad).all() and grad.shape == student_hidden.shape
        assert result.last_loss == 0.0 and not result.weights.any()
        assert s_fn.calls == [] and t_fn.calls == []


def test_chunks_bound_the_tokens_per_call():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup(n=23)
    interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V, chunk_size=5).loss.backward()
    assert max(n for _, n in s_fn.calls + t_fn.calls) == 5
    assert sum(n for i, n in s_fn.calls if i == T_S) == 23  # the last layer once per token


def test_scoring_skipped_when_nothing_is_needed():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    result = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V, strategy="random",
                              generator=torch.Generator().manual_seed(0), chunk_size=4)
    assert torch.isnan(result.kld).all()
    # each student layer is run once per chunk (the gradient pass only)
    assert sum(1 for i, _ in s_fn.calls if i == 0) == 4
    result = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V,
                              intermediate_op="none", chunk_size=4)
    assert not result.weights.any() and torch.isnan(result.kld).all()


def test_padding_logits_past_vocab_are_ignored():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    base = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V, strategy="uniform")

    def loud(fn):
        def wrapped(index, h):
            logits = fn(index, h).clone()
            logits[:, V:] = 1e4  # would dominate every softmax if it were not cut
            return logits
        return wrapped

    cut = interaction_loss(student_hidden, teacher_hidden, loud(s_fn), loud(t_fn), vocab_size=V, strategy="uniform")
    torch.testing.assert_close(cut.loss, base.loss)
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V + PAD + 1)


def test_trainable_student_parameters_are_rejected():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    s_fn.head.requires_grad_()
    with pytest.raises(ValueError, match="require grad"):
        interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V)
    # without a gradient to compute there is nothing to lose
    with torch.no_grad():
        interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V)


def test_no_grad_input_gives_plain_value():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    with_grad = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V, strategy="uniform")
    plain = interaction_loss(student_hidden.detach(), teacher_hidden, s_fn, t_fn, vocab_size=V, strategy="uniform")
    assert not plain.loss.requires_grad
    torch.testing.assert_close(plain.loss, with_grad.loss.detach())


def test_backward_scales_by_incoming_gradient_and_runs_once():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    _, grad = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, strategy="uniform")
    student_hidden.grad = None
    loss = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V, strategy="uniform").loss
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(student_hidden.grad, 3.0 * grad)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_same_generator_same_selection_as_naive():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup(t_s=4, t_l=12)
    kwargs = dict(vocab_size=V, strategy="vlsi")
    a = interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, generator=torch.Generator().manual_seed(5), **kwargs)
    b = naive_interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a.weights, b.weights)


def test_input_errors():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    call = lambda **kw: interaction_loss(*kw.pop("hidden", (student_hidden, teacher_hidden)), s_fn, t_fn,
                                         **{"vocab_size": V, **kw})
    with pytest.raises(ValueError, match="intermediate_op"):
        call(intermediate_op="mse")
    with pytest.raises(ValueError, match="last_op"):
        call(last_op="kl")
    with pytest.raises(ValueError, match="divergence"):
        call(divergence="js")
    with pytest.raises(ValueError, match="supported: random"):
        call(strategy="best")
    with pytest.raises(ValueError, match="response tokens"):
        call(hidden=(student_hidden, teacher_hidden[:, :5]))
    with pytest.raises(ValueError, match="t_s <= t_l"):
        call(hidden=(student_hidden, teacher_hidden[:2]))
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)
    with pytest.raises(ValueError, match="weights must be"):
        call(weights=torch.ones(T_S, T_L + 1))
    # a student with more layers than the teacher is fine without an intermediate term
    call(hidden=(student_hidden, teacher_hidden[:2]), intermediate_op="none")
