"""What the three training stages share: arguments, data, checkpoints, fault handling, logging.

Each stage (``verbalize``, ``interact``, ``sft``) is a thin ``transformers.Trainer`` subclass
that overrides the loss; accumulation, distribution (accelerate: DDP, DeepSpeed, FSDP),
checkpointing and logging stay transformers'. This module adds, as a mixin and callbacks:

* :func:`training_arguments`: a stage's :class:`vlsi.config.TrainingConfig` mapped onto
  ``TrainingArguments`` (AdamW, ``cosine_with_min_lr``, bf16 when the hardware has it,
  TensorBoard event files under ``OUT/runs/`` (transformers' default; set
  ``TENSORBOARD_LOGGING_DIR`` to move them), ``remove_unused_columns=False`` for the collator).
* :class:`VlsiTrainerMixin`:
    - atomic checkpoints: a checkpoint is written under ``OUT/.partial/`` and renamed to
      ``OUT/checkpoint-N`` only when complete, so a kill never leaves a half-written
      ``checkpoint-N`` that ``--resume`` would pick;
    - non-finite losses: the micro-batch is skipped (no backward) and counted; after
      ``max_consecutive_nonfinite`` in a row the run stops with a one-line error, the last good
      checkpoint kept. All processes agree on the decision, so DDP never hangs on it.
* :class:`MetricsJsonlCallback`: every log line also goes to ``OUT/metrics.jsonl``.
* :class:`LossProgressCallback`: the progress bar shows the latest loss beside the ETA.
* :func:`latest_checkpoint`: the newest complete checkpoint of a run, for ``--resume``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from vlsi.backbones import ImageEncoder, load_tokenizer
from vlsi.config import DataConfig, TrainingConfig
from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.errors import VlsiError

PARTIAL_DIR = ".partial"
STEP_COMPLETE = "step_complete.json"  # written last by every stage: the step has finished
METRICS = "metrics.jsonl"


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(
    tcfg: TrainingConfig,
    output_dir: str | Path,
    *,
    gradient_checkpointing: bool | None = None,
    **overrides: Any,
) -> TrainingArguments:
    """``TrainingArguments`` for one stage from its merged :class:`TrainingConfig`.

    ``gradient_checkpointing`` overrides the config (the verbalization stage never needs it:
    its backbone runs under ``no_grad``).
    """
    bf16 = bf16_available() if tcfg.bf16 == "auto" else bool(tcfg.bf16)
    if bf16 and not bf16_available():
        raise VlsiError("training.bf16 is true but this machine has no bf16-capable GPU (use 'auto')")
    use_gc = tcfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": tcfg.min_learning_rate},
        optim="adamw_torch",
        num_train_epochs=tcfg.num_train_epochs,
        max_steps=tcfg.max_steps,
        per_device_train_batch_size=tcfg.per_device_train_batch_size,
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        warmup_steps=tcfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm,
        activation_checkpointing=use_gc,
        activation_checkpointing_kwargs={"use_reentrant": False} if use_gc else None,
        bf16=bf16,
        logging_steps=tcfg.logging_steps,
        save_strategy="steps",
        save_steps=tcfg.save_steps,
        save_total_limit=tcfg.save_total_limit,
        seed=tcfg.seed,
        data_seed=tcfg.seed,
        dataloader_num_workers=tcfg.dataloader_num_workers,
        remove_unused_columns=False,  # the collator needs num_image_tokens
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# Scanned datasets of this process, by what they depend on (see :func:`load_training_data`).
_SCANNED: dict[tuple, VisualInstructionDataset] = {}
_SCANNED_KEEP = 2
_PREPROCESSING_FILES = ("tokenizer.json", "tokenizer_config.json",
                        "chat_template.jinja", "preprocessor_config.json")


def _scan_key(data: DataConfig, files: list[str], model_dir: str | Path, family: str) -> tuple:
    """Everything a scanned dataset depends on: the files as they are now (path, size, mtime),
    the settings, and the model's tokenizer, chat template and image-processor files."""
    def stat(path: str | Path) -> tuple:
        p = Path(path).resolve()
        st = p.stat() if p.is_file() else None
        return (str(p), st.st_size if st else None, st.st_mtime_ns if st else None)

    digest = hashlib.sha256()
    for name in _PREPROCESSING_FILES:
        f = Path(model_dir) / name
        if f.is_file():
            digest.update(name.encode() + b"\0" + f.read_bytes())
    root = str(Path(data.image_root).resolve()) if data.image_root else None
    return (tuple(stat(f) for f in files), root, data.max_length, data.strict, data.min_pixels,
            data.max_pixels, family, digest.hexdigest())


