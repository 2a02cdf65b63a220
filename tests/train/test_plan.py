"""vlsi.train.plan: per-GPU memory from the model configs, before anything is loaded."""

from __future__ import annotations

import pytest
import torch

from helpers import REPO
from vlsi.cli import main
from vlsi.errors import VlsiError
from vlsi.models.shapes import shape_from_checkpoint, shape_from_name
from vlsi.train.config import load_config
from vlsi.train.plan import Setup, parse_memory, plan_steps, run_plan


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("141GiB") == 141 * 2**30
    assert parse_memory("512M") == 512 * 10**6
    with pytest.raises(VlsiError, match="memory size"):
        parse_memory("eighty")


def test_shapes_from_the_published_configs():
    shape = shape_from_name("qwen2-vl-72b")
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (8192, 80, 152064)
    assert shape.parameters == pytest.approx(73.4e9, rel=0.005) and shape.weight_bytes == 2
    with pytest.raises(VlsiError, match="unknown shape"):
        shape_from_name("qwen2-vl-1t")


def test_lora_and_weights_match_the_built_model(tiny_pair):
    """The counts the plan reads from the meta model are those of the loaded model with PEFT."""
    from peft import LoraConfig, get_peft_model

    from vlsi.models.backbones import LORA_TARGET_PATTERN, load_model

    pair = tiny_pair("qwen2_vl")
    shape = shape_from_checkpoint(pair.student)
    model = load_model(pair.student)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGET_PATTERN))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert shape.lora_parameters(8) == trainable


def _setup(**change) -> Setup:
    base = dict(gpus=8, engine="zero3", batch={"verbalize": 1, "interact": 1, "sft": 1},
                checkpointing={"verbalize": True, "interact": True, "sft": True}, max_length=4096,
                chunk_size=256, lora_r=64, autocast=True)
    return Setup(**{**base, **change})


def _pair():
    teacher, student = shape_from_name("qwen2-vl-72b"), shape_from_name("qwen2-vl-2b")
    teacher.target_layers, student.target_layers = list(range(1, 79, 4)), list(range(1, 27, 4))
    return teacher, student


def test_engines_shard_what_they_should():
    teacher, student = _pair()
    by_engine = {e: {s.step: s for s in plan_steps(teacher, student, _setup(engine=e))}
                 for e in ("ddp", "zero2", "zero3")}
    whole = teacher.parameters * 2
    assert by_engine["ddp"]["interact"].parts["teacher weights"] == whole
    assert by_engine["zero2"]["interact"].parts["teacher weights"] == whole
    assert by_engine["zero3"]["interact"].parts["teacher weights"] == whole // 8
    lora = [by_engine[e]["interact"].parts["lora + optimizer"] for e in ("ddp", "zero2", "zero3")]
    assert lora[0] > lora[1] > lora[2]  # zero2 shards gradients and moments, zero3 the weights too
    assert by_engine["ddp"]["interact"].parts["gathered"] == 0 < by_engine["zero3"]["interact"].parts["gathered"]


def test_checkpointing_chunk_and_batch_move_their_own_parts():
    teacher, student = _pair()
    interact = lambda **kw: {s.step: s for s in plan_steps(teacher, student, _setup(**kw))}["interact"]  # noqa: E731
    assert (interact(checkpointing={"verbalize": True, "interact": False, "sft": True}).parts["activations"]
            > interact().parts["activations"])
    t_s = len(student.target_layers)
    shrink = interact().parts["loss working set"] - interact(chunk_size=128).parts["loss working set"]
    assert shrink == (t_s + 4) * 128 * 151936 * 4  # the (t_s + 4) x chunk x V float32 buffers
    assert interact(batch={"verbalize": 1, "interact": 2, "sft": 1}).total > interact().total


def _steps(teacher, student, **change) -> dict:
    return {s.step: s for s in plan_steps(teacher, student, _setup(**change))}


