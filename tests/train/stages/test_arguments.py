"""A stage's TrainingConfig mapped onto TrainingArguments (vlsi.train.stages.arguments): each setting
where it belongs, pass-through arguments, and transformers' refusals as one line."""

from __future__ import annotations

import os

import pytest
import torch

from vlsi.errors import VlsiError
from vlsi.train.config import TrainingConfig
from vlsi.train.stages.arguments import bf16_available, check_arguments, training_arguments

no_bf16_gpu = pytest.mark.skipif(bf16_available(), reason="this machine has a bf16-capable GPU")


def _config(**settings) -> TrainingConfig:
    base = dict(learning_rate=2e-3, min_learning_rate=2e-5, max_steps=7, per_device_train_batch_size=3,
                gradient_accumulation_steps=5, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5,
                logging_steps=2, save_steps=4, save_total_limit=3, seed=11, dataloader_num_workers=0,
                report_to=[], ddp_timeout=1234, bf16=False)
    return TrainingConfig(**{**base, **settings})


def test_every_setting_reaches_its_argument(tmp_path):
    args = training_arguments(_config(), tmp_path / "out")
    assert args.output_dir == str(tmp_path / "out")
    assert (args.learning_rate, args.max_steps, args.num_train_epochs) == (2e-3, 7, 1.0)
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr_rate": pytest.approx(0.01)}  # a rate, not min_lr
    assert str(args.optim.value) == "adamw_torch"
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 5)
    assert args.warmup_steps == 0.1  # transformers 5: a float below 1 is a ratio
    assert (args.weight_decay, args.max_grad_norm) == (0.01, 0.5)
    assert (args.logging_steps, args.save_steps, args.save_total_limit) == (2, 4, 3)
    assert str(args.save_strategy.value) == "steps"  # DefaultFlowCallback then also saves the last step
    assert (args.seed, args.data_seed) == (11, 11)
    assert args.remove_unused_columns is False and args.report_to == [] and args.disable_tqdm is False
    assert args.ddp_timeout == 1234
    assert args.use_cpu == (not torch.cuda.is_available())
    assert args.accelerator_config.non_blocking is True  # follows dataloader_pin_memory
    assert training_arguments(_config(dataloader_pin_memory=False), tmp_path).accelerator_config.non_blocking is False
    assert args.bf16 is False  # bf16: false in the config, whatever the hardware


def test_gradient_checkpointing_follows_the_config_unless_overridden(tmp_path):
    on = training_arguments(_config(gradient_checkpointing=True), tmp_path)
    assert on.gradient_checkpointing and on.activation_checkpointing_kwargs == {"use_reentrant": False}
    off = training_arguments(_config(gradient_checkpointing=True), tmp_path, gradient_checkpointing=False)
    assert not off.gradient_checkpointing and not off.activation_checkpointing_kwargs
    assert training_arguments(_config(gradient_checkpointing=False), tmp_path, gradient_checkpointing=True
                              ).gradient_checkpointing


def test_pass_through_arguments_come_last_and_overrides_after_them(tmp_path):
    tcfg = _config(save_steps=9, arguments={"optim": "adafactor", "logging_first_step": True})
    args = training_arguments(tcfg, tmp_path)
    assert str(args.optim.value) == "adafactor" and args.logging_first_step and args.save_steps == 9
    assert training_arguments(tcfg, tmp_path, save_steps=6).save_steps == 6


def test_bf16_auto_follows_the_hardware(tmp_path):
    assert training_arguments(_config(bf16="auto"), tmp_path).bf16 == bf16_available()


@no_bf16_gpu
def test_bf16_without_a_bf16_gpu_is_one_line(tmp_path):
    with pytest.raises(VlsiError, match=r"^sft\.bf16 is true but this machine has no bf16-capable GPU"):
        training_arguments(_config(bf16=True), tmp_path, stage="sft")


def test_refused_arguments_are_one_line_naming_the_stage(tmp_path):
    with pytest.raises(VlsiError) as err:
        training_arguments(_config(dataloader_prefetch_factor=2), tmp_path, stage="interact")
    message = str(err.value)
    assert message.startswith("interact: transformers refuses these training arguments (")
    assert "\n" not in message and "dataloader_prefetch_factor" in message
    with pytest.raises(VlsiError, match="^verbalize: transformers refuses these training arguments"):
        training_arguments(_config(), tmp_path, stage="verbalize", not_an_argument=1)  # a TypeError


def test_check_arguments_builds_them_in_a_scratch_directory(tmp_path):
    args = check_arguments(_config(), "sft")
    assert args.max_steps == 7
    assert not os.path.exists(args.output_dir)  # the scratch directory is gone
    with pytest.raises(VlsiError, match="^sft: transformers refuses"):
        check_arguments(_config(dataloader_prefetch_factor=2), "sft")  # needs dataloader workers
