"""The ``ce`` op: cross-entropy of the student against the ground-truth tokens (docs/method.md#ops).

The chunked loss (closed-form logit gradient ``Q - onehot(y)``) against plain autograd: in
float64 against :func:`naive_interaction_loss`, and in float32 against a float64 reference
written from the formula, on a confident student, huge logits, masked ids and no response token.
"""

import math

import pytest
import torch

from vlsi.method.interaction import interaction_loss, naive_interaction_loss
from vlsi.method.losses import label_ce_and_logit_grad, pair_loss_and_logit_grad
from vlsi.method.verbalizer import prediction_positions, response_labels
from vlsi.train.config import ConfigError, load_config

from test_interaction import T_S, V, _labels, _run, _setup
from test_loss_numerics import assert_close_rel, identity
from test_sparse_teacher import sparse_from

torch.set_num_threads(1)


def ref_ce_loss(student_logits, weights, labels, intermediate=True, last=True):
    """``sum W[i, j] mean CE(Q_i, y) + mean CE(Q_last, y)`` in float64 and its gradient to the
    student logits ``[t_s + 1, N, V]`` (plain autograd)."""
    z = student_logits.detach().double().requires_grad_()
    log_q = torch.log_softmax(z, dim=-1)
    ce = lambda i: -log_q[i].gather(1, labels.unsqueeze(1)).mean()  # noqa: E731
    loss = ce(z.shape[0] - 1) if last else z.sum() * 0
    if intermediate:
        for i, j in weights.nonzero().tolist():
            loss = loss + float(weights[i, j]) * ce(i)
    loss.backward()
    return loss.detach(), z.grad


def chunked(student_logits, teacher_logits, labels, *, dtype=torch.float32, **kwargs):
    z = student_logits.detach().to(dtype).requires_grad_()
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    result = interaction_loss(z, teacher_logits.to(dtype), identity, identity, vocab_size=z.shape[-1], labels=labels,
                              **kwargs)
    result.loss.backward()
    return result, z.grad


# ----------------------------------------------------------------------------- float64: chunked = naive


@pytest.mark.parametrize("ops", [("ce", "ce"), ("ce", "kld"), ("kld", "ce"), ("ce", "none"), ("none", "ce"),
                                 ("ce", "l2"), ("l2", "ce")])
@pytest.mark.parametrize("strategy,chunk_size", [("vlsi", 4), ("bottom-k", 5), ("uniform", 1), ("random", 64)])
def test_chunked_equals_naive_in_float64(ops, strategy, chunk_size):
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    kwargs = dict(intermediate_op=ops[0], last_op=ops[1], strategy=strategy)
    if strategy == "bottom-k":
        kwargs["matching_kwargs"] = {"k": 2}  # two ce terms on the same student layer
    chunked_result, g_chunked = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn,
                                     chunk_size=chunk_size, generator=torch.Generator().manual_seed(0), **kwargs)
    naive, g_naive = _run(naive_interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn,
                          weights=chunked_result.weights, **kwargs)
    torch.testing.assert_close(chunked_result.loss, naive.loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_chunked, g_naive, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(chunked_result.pair_losses, naive.pair_losses, atol=1e-6, rtol=1e-6)
    assert abs(chunked_result.last_loss - naive.last_loss) < 1e-9
    assert g_chunked.abs().sum() > 0


def test_ce_trains_on_the_labels_and_reads_no_teacher_in_the_gradient_pass():
    """Pair losses are each student layer's own CE whichever teacher layer is paired; the teacher
    only decides the pairs, and the gradient pass calls no teacher verbalizer for them."""
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    labels = _labels(student_hidden.shape[1])
    result, grad = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, intermediate_op="ce",
                        last_op="ce", strategy="vlsi", generator=torch.Generator().manual_seed(0), chunk_size=4)
    for i in range(T_S + 1):
        log_q = torch.log_softmax(s_fn(i, student_hidden[i].detach())[:, :V], dim=-1)
        own = float(torch.nn.functional.nll_loss(log_q, labels))
        if i < T_S:
            assert result.pair_losses[i][result.weights[i] > 0].tolist() == pytest.approx([own], rel=1e-6)
        else:
            assert result.last_loss == pytest.approx(own, rel=1e-9)
    # another teacher with the same weights: the same loss and gradient
    other = teacher_hidden * -2 + 1
    t_fn.calls.clear()
    again, grad_again = _run(interaction_loss, student_hidden, other, s_fn, t_fn, intermediate_op="ce", last_op="ce",
                             weights=result.weights, strategy="random", chunk_size=4)
    assert t_fn.calls == []  # `random` scores nothing, and ce reads no teacher
    torch.testing.assert_close(again.loss, result.loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_again, grad, atol=1e-12, rtol=1e-12)