def test_interaction_counts_bf16_verbalizers_the_stacks_and_both_heads_gathered():
    teacher, student = _pair()
    t_l, t_s = len(teacher.target_layers), len(student.target_layers)
    batch = {"verbalize": 1, "interact": 2, "sft": 1}
    parts = _steps(teacher, student, batch=batch)["interact"].parts
    n = 2 * 4096  # response tokens: every token of batch x max_length
    # VerbalizerSet casts the frozen verbalizers to the LM head's dtype: bf16, not float32; the
    # teacher's are sharded with the teacher under ZeRO-3 (8 GPUs), the student's replicated
    assert parts["verbalizers (frozen)"] == 3 * (t_l * 8192**2 * 2 // 8 + t_s * 1536**2 * 2)
    ddp = _steps(teacher, student, batch=batch, engine="ddp")["interact"].parts
    assert ddp["verbalizers (frozen)"] == 3 * (t_l * 8192**2 + t_s * 1536**2) * 2
    # [t + 1, N, d] stacks of both sides (the student's in bf16: DeepSpeed makes no float32 copy)
    assert parts["stacked hidden states"] == ((t_l + 1) * 8192 + (t_s + 1) * 1536) * n * 2
    # the loss gathers both final norms and LM heads at once under ZeRO-3
    assert teacher.head == 152064 * 8192 + 8192
    assert parts["gathered heads"] == (teacher.head + student.head) * 2
    assert _steps(teacher, student, batch=batch, engine="ddp")["interact"].parts["gathered heads"] == 0


def test_autocast_copies_only_where_accelerate_makes_them():
    """bf16 autocast under DDP/FSDP returns float32 outputs; DeepSpeed and no mixed precision do not."""
    teacher, student = _pair()
    batch = {"verbalize": 1, "interact": 2, "sft": 4}
    ddp = _steps(teacher, student, batch=batch, engine="ddp")
    assert ddp["interact"].parts["autocast copies"] == (student.num_layers + 1) * 2 * 4096 * student.hidden_size * 4
    # SFT: the student's hidden states (its logits are one position per sample)
    assert ddp["sft"].parts["autocast copies"] == (student.num_layers + 1) * 4 * 4096 * student.hidden_size * 4
    assert _steps(teacher, student, batch=batch, engine="fsdp")["sft"].parts["autocast copies"] > 0
    for change in ({"engine": "zero3"}, {"engine": "zero2"}, {"engine": "ddp", "autocast": False}):
        steps = _steps(teacher, student, batch=batch, **change)
        assert steps["interact"].parts["autocast copies"] == steps["sft"].parts["autocast copies"] == 0


def test_sft_loss_holds_one_chunk_of_logits_not_the_batchs():
    """The SFT loss is the chunked head CE (vlsi.train.stages.sft): one 1024 x V chunk of logits, their
    float32 copy and gradient, and the [N, d] response rows with their gradient; no [B, T, V]."""
    teacher, student = _pair()
    batch = {"verbalize": 1, "interact": 1, "sft": 4}
    parts = _steps(teacher, student, batch=batch)["sft"].parts
    n = 4 * 4096
    assert parts["loss working set"] == 1024 * 151936 * 10 + 2 * n * 1536 * 2
    assert parts["gathered heads"] == student.head * 2  # the LM head, gathered whole under ZeRO-3
    short = _steps(teacher, student, batch=batch, max_length=128)["sft"].parts
    assert short["loss working set"] == 4 * 128 * 151936 * 10 + 2 * 4 * 128 * 1536 * 2  # N < chunk


def test_sft_of_a_7b_student_plans_under_15_gb_per_gpu():
    """Issue 20's goal: the 72B -> 7B config's SFT step at batch 4 x 4,096 tokens on 8 GPUs under ZeRO-3."""
    cfg = load_config(REPO / "configs/qwen2vl-72b-to-7b.yaml")
    lines = run_plan(cfg, gpus=8, gpu_memory="80GB", engine="zero3", teacher_shape="qwen2-vl-72b",
                     student_shape="qwen2-vl-7b")
    sft = next(line for line in lines if line.startswith("sft:"))
    assert cfg.stage("sft").per_device_train_batch_size == 4 and cfg.data.max_length == 4096
    assert float(sft.split()[1]) <= 15.0, sft


def test_a_teacher_cache_leaves_the_teacher_out_of_the_interaction():
    teacher, student = _pair()
    online = _steps(teacher, student)["interact"].parts
    cached = _steps(teacher, student, teacher_cache=True)["interact"].parts
    assert online["teacher weights"] > 0 == cached["teacher weights"]
    assert cached["gathered heads"] == student.head * 2
    assert cached["verbalizers (frozen)"] == 3 * len(student.target_layers) * 1536**2 * 2
    assert cached["activations"] < online["activations"]

def test_a_72b_teacher_under_ddp_does_not_fit_and_the_plan_says_what_would(capsys):
    code = main(["plan", str(REPO / "configs/qwen2vl-72b-to-2b.yaml"), "--teacher-shape", "qwen2-vl-72b",
                 "--student-shape", "qwen2-vl-2b", "--gpus", "8", "--gpu-memory", "80GB", "--engine", "ddp"])
    out = capsys.readouterr().out
    assert code == 0
    assert "teacher weights" in out and "146.8 GB" in out  # 73.4B parameters in bf16, whole on each GPU
    assert "interact:" in out and "DOES NOT FIT" in out
    assert "the run does not fit; each of these alone would make it fit:" in out and "--engine zero3" in out


def test_the_shipped_72b_config_fits_eight_80gb_gpus_under_zero3():
    lines = run_plan(load_config(REPO / "configs/qwen2vl-72b-to-2b.yaml"), gpus=8, gpu_memory="80GB",
                     engine="zero3", teacher_shape="qwen2-vl-72b", student_shape="qwen2-vl-2b")
    assert lines[-1] == "the run fits"


def test_plan_of_a_local_checkpoint(tiny_pair, tmp_path, capsys):
    pair = tiny_pair("qwen2_vl")
    config = tmp_path / "run.yaml"
    config.write_text((REPO / "configs/tiny-qwen2vl.yaml").read_text()
                      .replace("runs/tiny/teacher", str(pair.teacher)).replace("runs/tiny/student", str(pair.student)))
    assert main(["plan", str(config), "--gpus", "1", "--gpu-memory", "24GB", "--engine", "ddp"]) == 0
    out = capsys.readouterr().out
    assert "teacher-verbalize:" in out and "sft:" in out and out.rstrip().endswith("the run fits")


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    code = main(["plan", str(REPO / "configs/qwen2vl-72b-to-2b.yaml"), "--student-shape", "qwen2-vl-2b"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--teacher-shape" in err


torch.set_num_threads(1)
