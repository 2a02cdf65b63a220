"""Where frozen models and sharded parameters live under one process, DDP, DeepSpeed and FSDP.

The trained model is placed by the transformers ``Trainer`` (accelerate); this module places
what the Trainer does not know about (the teacher, the verbalized backbone), gathers sharded
heads and norms while the chunked losses use them, and loads verbalizers onto a backbone
whose weights may still be on the meta device.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import Trainer

from vlsi.backbones import Backbone
from vlsi.verbalizer import WEIGHTS_NAME, VerbalizerSet


def is_main_process() -> bool:
    """Global rank 0 (``accelerate launch``/``torchrun`` set ``RANK``), also before any Trainer."""
    return int(os.environ.get("RANK", "0")) == 0


def place_frozen_model(trainer: Trainer, model: nn.Module) -> nn.Module:
    """Place a frozen model (teacher, or the verbalized backbone) beside the trained one.

    Returns what to call for its forward:

    * one process or DDP: the model itself, moved to the trainer's device (DDP needs no
      wrapper: nothing is reduced for a model without gradient);
    * DeepSpeed ZeRO-3: an inference-only DeepSpeed engine built from the trainer's DeepSpeed
      config without optimizer and scheduler (offload settings kept), so the frozen model is
      partitioned like the trained one, as TRL's ``prepare_deepspeed`` does for reference
      models; ZeRO-1/2 shard only optimizer state, so the model is just moved to the device;
    * FSDP: ``accelerator.prepare_model(model, evaluation_mode=True)`` (device placement and
      mixed precision; accelerate does not shard in evaluation mode, so the frozen model is
      replicated on every device; use ZeRO-3 for a teacher that does not fit one device).
      With ``cpu_ram_efficient_loading`` transformers loads the weights on the first process
      only (the others hold meta tensors until FSDP's wrapping broadcasts them); a model that
      is not wrapped gets them by :func:`_broadcast_from_first_process`.

    Written against deepspeed's ``initialize`` and accelerate's ``prepare_model``; what has run
    under which engine is in the README's multi-GPU section.
    """
    model.requires_grad_(False).eval()
    if trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            return _deepspeed_inference_engine(model, plugin.deepspeed_config)
        return model.to(trainer.args.device)
    if trainer.is_fsdp_enabled:
        if trainer.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            _broadcast_from_first_process(model, trainer.args.device)
        return trainer.accelerator.prepare_model(model, evaluation_mode=True)
    return model.to(trainer.args.device)


def _broadcast_from_first_process(model: nn.Module, device: torch.device) -> None:
    """Give every process the first process's weights (the others loaded meta tensors)."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        model.to_empty(device=device)
    else:
        model.to(device)
    for t in [*model.parameters(), *model.buffers()]:  # same order on every process
        torch.distributed.broadcast(t.data, src=0)


def _deepspeed_inference_engine(model: nn.Module, ds_config: dict[str, Any]) -> nn.Module:
    """``deepspeed.initialize`` with no optimizer: a ZeRO-3 partitioned, forward-only engine."""
    import deepspeed

    config = copy.deepcopy(ds_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config["zero_optimization"]
    # transformers resolves "auto" bucket sizes for the trained model only; size these from the
    # frozen model's width, with TRL's values for reference models.
    d = int(model.config.get_text_config().hidden_size)
    for key, value in (("reduce_bucket_size", d * d),
                       ("stage3_prefetch_bucket_size", int(0.9 * d * d)),
                       ("stage3_param_persistence_threshold", 10 * d)):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def whole_parameters(trainer: Trainer, modules: list[nn.Module], fsdp_root: nn.Module | None = None) -> Iterator[None]:
    """Make the parameters of ``modules`` whole while they are used outside their model's forward.

    The chunked losses call the backbones' final norms and LM heads (and verbalizers) on hidden
    states after the forward, where ZeRO-3 and FSDP leave parameters sharded:

    * ZeRO-3: ``deepspeed.zero.GatheredParameters`` (read-only, every process) for the duration.
      Both chunked losses finish their head's backward inside the context (the gradient w.r.t.
      the hidden states is computed in the forward), so no gather is needed in ``backward``.
    * FSDP (``fsdp_root`` given, the trainer's wrapped model): the FSDP units that own the
      modules are unsharded without writeback (FSDP1 ``summon_full_params(recurse=False)``,
      FSDP2 ``unshard``/``reshard``); with the default wrap policy that is the root unit
      (embeddings, final norm, LM head), never the decoder layers.
    * otherwise nothing to do.

    """
    with contextlib.ExitStack() as stack:
        if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            for module in modules:
                stack.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None))
        elif trainer.is_fsdp_enabled and fsdp_root is not None:
            for unit in _fsdp_owners(fsdp_root, modules):
                stack.enter_context(_unsharded(unit))
        yield


def _fsdp_owners(root: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """For each module, the innermost FSDP unit (FSDP1 or FSDP2) that contains it."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    units = [m for m in root.modules() if isinstance(m, (FullyShardedDataParallel, FSDPModule))]
    owners: list[nn.Module] = []
    for target in modules:
        # modules() is pre-order, so among the units holding the target the last is innermost
        holding = [u for u in units if any(sub is target for sub in u.modules())]
        if holding and not any(holding[-1] is o for o in owners):
            owners.append(holding[-1])
    return owners


@contextlib.contextmanager
def _unsharded(unit: nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(unit, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            yield
        return
    unit.unshard()  # FSDP2: registers the unsharded parameters until reshard()
    try:
        yield
    finally:
        unit.reshard()


def load_verbalizers(path: str | Path, backbone: Backbone) -> VerbalizerSet:
    """:meth:`VerbalizerSet.load` (fit check included), with real weights on every process.

    Under FSDP with RAM-efficient loading, all processes but the first hold the backbone on the
    meta device until FSDP broadcasts it, and a new verbalizer set follows the LM head there; the
    verbalizers are then read again from their file.
    """
    from safetensors.torch import load_file

    vset = VerbalizerSet.load(path, backbone)
    if any(p.is_meta for p in vset.parameters()):
        vset.load_state_dict(load_file(str(Path(path) / WEIGHTS_NAME)), assign=True)
        vset.to(dtype=backbone.lm_head.weight.dtype)
    return vset
