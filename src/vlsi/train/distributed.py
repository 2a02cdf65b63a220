"""Where frozen models and sharded parameters live under one process, DDP, DeepSpeed and FSDP2.

The trained model is placed by the transformers ``Trainer`` (accelerate); this module places
what the Trainer does not know about (the teacher, the verbalized backbone: partitioned under
ZeRO-3, sharded under FSDP2), reports what each process holds of them, gathers sharded heads
and norms while the chunked losses use them, gathers trained parameters whole for saving,
restores sharded FSDP checkpoints, and loads verbalizers onto a backbone whose weights may
still be on the meta device. What has run under which engine is in docs/multi_gpu.md
("What has run").
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

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import WEIGHTS_NAME, VerbalizerSet
from vlsi.models.backbones import Backbone


def is_main_process() -> bool:
    """Global rank 0 (``accelerate launch``/``torchrun`` set ``RANK``), also before any Trainer."""
    return int(os.environ.get("RANK", "0")) == 0


def place_frozen_model(trainer: Trainer, model: nn.Module) -> nn.Module:
    """Place a frozen model (teacher, or the verbalized backbone) beside the trained one.

    Returns what to call for its forward:

    * one process or DDP: the model itself, moved to the trainer's device (DDP needs no
      wrapper: nothing is reduced for a model without gradient); every process holds it whole;
    * DeepSpeed ZeRO-3: an inference-only DeepSpeed engine built from the trainer's DeepSpeed
      config without optimizer and scheduler (offload settings kept), so the frozen model is
      partitioned like the trained one, as TRL's ``prepare_deepspeed`` does for reference
      models; ZeRO-1/2 shard only optimizer state, so the model is just moved to the device;
    * FSDP2: sharded by :func:`shard_frozen_model` (one unit per block the model names in
      ``_no_split_modules``, the rest in the root unit); no optimizer state. FSDP1 is refused:
      accelerate's FSDP1 path would replicate the frozen model on every process.

    Raises:
        VlsiError: FSDP1.
    """
    model.requires_grad_(False).eval()
    if trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            return _deepspeed_inference_engine(model, plugin.deepspeed_config)
        return model.to(trainer.args.device)
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise VlsiError("FSDP1 would hold the whole frozen teacher on every process; use FSDP2 "
                            "(fsdp_version: 2, as in accelerate_configs/fsdp.yaml)")
        return shard_frozen_model(model, trainer.args.device, reshard_after_forward=plugin.reshard_after_forward,
                                  mp_policy=plugin.mixed_precision_policy)
    return model.to(trainer.args.device)


def place_frozen_verbalizers(trainer: Trainer, verbalizers: VerbalizerSet) -> VerbalizerSet:
    """Place frozen verbalizers (the teacher's) as :func:`place_frozen_model` places their backbone.

    Under ZeRO-3 a forward-only DeepSpeed engine partitions them, under FSDP2 each verbalizer is
    its own ``fully_shard`` unit; either gathers one verbalizer when it is called and frees it
    after, so they must be called in the same order on every process (the interaction step
    applies them once per micro-batch, layer after layer:
    ``VerbalizerSet.response_inputs(..., transformed=True)``). One process, DDP and ZeRO-1/2
    hold them whole on the device. Returns the set (its modules now placed).
    """
    verbalizers.requires_grad_(False).eval()
    device = trainer.args.device
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        verbalizers.to(device)
        _deepspeed_inference_engine(verbalizers, trainer.accelerator.state.deepspeed_plugin.deepspeed_config,
                                    verbalizers.backbone.hidden_size)
        return verbalizers
    if trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 2:
        from torch.distributed.fsdp import fully_shard

        plugin = trainer.accelerator.state.fsdp_plugin
        verbalizers.to(device)
        for verbalizer in verbalizers.verbalizers:
            kwargs = {"mp_policy": plugin.mixed_precision_policy} if plugin.mixed_precision_policy else {}
            fully_shard(verbalizer, reshard_after_forward=True, **kwargs)
        return verbalizers
    return verbalizers.to(device)


def shard_frozen_model(model: nn.Module, device: torch.device, *, reshard_after_forward: bool = True,
                       mp_policy: Any = None) -> nn.Module:
    """FSDP2-shard a frozen model over all processes (torch's ``fully_shard``); every process calls it.

    Units: each submodule whose class the model lists in ``_no_split_modules`` (transformers'
    decoder layers and vision blocks), then the root (embeddings, final norm, LM head, the
    rest). The trained model's FSDP plugin is neither read for the wrap classes nor changed,
    so the frozen and the trained model each wrap their own blocks.

    Where only the main process loaded weights (``cpu_ram_efficient_loading``: the others hold
    meta tensors), the shards are filled from its full state dict by
    ``set_model_state_dict(..., broadcast_from_rank0=True)`` and the buffers (not sharded)
    broadcast from it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    loaded_elsewhere = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if torch.distributed.is_initialized():
        flag = torch.tensor([float(loaded_elsewhere)], device=device)
        torch.distributed.all_reduce(flag)
        loaded_elsewhere = bool(flag.item())
    main = is_main_process()
    full_state = model.state_dict() if loaded_elsewhere and main else {}
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    kwargs = dict(reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)  # moves what is not on the meta device to the processes' device
    if loaded_elsewhere:
        if not main:
            model.to_empty(device=device)
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))
        for buffer in model.buffers():  # same order on every process
            torch.distributed.broadcast(buffer, src=0)
    return model.requires_grad_(False).eval()


