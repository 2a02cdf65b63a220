"""vlsi.train.distributed without a process group: footprints, engine names, the FSDP1 refusal.

The collectives (ZeRO-3 engines, FSDP2 sharding, gathering) run in two processes in
tests/train/stages/test_engines.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlsi.errors import VlsiError
from vlsi.train.distributed import describe_footprint, engine_name, parameter_footprint, place_frozen_model


def _trainer(processes: int = 1, zero_stage: int | None = None, fsdp_version: int | None = None):
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage),
                            fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version, reshard_after_forward=True,
                                                        mixed_precision_policy=None))
    return SimpleNamespace(accelerator=SimpleNamespace(num_processes=processes, state=state),
                           is_deepspeed_enabled=zero_stage is not None, is_fsdp_enabled=fsdp_version is not None,
                           args=SimpleNamespace(device=torch.device("cpu")))


def test_footprint_counts_shared_parameters_once_and_their_dtype():
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100, bias=False))
    model[1].weight = model[0].weight  # tied, as an LM head and its embeddings
    assert parameter_footprint(model) == (800, 800 * 4)
    assert parameter_footprint(model.to(torch.bfloat16)) == (800, 800 * 2)


def test_describe_footprint_line():
    model = nn.Linear(1000, 2000, bias=False)  # 2M float32 parameters, 8 MB
    assert describe_footprint("teacher", model, _trainer()) == "teacher: 2.0M params, 8.0 MB per process under one process"
    assert describe_footprint("teacher", nn.Linear(10, 100, bias=False), _trainer(2)) == (
        "teacher: 1.0K params, 4.0 KB per process under DDP x 2")


@pytest.mark.parametrize("kwargs, name", [
    (dict(), "one process"), (dict(processes=2), "DDP x 2"), (dict(processes=8, zero_stage=3), "ZeRO-3 x 8"),
    (dict(processes=4, zero_stage=2), "ZeRO-2 x 4"), (dict(processes=2, fsdp_version=2), "FSDP2 x 2")])
def test_engine_name(kwargs, name):
    assert engine_name(_trainer(**kwargs)) == name


def test_fsdp1_is_refused_for_frozen_models():
    with pytest.raises(VlsiError, match="FSDP1 would hold the whole frozen teacher on every process"):
        place_frozen_model(_trainer(2, fsdp_version=1), nn.Linear(2, 2))


def test_frozen_model_without_engine_is_moved_and_frozen():
    model = place_frozen_model(_trainer(), nn.Linear(2, 2))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
