"""The chunked loss issues no host-device synchronisation per chunk (issue 21, item 5).

On CUDA, indexing a device tensor with a Python list copies the list to the device, a boolean
mask costs a ``nonzero`` sync, and ``item``/``tolist``/``cpu`` wait for the device. The audit
below sees every such call inside the loss on the CPU: list and boolean-mask indexing must not
happen at all, and the other calls must not grow with the number of chunks.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vlsi.method.interaction import interaction_loss

from test_interaction import T_L, T_S, V, _setup

torch.set_num_threads(1)

INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}
SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.__bool__,
           torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.cpu, torch.Tensor.any, torch.Tensor.all}


class HostSyncAudit(TorchFunctionMode):
    """Records list / boolean-mask indexing and the calls that wait for the device."""

    def __init__(self):
        super().__init__()
        self.mask_indexing: list[str] = []
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in INDEXING and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            for part in index:
                if isinstance(part, list) or (torch.is_tensor(part) and part.dtype == torch.bool):
                    self.mask_indexing.append(f"{func.__name__}[{type(part).__name__}]")
        if func in SYNCING:
            self.syncs.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _audit(chunk_size: int, sparse: bool, **kwargs) -> HostSyncAudit:
    student_hidden, teacher_hidden, s_fn, t_fn = _setup()
    teacher = teacher_hidden
    if sparse:
        from test_sparse_teacher import sparse_from
        teacher, t_fn = sparse_from(teacher_hidden, t_fn, 4), None
    audit = HostSyncAudit()
    with audit:
        result = interaction_loss(student_hidden, teacher, s_fn, t_fn, vocab_size=V, chunk_size=chunk_size,
                                  generator=torch.Generator().manual_seed(0), **kwargs)
    result.loss.backward()
    return audit


@pytest.mark.parametrize("sparse, divergence", [(False, "forward"), (False, "reverse"), (True, "forward")])
def test_no_list_or_mask_indexing_and_no_sync_per_chunk(sparse, divergence):
    weights = torch.zeros(T_S, T_L)
    weights[torch.arange(T_S), torch.tensor([1, 3, 4])] = 1.0
    one_chunk = _audit(10**6, sparse, weights=weights, divergence=divergence)  # 13 tokens: one chunk
    many_chunks = _audit(3, sparse, weights=weights, divergence=divergence)  # five chunks
    assert many_chunks.mask_indexing == [] and one_chunk.mask_indexing == []
    assert sorted(many_chunks.syncs) == sorted(one_chunk.syncs), (one_chunk.syncs, many_chunks.syncs)


def test_syncs_do_not_grow_with_chunks_with_the_matching_too():
    one_chunk, many_chunks = _audit(10**6, False, strategy="vlsi"), _audit(3, False, strategy="vlsi")
    assert sorted(many_chunks.syncs) == sorted(one_chunk.syncs)