def engine_name(trainer: Trainer) -> str:
    """``one process``, ``DDP``, ``ZeRO-<stage>`` or ``FSDP<version>``, with ``x <processes>``."""
    world = trainer.accelerator.num_processes
    if trainer.is_deepspeed_enabled:
        name = f"ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    elif trainer.is_fsdp_enabled:
        name = f"FSDP{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    else:
        name = "DDP" if world > 1 else "one process"
    return f"{name} x {world}" if world > 1 else name


def parameter_footprint(model: nn.Module) -> tuple[int, int]:
    """``(parameters of the whole model, bytes of them this process holds)``.

    A ZeRO-3 parameter counts its partition (``ds_tensor``), plus the whole tensor where
    DeepSpeed keeps it gathered (``ds_persist``: parameters under
    ``stage3_param_persistence_threshold``); an FSDP2 parameter (a ``DTensor``) its local
    shard; any other parameter its whole tensor. Shared (tied) parameters count once.
    """
    from torch.distributed.tensor import DTensor

    total = held = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_tensor"):
            total += p.ds_numel
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
            if getattr(p, "ds_persist", False):
                held += p.ds_numel * p.ds_tensor.element_size()
        elif isinstance(p, DTensor):
            local = p.to_local()
            total += p.numel()
            held += local.numel() * local.element_size()
        else:
            total += p.numel()
            held += p.numel() * p.element_size()
    return total, held


def describe_footprint(role: str, model: nn.Module, trainer: Trainer) -> str:
    """``"teacher: 72.7B params, 18.2 GB per process under ZeRO-3 x 8"`` for a placed model."""
    total, held = parameter_footprint(model)
    params = (f"{total / 1e9:.1f}B" if total >= 1e9 else f"{total / 1e6:.1f}M" if total >= 1e6
              else f"{total / 1e3:.1f}K")
    size = (f"{held / 1e9:.1f} GB" if held >= 1e9 else f"{held / 1e6:.1f} MB" if held >= 1e6
            else f"{held / 1e3:.1f} KB")
    return f"{role}: {params} params, {size} per process under {engine_name(trainer)}"