def load_training_data(
    data: DataConfig, model_dir: str | Path, *, split: str = "train"
) -> tuple[VisualInstructionDataset, VisionLanguageCollator, Any]:
    """Dataset, collator and tokenizer for ``split`` ("train" or "eval") with ``model_dir``'s
    tokenizer, chat template and image processor.

    Scanning (reading, validating and encoding every record) is done once per process for the
    same files, settings and preprocessing files: the steps of ``vlsi distill`` or ``vlsi demo``
    that read one dataset share the scan. A changed file (size or mtime) is scanned again.
    """
    files = data.train if split == "train" else data.eval
    tokenizer = load_tokenizer(model_dir)
    images = ImageEncoder.from_pretrained(model_dir, min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    key = _scan_key(data, files, model_dir, images.family)
    dataset = _SCANNED.get(key)
    if dataset is None:
        dataset = VisualInstructionDataset.from_files(
            files, tokenizer, images, image_root=data.image_root, max_length=data.max_length, strict=data.strict
        )
        while len(_SCANNED) >= _SCANNED_KEEP:
            _SCANNED.pop(next(iter(_SCANNED)))
        _SCANNED[key] = dataset
    collator = VisionLanguageCollator.for_tokenizer(images.family, tokenizer)
    return dataset, collator, tokenizer


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """Newest complete ``checkpoint-N`` in ``output_dir`` (partial ones never match)."""
    d = Path(output_dir)
    return get_last_checkpoint(str(d)) if d.is_dir() else None


class NonFiniteLossError(VlsiError):
    """Too many non-finite losses in a row."""


class VlsiTrainerMixin:
    """Atomic checkpoints and non-finite-loss skipping for a ``transformers.Trainer``.

    Put it first in the bases: ``class MyTrainer(VlsiTrainerMixin, Trainer)`` and override
    :meth:`stage_loss` (not ``compute_loss``). Pass ``max_consecutive_nonfinite`` from the
    stage config.
    """

    max_consecutive_nonfinite: int = 5

    def __init__(self, *args: Any, max_consecutive_nonfinite: int = 5, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.nonfinite_skipped = 0
        self._nonfinite_in_a_row = 0

    # -- non-finite losses --------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        """The stage's loss, with non-finite training losses replaced by a zero.

        The zero touches every trainable parameter (``(p * 0).sum()``), so DDP's gradient
        reduction still sees them and no process waits for the others; it adds nothing to the
        gradients. Stage trainers implement :meth:`stage_loss` instead of ``compute_loss``.
        """
        out = self.stage_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return out
        loss = out[0] if return_outputs else out
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
        if finite.item() == 1.0:
            self._nonfinite_in_a_row = 0
            return out
        self.nonfinite_skipped += 1
        self._nonfinite_in_a_row += 1
        self.log({"nonfinite_skipped": float(self.nonfinite_skipped)})
        if self._nonfinite_in_a_row >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_a_row} non-finite losses in a row at step "
                f"{self.state.global_step}; stopping (last good checkpoint kept in "
                f"{self.args.output_dir}). Lower the learning rate or check the data."
            )
        zero = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        zero = zero if isinstance(zero, torch.Tensor) else torch.zeros((), device=loss.device)
        return (zero, out[1]) if return_outputs else zero

    def stage_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stage's own loss; defaults to the model's (next-token loss with labels)."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # -- atomic checkpoints -------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        """Write ``checkpoint-N`` under ``.partial/``, then rename it into place."""
        run_dir = Path(self._get_output_dir(trial=trial))
        partial_root = run_dir / PARTIAL_DIR
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(partial_root / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(partial_root)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = original  # type: ignore[method-assign]
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():  # a re-save of the same step (resumed run): replace it whole
                shutil.rmtree(final)
            os.replace(partial_root / name, final)
            _fsync_dir(run_dir)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsJsonlCallback(TrainerCallback):
    """Append every log record (step, epoch, loss, learning rate, ...) to ``metrics.jsonl``."""

    def __init__(self, path: str | Path, stage: str):
        self.path = Path(path)
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"stage": self.stage, "step": state.global_step, "epoch": state.epoch}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))
                       and not (isinstance(v, float) and math.isnan(v))})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class LossProgressCallback(ProgressCallback):
    """transformers' progress bar (steps, ETA) with the latest loss as its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "learning_rate", "grad_norm")}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def stage_callbacks(output_dir: str | Path, stage: str) -> list[TrainerCallback]:
    return [MetricsJsonlCallback(Path(output_dir) / "metrics.jsonl", stage)]


def use_loss_progress_bar(trainer: Any) -> None:
    """Swap the Trainer's default progress bar for :class:`LossProgressCallback`."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgressCallback())


# ---------------------------------------------------------------------------------------------
# Shared by the stages: resume, step completion, atomic files, frozen-model placement
# ---------------------------------------------------------------------------------------------


def stage_complete(out_dir: Path) -> bool:
    return (out_dir / STEP_COMPLETE).is_file()


def resume_checkpoint(out_dir: Path, resume: bool) -> str | None:
    """The checkpoint to continue from (``None``: start fresh).

    Without ``resume``, an ``out_dir`` that already holds checkpoints or a finished stage is an
    error (it would be mixed with the new run); with it and no checkpoint, training starts fresh.
    """
    checkpoint = latest_checkpoint(out_dir)
    if not resume and (checkpoint or stage_complete(out_dir)):
        found = Path(checkpoint).name if checkpoint else STEP_COMPLETE
        raise VlsiError(f"{out_dir} already holds a run ({found}); pass --resume to continue it, "
                        "or choose another output directory")
    return checkpoint


def checkpoint_step(checkpoint: str | None) -> int:
    """Optimizer step of ``.../checkpoint-N`` (0 for ``None``)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def read_json(path: Path) -> Any:
    """A JSON file's content (raises ``VlsiError`` naming the file when it does not parse)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VlsiError(f"cannot read {path}: {err}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (none if it does not exist); a torn last line is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return records


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the records with ``step <= last_step`` (a resumed run redoes the later steps)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace``: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class MeanMetrics:
    """Scalars collected per micro-batch, averaged over a logging window and over processes."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, value: float) -> None:
        self.values[name].append(float(value))

    def pop_means(self, accelerator) -> dict[str, float]:
        """Means since the last call, NaN ignored; every process must call it (a collective)."""
        names = sorted(self.values)
        if not names:
            return {}
        means = torch.tensor([torch.tensor(self.values[n], dtype=torch.float64).nanmean().item() for n in names],
                             dtype=torch.float64)
        self.values.clear()
        if accelerator.num_processes > 1:
            means = accelerator.gather(means.to(accelerator.device)).view(-1, len(names)).nanmean(dim=0).cpu()
        return {n: float(m) for n, m in zip(names, means) if math.isfinite(float(m))}


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

    UNTESTED under DeepSpeed (not installed where this was written) and FSDP (no multi-GPU
    machine); written against deepspeed's ``initialize`` and accelerate's ``prepare_model``.
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

    UNTESTED under DeepSpeed and FSDP (see :func:`place_frozen_model`).
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
