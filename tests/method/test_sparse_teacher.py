"""The chunked loss against a top-K teacher (vlsi.method.interaction.SparseTeacher)."""

import pytest
import torch

from vlsi.method.interaction import SparseTeacher, interaction_loss

from test_interaction import T_L, V, _labels, _run, _setup

torch.set_num_threads(1)


def sparse_from(teacher_hidden, t_fn, k: int) -> SparseTeacher:
    """The top-``k`` of every teacher layer, as the offline cache stores it (float64 here)."""
    ids, logp, tail = [], [], []
    for j in range(teacher_hidden.shape[0]):
        full = torch.log_softmax(t_fn(j, teacher_hidden[j])[:, :V], dim=-1)
        top = full.topk(k, dim=-1)
        ids.append(top.indices)
        logp.append(top.values)
        tail.append(full.scatter(-1, top.indices, float("-inf")).logsumexp(-1).exp())  # 0 at K = V
    return SparseTeacher(torch.stack(ids), torch.stack(logp), torch.stack(tail))


def bucketed_reference(student_hidden, s_fn, sparse: SparseTeacher, weights, op="kld", labels=None):
    """The K + 1 bucket KL (op ``kld``) or the CE against ``labels`` (op ``ce``, no teacher read),
    with plain autograd over full tensors."""
    loss = 0
    pairs = [(i, j, float(weights[i, j])) for i, j in weights.nonzero().tolist()]
    pairs.append((student_hidden.shape[0] - 1, sparse.ids.shape[0] - 1, 1.0))
    for i, j, w in pairs:
        log_q = torch.log_softmax(s_fn(i, student_hidden[i])[:, :V], dim=-1)
        if op == "ce":
            loss = loss + w * torch.nn.functional.nll_loss(log_q, labels)
            continue
        q_top = log_q.gather(1, sparse.ids[j])
        log_q_tail = log_q.scatter(1, sparse.ids[j], float("-inf")).logsumexp(-1)
        p = sparse.logp[j].exp()
        cross = (p * q_top).sum(-1) + sparse.tail[j] * log_q_tail
        per_token = (p * sparse.logp[j]).sum(-1) + torch.xlogy(sparse.tail[j], sparse.tail[j]) - cross
        loss = loss + w * per_token.mean()
    return loss


def test_k_equal_v_reproduces_the_online_loss_and_kld():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    online, g_online = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, chunk_size=5,
                            generator=torch.Generator().manual_seed(0))
    sparse = sparse_from(teacher_hidden, t_fn, V)
    cached, g_cached = _run(interaction_loss, student_hidden, sparse, s_fn, None, chunk_size=5,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cached.kld, online.kld, equal_nan=True, atol=1e-10, rtol=1e-10)
    assert torch.equal(cached.weights, online.weights)
    torch.testing.assert_close(cached.loss, online.loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_cached, g_online, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("op", ["kld", "ce"])
@pytest.mark.parametrize("k", [1, 4, 20])
def test_top_k_loss_and_gradient_are_the_bucketed_formula(op, k):
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    sparse = sparse_from(teacher_hidden, t_fn, k)
    cached, grad = _run(interaction_loss, student_hidden, sparse, s_fn, None, chunk_size=4,
                        intermediate_op=op, last_op=op, generator=torch.Generator().manual_seed(0))
    student_hidden.grad = None
    reference = bucketed_reference(student_hidden, s_fn, sparse, cached.weights, op, _labels(student_hidden.shape[1]))
    reference.backward()
    torch.testing.assert_close(cached.loss, reference.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, student_hidden.grad, atol=1e-10, rtol=1e-10)


def test_bucketed_kld_never_exceeds_the_full_kld():
    """Coarsening both distributions can only lose divergence (log-sum inequality)."""
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    online, _ = _run(interaction_loss, student_hidden, teacher_hidden, s_fn, t_fn, strategy="uniform")
    for k in (1, 4, 16):
        cached, _ = _run(interaction_loss, student_hidden, sparse_from(teacher_hidden, t_fn, k), s_fn, None,
                         strategy="uniform")
        scored = torch.isfinite(online.kld)
        assert (cached.kld[scored] <= online.kld[scored] + 1e-12).all()


def test_unsupported_ops_are_refused():
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    sparse = sparse_from(teacher_hidden, t_fn, 4)
    for kwargs in (dict(intermediate_op="l2"), dict(divergence="reverse")):
        with pytest.raises(ValueError, match="top-K teacher supports"):
            interaction_loss(student_hidden, sparse, s_fn, None, vocab_size=V, **kwargs)
    assert sparse.shape[0] == T_L + 1