def _deepspeed_inference_engine(model: nn.Module, ds_config: dict[str, Any], hidden_size: int | None = None) -> nn.Module:
    """``deepspeed.initialize`` with no optimizer: a ZeRO-3 partitioned, forward-only engine.

    ``hidden_size`` sizes its buckets (default: the model config's text width)."""
    import deepspeed

    config = copy.deepcopy(ds_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config["zero_optimization"]
    # transformers resolves "auto" bucket sizes for the trained model only; size these from the
    # frozen model's width, with TRL's values for reference models.
    d = int(hidden_size or model.config.get_text_config().hidden_size)
    for key, value in (("reduce_bucket_size", d * d),
                       ("stage3_prefetch_bucket_size", int(0.9 * d * d)),
                       ("stage3_param_persistence_threshold", 10 * d)):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def shards_parameters(trainer: Trainer) -> bool:
    """ZeRO-3 or FSDP on several processes: every forward gathers parameters collectively."""
    if trainer.accelerator.num_processes < 2:
        return False
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    return trainer.is_fsdp_enabled


@contextlib.contextmanager
def vision_on_every_process(trainer: Trainer, backbone: Backbone, batch: dict[str, Any]) -> Iterator[None]:
    """Around a forward of ``backbone``'s model: a batch without images still runs the vision tower.

    Under :func:`shards_parameters` each vision module gathers its parameters collectively, so
    a process whose micro-batch is text-only must run the tower too, in the same order as an
    image batch: right after the input embeddings (a forward hook on them runs
    :meth:`Backbone.dummy_image_features`). Its output is dropped: no feature enters the
    sequence. The vision parts are frozen in every step, so no backward runs through them on
    any process (a trainable tower is refused). Elsewhere, and for batches with images, this
    does nothing.
    """
    if not shards_parameters(trainer):
        yield
        return
    if any(p.requires_grad for p in backbone.vision_parameters()):
        raise VlsiError(f"{backbone.family.model_type}: the vision parts must be frozen under ZeRO-3/FSDP "
                        "(text-only micro-batches run them forward only)")
    if "pixel_values" in batch:
        yield
        return
    ran = False

    def run_vision(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        nonlocal ran
        if not ran:
            ran = True
            backbone.dummy_image_features(output.device)

    handle = backbone.model.get_input_embeddings().register_forward_hook(run_vision)
    try:
        yield
    finally:
        handle.remove()
    if not ran:
        raise VlsiError("a text-only batch reached no input embedding: the vision tower did not run")


@contextlib.contextmanager
def whole_parameters(trainer: Trainer, modules: list[nn.Module],
                     fsdp_roots: tuple[nn.Module, ...] = ()) -> Iterator[None]:
    """Make the parameters of ``modules`` whole while they are used outside their model's forward.

    The chunked losses call the backbones' final norms and LM heads (and verbalizers) on hidden
    states after the forward, where ZeRO-3 and FSDP leave parameters sharded:

    * ZeRO-3: ``deepspeed.zero.GatheredParameters`` (read-only, every process) for the duration.
      Both chunked losses finish their head's backward inside the context (the gradient w.r.t.
      the hidden states is computed in the forward), so no gather is needed in ``backward``.
    * FSDP2 (``fsdp_roots``: the sharded models holding the modules, the trainer's wrapped
      model and the frozen ones of :func:`place_frozen_model`): the FSDP units that own the
      modules are unsharded (``unshard``/``reshard``); with the shipped wrap policy that is
      each model's root unit (embeddings, final norm, LM head), never a decoder layer.
    * otherwise nothing to do.

    """
    with contextlib.ExitStack() as stack:
        if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            for module in modules:
                stack.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None))
        elif trainer.is_fsdp_enabled:
            stack.enter_context(fsdp_whole(fsdp_roots, modules))
        yield


@contextlib.contextmanager
def fsdp_whole(roots: tuple[nn.Module, ...], modules: list[nn.Module]) -> Iterator[None]:
    """Unshard, for the duration, the FSDP2 units of ``roots`` that own ``modules`` (every
    process calls it: unsharding is a collective)."""
    with contextlib.ExitStack() as stack:
        for root in roots:
            for unit in _fsdp_owners(root, modules):
                stack.enter_context(_unsharded(unit))
        yield