def test_ce_rows_are_not_kld_rows():
    """The point of the op: the CE and KLD losses, and their gradients, differ."""
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    weights = torch.zeros(T_S, 6)
    weights[torch.arange(T_S), torch.tensor([0, 2, 4])] = 1.0
    ce, g_ce = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, intermediate_op="ce",
                    last_op="ce", weights=weights)
    kld, g_kld = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, weights=weights)
    assert abs(float(ce.loss.detach()) - float(kld.loss.detach())) > 0.1
    assert (g_ce - g_kld).abs().max() > 0.1 * g_kld.abs().max()


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_the_divergence_changes_the_scores_not_the_ce(divergence):
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    weights = torch.zeros(T_S, 6)
    weights[torch.arange(T_S), torch.tensor([1, 2, 5])] = 1.0
    base, g_base = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, intermediate_op="ce",
                        last_op="ce", weights=weights)
    other, g_other = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, intermediate_op="ce",
                          last_op="ce", weights=weights, divergence=divergence)
    torch.testing.assert_close(other.loss, base.loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_other, g_base, atol=1e-12, rtol=1e-12)


def test_ce_with_a_teacher_cache_equals_ce_with_the_teacher():
    """A top-K teacher gives the same KLD scores at K = V, so the same pairs and the same CE."""
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    kwargs = dict(intermediate_op="ce", last_op="ce", chunk_size=5)
    online, g_online = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn,
                            generator=torch.Generator().manual_seed(0), **kwargs)
    cached, g_cached = _run(interaction_loss, student_hidden, sparse_from(teacher_hidden, t_fn, V), s_fn, None,
                            generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(cached.weights, online.weights)
    torch.testing.assert_close(cached.loss, online.loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_cached, g_online, atol=1e-12, rtol=1e-12)
    # K = 2: other scores, but each selected pair still costs its student layer's CE
    small, _ = _run(interaction_loss, student_hidden, sparse_from(teacher_hidden, t_fn, 2), s_fn, None,
                    generator=torch.Generator().manual_seed(0), **kwargs)
    rows = lambda r: (r.pair_losses * (r.weights > 0)).sum(dim=1)  # noqa: E731
    torch.testing.assert_close(rows(small), rows(online), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- float32 against float64


def _student(kind: str, labels: torch.Tensor, t_s=2, n=10, V=400, seed=0):
    """Student logits ``[t_s + 1, n, V]`` of one adversarial kind."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t_s + 1, n, V, generator=g) * 3
    rows = torch.arange(n)
    if kind == "confident_right":  # 1 - Q_y below 1e-8: Q_y - 1 would cancel in float32, not in float64
        z[:, rows, labels] += 25.0
    elif kind == "confident_wrong":  # label probability ~e^-40
        z[:, rows, (labels + 1) % V] += 40.0
    elif kind == "huge":
        z = z + 3e4
    elif kind == "huge_spread":
        z = torch.rand(t_s + 1, n, V, generator=g) * 1e4
    return z


@pytest.mark.parametrize("kind", ["random", "confident_right", "confident_wrong", "huge", "huge_spread"])
@pytest.mark.parametrize("ops", [("ce", "ce"), ("ce", "none"), ("none", "ce")])
def test_float32_matches_float64(kind, ops):
    n, V = 10, 400
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1))
    student = _student(kind, labels, n=n, V=V)
    teacher = torch.randn(5, n, V, generator=torch.Generator().manual_seed(2)) * 3
    result, grad = chunked(student, teacher, labels, intermediate_op=ops[0], last_op=ops[1], chunk_size=3)
    loss, ref_grad = ref_ce_loss(student, result.weights, labels, ops[0] == "ce", ops[1] == "ce")
    assert torch.isfinite(result.loss) and torch.isfinite(grad).all()
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(grad, ref_grad, 1e-5)


def test_confident_student_gradient_at_the_label_does_not_cancel():
    """Q_y rounds to 1 in float32; the gradient there is still ``-(1 - Q_y)``, to float32 rounding."""
    V = 1000
    z = torch.zeros(1, V)
    z[0, 3] = 25.0
    q = torch.softmax(z, -1)
    assert q[0, 3] == 1.0  # float32: the naive Q_y - 1 is 0
    grad = torch.zeros_like(z)
    log_q = torch.log_softmax(z, -1)
    loss = label_ce_and_logit_grad(log_q, q, torch.tensor([3]), torch.empty_like(z), grad)
    rest = 999 * math.exp(-25) / (1 + 999 * math.exp(-25))
    assert float(loss) == pytest.approx(math.log1p(999 * math.exp(-25)), rel=1e-6)
    assert float(grad[0, 3]) == pytest.approx(-rest, rel=1e-6)
    assert float(grad[0].sum()) == pytest.approx(0.0, abs=1e-12)


def test_pair_loss_and_logit_grad_dispatches_ce_to_the_labels():
    z = torch.randn(4, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 8, 3, 3])
    log_q = torch.log_softmax(z.detach(), -1)
    grad = torch.zeros_like(log_q)
    loss = pair_loss_and_logit_grad("ce", None, log_q, log_q.exp(), torch.empty_like(log_q), grad, weight=0.5,
                                    labels=labels)
    reference = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    (0.5 * reference.sum()).backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, z.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pass labels"):
        pair_loss_and_logit_grad("ce", log_q, log_q, log_q.exp(), torch.empty_like(log_q))


def test_masked_ids_give_finite_exact_results():
    n, V = 9, 300
    g = torch.Generator().manual_seed(3)
    masked = torch.randperm(V, generator=g)[: V // 10]
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[masked] = False
    labels = allowed.nonzero().squeeze(1)[torch.randint(0, int(allowed.sum()), (n,), generator=g)]
    student = torch.randn(3, n, V, generator=g) * 3
    teacher = torch.randn(5, n, V, generator=g) * 3
    student[..., masked] = float("-inf")
    teacher[..., masked] = float("-inf")
    result, grad = chunked(student, teacher, labels, intermediate_op="ce", last_op="ce", chunk_size=4)
    loss, ref_grad = ref_ce_loss(student, result.weights, labels)
    assert torch.isfinite(result.loss) and torch.isfinite(grad).all()
    assert not grad[..., masked].any()
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(grad, ref_grad, 1e-5)


def test_a_label_the_student_masks_is_a_huge_loss_not_nan():
    n, V = 4, 50
    labels = torch.tensor([0, 1, 2, 3])
    student = torch.randn(2, n, V, generator=torch.Generator().manual_seed(4))
    student[..., 0] = float("-inf")
    result, grad = chunked(student, student.clone(), labels, intermediate_op="none", last_op="ce")
    assert float(result.loss.detach()) > 1e30 and torch.isfinite(grad).all()


def test_only_label_left_unmasked_costs_nothing():
    """Every other id masked: Q_y = 1 exactly, loss and gradient 0."""
    z = torch.full((2, 3, 20), float("-inf"))
    labels = torch.tensor([4, 4, 7])
    z[:, torch.arange(3), labels] = 5.0
    result, grad = chunked(z, torch.randn(2, 3, 20), labels, intermediate_op="ce", last_op="ce", strategy="uniform")
    assert float(result.loss.detach()) == 0.0 and not grad.any()


def test_no_response_token():
    for fn in (interaction_loss, naive_interaction_loss):
        student_hidden, teacher_hidden, s_fn, t_fn = _setup(n=0)
        result, grad = _run(fn, student_hidden, teacher_hidden, s_fn, t_fn, intermediate_op="ce", last_op="ce")
        assert result.loss.item() == 0.0 and result.loss.requires_grad and not grad.any()


# ----------------------------------------------------------------------------- inputs and config


def test_labels_are_checked():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    call = lambda labels, **kw: interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V,  # noqa: E731
                                                 labels=labels, **{"intermediate_op": "ce", **kw})
    with pytest.raises(ValueError, match="pass labels"):
        call(None)
    with pytest.raises(ValueError, match="pass labels"):
        naive_interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V, last_op="ce")
    with pytest.raises(ValueError, match=r"labels must be long \[13\]"):
        call(_labels(12))
    with pytest.raises(ValueError, match=r"labels must be long"):
        call(_labels(13).float())
    with pytest.raises(ValueError, match="vocab_size=37"):
        call(_labels(13) + V)
    # no ce op: labels are not needed
    interaction_loss(student_hidden, teacher_hidden, s_fn, t_fn, vocab_size=V)


def test_response_labels_are_the_next_tokens_of_the_compared_positions():
    labels = torch.tensor([[-100, -100, 5, 6, 2, -100],
                           [-100, 9, 2, -100, -100, -100]])
    positions = prediction_positions(labels)
    assert response_labels(labels, positions).tolist() == [5, 6, 2, 9, 2]
    assert response_labels(labels[:, :0], positions[:, :0]).tolist() == []


def _config(tmp_path, interaction: str):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\nstudent: s\noutput_dir: out\ndata: {train: [x.json]}\ninteraction: " + interaction)
    return load_config(path)


def test_config_refuses_ce_on_policy_and_allows_ce_with_a_cache(tmp_path):
    with pytest.raises(ConfigError, match=r"^interaction\.on_policy: op 'ce' trains on the ground-truth") as err:
        _config(tmp_path, "{intermediate_op: ce, on_policy: 0.5}\n")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="op 'ce'"):
        _config(tmp_path, "{last_op: ce, on_policy: 1.0}\n")
    assert _config(tmp_path, "{intermediate_op: ce, last_op: ce, teacher_cache: c}\n").interaction.last_op == "ce"
    assert _config(tmp_path, "{on_policy: 0.5}\n").interaction.on_policy == 0.5