def zero_for_every_parameter(trainer: Trainer, model: nn.Module, loss: torch.Tensor
                              ) -> tuple[torch.Tensor, list[Any]]:
    """Under FSDP2, a scalar 0 in place of the non-finite ``loss`` whose backward gives each
    trainable parameter of ``model`` a zero gradient; returns it and hooks to remove after that
    backward (none).

    Every unit is resharded and the zero built from the local shards (``DTensor.to_local``), so
    the zero gradients land in the sharded ``.grad`` directly and nothing needs reducing. (The
    other engines mask the loss and each parameter's gradient on the device instead:
    :meth:`vlsi.train.stages.run.VlsiTrainerMixin.finite_or_skipped`.)
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not trainer.is_fsdp_enabled:
        raise ValueError("zero_for_every_parameter is the FSDP2 skip; other engines mask on the device")
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()  # the root stays unsharded after its forward
    params = [p for p in model.parameters() if p.requires_grad]  # now the sharded ones
    parts = [((p.to_local() if isinstance(p, DTensor) else p) * 0).sum() for p in params]
    return sum(parts, torch.zeros((), device=loss.device)), []


def _fsdp_owners(root: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """For each module inside ``root``, the innermost FSDP2 unit that contains it."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    owners: list[nn.Module] = []
    for target in modules:
        # modules() is pre-order, so among the units holding the target the last is innermost
        holding = [u for u in units if any(sub is target for sub in u.modules())]
        if holding and not any(holding[-1] is o for o in owners):
            owners.append(holding[-1])
    return owners


@contextlib.contextmanager
def _unsharded(unit: nn.Module) -> Iterator[None]:
    unit.unshard()  # registers the unsharded parameters until reshard()
    try:
        yield
    finally:
        unit.reshard()


def deepspeed_without_engine(trainer: Trainer) -> bool:
    """DeepSpeed is on but ``trainer.model`` never went through it: its weights were restored
    from a finished checkpoint without training, so there is no engine to save through."""
    return trainer.is_deepspeed_enabled and trainer.model_wrapped is trainer.model


def full_parameters(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """``{name: whole tensor on the CPU}`` of ``model``'s parameters (``trainable_only``: those
    with ``requires_grad``); FSDP2 shards are gathered with ``DTensor.full_tensor``, a
    collective, so every process calls this."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad or not trainable_only}


def load_sharded_checkpoint(trainer: Trainer, checkpoint: Path) -> bool:
    """Load a finished FSDP checkpoint's sharded weights into the (unsharded) ``trainer.model``.

    Under FSDP with ``SHARDED_STATE_DICT`` a checkpoint holds the weights as
    ``torch.distributed.checkpoint`` shards (``pytorch_model_fsdp_0/``), not as a safetensors
    file; accelerate's ``load_fsdp_model`` reads them into the whole model on every process
    (a collective). Returns ``False``, having done nothing, for any other checkpoint.
    """
    if not (trainer.is_fsdp_enabled and any(Path(checkpoint).glob("pytorch_model_fsdp_*"))):
        return False
    from accelerate.utils import load_fsdp_model
    from peft import PeftModel

    load_fsdp_model(trainer.accelerator.state.fsdp_plugin, trainer.accelerator, trainer.model, str(checkpoint),
                    adapter_only=isinstance(trainer.model, PeftModel))
    return True


@contextlib.contextmanager
def unpartitioned_loading(trainer: Trainer) -> Iterator[None]:
    """``from_pretrained`` in one process loads a whole model, also under ZeRO-3.

    Under ZeRO-3 transformers builds every model inside ``deepspeed.zero.Init`` (a collective
    that partitions it over all processes); the export loads the student in the main process
    alone, so the global DeepSpeed config is unset for the duration and set again from the
    trainer's DeepSpeed plugin afterwards.
    """
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if not zero3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        trainer.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


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
