"""SFT step and export: the loss, a short run on the tiny pair, and the exported checkpoint
loaded and used by plain transformers in a process where this package cannot be imported."""

from __future__ import annotations

import importlib.machinery
import json
import re
import shutil
import site
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlsi.data import IGNORE_INDEX
from vlsi.errors import VlsiError
from vlsi.method.losses import chunked_head_ce
from vlsi.method.verbalizer import VerbalizerSet
from vlsi.models.backbones import load_backbone, load_model
from vlsi.train.lora import with_lora
from vlsi.train.stages.arguments import training_arguments
from vlsi.train.stages.sft import SFTTrainer, head_ce, run_sft
from vlsi.train.stages.training_data import load_training_data

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_config, tiny_pair):
    """Four SFT steps from a fresh LoRA, with (untrained) student verbalizers to export."""
    root = tmp_path_factory.mktemp("sft")
    cfg = tiny_config(root, **{"sft.max_steps": 4, "sft.save_steps": 2})
    verbalizers = VerbalizerSet(load_backbone(cfg.student)).save(root / "student-verbalizers")
    model_dir = run_sft(cfg, root / "4-sft", student_verbalizers=verbalizers)
    return cfg, root / "4-sft", model_dir


def test_sft_loss_is_mean_over_response_tokens(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path)
    dataset, collator, _ = load_training_data(cfg.data, cfg.student)
    model = with_lora(load_backbone(cfg.student), cfg.lora)
    trainer = SFTTrainer(model=model, args=training_arguments(cfg.stage("sft"), tmp_path, report_to=[]),
                         train_dataset=dataset, data_collator=collator)
    batch = collator([dataset[i] for i in range(3)])
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        target = labels[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        n_response = int((target != IGNORE_INDEX).sum())
        expected = token_loss.sum() / n_response
        # as the Trainer calls it: num_items_in_batch = supervised next-token labels
        got = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n_response))
        plain = trainer.compute_loss(model, dict(batch))
    assert 0 < n_response < target.numel()  # prompt, image and padding tokens are not counted
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)
    # Over an accumulated batch the token count is the whole batch's: sum over micro-batches
    # of their token losses divided by the total equals the mean over all response tokens.
    doubled = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * n_response))
    torch.testing.assert_close(doubled, expected / 2, rtol=1e-5, atol=1e-6)


def _sft_trainer(cfg, tmp_path, chunk_size):
    """An SFT trainer on a fresh LoRA whose B matrices are random (else the gradients of the A
    matrices are 0), in eval mode (no LoRA dropout), and a batch of three samples."""
    dataset, collator, _ = load_training_data(cfg.data, cfg.student)
    model = with_lora(load_backbone(cfg.student), cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    trainer = SFTTrainer(model=model, args=training_arguments(cfg.stage("sft"), tmp_path, report_to=[]),
                         train_dataset=dataset, data_collator=collator, chunk_size=chunk_size)
    return trainer, model.eval(), collator([dataset[i] for i in range(3)])


def test_sft_chunked_loss_and_gradients_equal_the_models_own(tiny_config, tmp_path, capsys):
    """Value and LoRA gradients of the chunked head CE equal those of the model's own loss over
    [B, T, V] logits, with chunks smaller than the response."""
    cfg = tiny_config(tmp_path)
    trainer, model, batch = _sft_trainer(cfg, tmp_path, chunk_size=3)
    assert capsys.readouterr().out.count("sft: loss: chunked head cross-entropy, 3 tokens a chunk") == 1
    assert next(model.parameters()).dtype == torch.float32
    n_response = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n_response > 2 * 3  # several chunks
    total = torch.tensor(n_response + 7)  # an accumulated batch's count: more than this micro-batch's
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in lora.items()}

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    own, own_grads = loss_and_grads(lambda: model(**inputs, labels=batch["labels"], num_items_in_batch=total).loss)
    got, got_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=total))
    torch.testing.assert_close(got, own, rtol=1e-5, atol=0)
    assert any(g.abs().sum() > 0 for g in own_grads.values())
    for name in lora:  # float32 sums in another order: rtol 1e-5 of each tensor's largest entry
        scale = float(own_grads[name].abs().max())
        torch.testing.assert_close(got_grads[name], own_grads[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_sft_loss_holds_one_chunk_of_logits_at_a_time(tiny_config, tmp_path):
    """The LM head never sees more than ``chunk`` rows: no [B, T, V] (nor [N, V]) logits."""
    cfg = tiny_config(tmp_path)
    chunk = 3
    trainer, model, batch = _sft_trainer(cfg, tmp_path, chunk_size=chunk)
    rows: list[int] = []
    head = trainer.student.lm_head
    handle = head.register_forward_hook(lambda _m, _a, out: rows.append(out.numel() // out.shape[-1]))
    try:
        trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(1)).backward()
    finally:
        handle.remove()
    labels = batch["labels"]
    n_response = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert max(rows) <= chunk, rows
    # the forward's last position per sample (logits_to_keep=1), then every response token once
    assert sum(rows) == labels.shape[0] + n_response, (rows, n_response)


class _FakeLiger:
    """Stands in for ``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss``: plain
    linear + cross-entropy, recording how it was built and called."""

    built: list[dict] = []
    calls: list[tuple] = []

    def __init__(self, ignore_index=-100, reduction="mean"):
        self.ignore_index, self.reduction = ignore_index, reduction
        _FakeLiger.built.append({"ignore_index": ignore_index, "reduction": reduction})

    def __call__(self, lin_weight, _input, target, bias=None):
        _FakeLiger.calls.append((lin_weight, _input.shape, bias))
        logits = torch.nn.functional.linear(_input, lin_weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=self.ignore_index,
                                                 reduction=self.reduction)


def _install_fake_liger(monkeypatch, with_transformers: bool = True) -> None:
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    if with_transformers:
        sub = types.ModuleType("liger_kernel.transformers")
        sub.LigerFusedLinearCrossEntropyLoss = _FakeLiger
        monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    else:  # installed but broken: its submodule fails to import
        monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)


def test_sft_loss_uses_liger_on_cuda_when_installed(monkeypatch):
    _FakeLiger.built.clear(), _FakeLiger.calls.clear()
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    y, targets = torch.randn(7, 8, requires_grad=True), torch.randint(0, 11, (7,))
    expected = chunked_head_ce(y, targets, head, 3)

    _install_fake_liger(monkeypatch)
    fused, line = head_ce(torch.device("cuda"), chunk_size=3)
    assert line.startswith("Liger-Kernel fused linear cross-entropy")
    torch.testing.assert_close(fused(y, targets, head), expected)
    assert _FakeLiger.built == [{"ignore_index": IGNORE_INDEX, "reduction": "sum"}]
    assert _FakeLiger.calls[0][0] is head.weight and _FakeLiger.calls[0][1] == (7, 8)

    # installed, but not on CUDA: the chunked CE, saying why
    chunked, line = head_ce(torch.device("cpu"), chunk_size=3)
    assert line == "chunked head cross-entropy, 3 tokens a chunk (Liger-Kernel needs CUDA, the device is cpu)"
    torch.testing.assert_close(chunked(y, targets, head), expected)
    assert len(_FakeLiger.calls) == 1


def test_sft_loss_is_chunked_without_liger_and_refuses_a_broken_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed (find_spec is None)
    _, line = head_ce(torch.device("cuda"), chunk_size=1024)
    assert line == "chunked head cross-entropy, 1024 tokens a chunk (liger-kernel is not installed)"
    _install_fake_liger(monkeypatch, with_transformers=False)
    with pytest.raises(ImportError, match="liger_kernel.transformers"):  # no silent fallback
        head_ce(torch.device("cuda"))


def test_sft_run_writes_checkpoints_metrics_and_export(sft_run):
    _, out, model_dir = sft_run
    assert model_dir == out / "model"
    done = json.loads((out / "step_complete.json").read_text())
    assert done["stage"] == "sft" and done["global_step"] == 4 and done["nonfinite_skipped"] == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(r["stage"] == "sft" for r in records)
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard log"

    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
            "verbalizers"} <= names
    assert "adapter_config.json" not in names and not any(n.startswith(".") for n in names)
    assert {p.name for p in (model_dir / "verbalizers").iterdir()} == {
        "verbalizers.safetensors", "verbalizers.json"}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"] and "auto_map" not in config
    assert not list(out.glob(".model*")), "temporary export directory left behind"


def test_export_merges_lora_into_language_model_only(sft_run):
    cfg, out, model_dir = sft_run
    base = load_file(str(Path(cfg.student) / "model.safetensors"))
    merged = load_file(str(model_dir / "model.safetensors"))
    assert base.keys() == merged.keys()  # same architecture, no adapter tensors
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed, "merged weights equal the base weights: LoRA did not train or merge"
    # Qwen2-VL's file layout: the language model under "model.layers", vision under "visual"
    lm_linear = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
    assert all(lm_linear.fullmatch(k) for k in changed), sorted(changed)
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)


def test_exported_model_computes_what_the_adapter_does(sft_run, tiny_config):
    """The merged checkpoint's forward equals the base student + saved adapter's forward."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg, out, model_dir = sft_run
    dataset, collator, _ = load_training_data(cfg.data, cfg.student)
    batch = collator([dataset[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with_adapter = PeftModel.from_pretrained(load_model(cfg.student), str(out / "adapter")).eval()
    exported = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, with_adapter(**inputs).logits,
                                   rtol=1e-4, atol=1e-4)


# Run with `python -I -S`: isolated (no PYTHON* variables, no user site, no cwd on sys.path) and
# without `site`, so the editable install's .pth file that puts src/ on sys.path is never read.
# Only the venv's site-packages is added back by hand, hence transformers, torch and PIL import
# and `vlsi` provably cannot (find_spec is None), and the model is loaded from a copy outside
# the repository.
_CLEAN_LOAD = r"""
import importlib.util, json, sys
site_packages, model_dir, image_path = sys.argv[1:4]
sys.path.append(site_packages)
assert importlib.util.find_spec("vlsi") is None, "vlsi is importable"
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

model = AutoModelForImageTextToText.from_pretrained(model_dir)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
images = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
messages = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "What colour is the shape?"}]}]
text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
pixels = images(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
n = int(pixels["image_grid_thw"].prod()) // images.merge_size ** 2
text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
mm_token_type_ids = (enc["input_ids"] == model.config.image_token_id).long()
out = model.generate(**enc, mm_token_type_ids=mm_token_type_ids, **pixels,
                     max_new_tokens=4, min_new_tokens=4, do_sample=False)
new = out[0, enc["input_ids"].shape[1]:].tolist()
print(json.dumps({"class": type(model).__name__, "image_tokens": n, "new_tokens": new,
                  "vlsi_imported": any(m.split(".")[0] == "vlsi" for m in sys.modules)}))
"""


def test_export_loads_and_generates_without_this_package(sft_run, synth_dir, cli_env, tmp_path):
    _, _, model_dir = sft_run
    copy = shutil.copytree(model_dir, tmp_path / "exported")
    site_packages = next(p for p in site.getsitepackages() if Path(p, "transformers").is_dir())
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _CLEAN_LOAD, site_packages, str(copy),
         str(synth_dir / "images" / "train-000000.png")],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"] == "Qwen2VLForConditionalGeneration"
    assert result["image_tokens"] > 0 and len(result["new_tokens"]) == 4
    assert result["vlsi_imported"] is False


def test_sft_continues_an_interaction_adapter(tiny_config, tmp_path):
    """A saved adapter is loaded trainable, values intact; only its LoRA weights train."""
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config(tmp_path)
    backbone = load_backbone(cfg.student)
    peft = get_peft_model(backbone.model, LoraConfig(r=4, lora_alpha=8,
                                                     target_modules=backbone.lora_target_modules))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft.save_pretrained(tmp_path / "adapter")
    saved = {k: v.clone() for k, v in peft.state_dict().items() if "lora_" in k}

    model = with_lora(load_backbone(cfg.student), cfg.lora, tmp_path / "adapter")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    state = model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).shape[0] == 4  # its rank


def test_sft_refuses_to_mix_with_an_earlier_run(tiny_config, tmp_path):
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)  # no fingerprint: not ours
    with pytest.raises(VlsiError, match="holds a result of other inputs .*no fingerprint"):
        run_sft(tiny_config(tmp_path), tmp_path / "out")


def test_sft_checks_its_inputs_before_training(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(VlsiError, match="student verbalizers not found"):
        run_sft(cfg, tmp_path / "a", student_verbalizers=tmp_path / "missing")
    with pytest.raises(VlsiError, match="LoRA adapter not found"):
        run_sft(cfg, tmp_path / "b", adapter=tmp_path / "missing")


def test_llava_onevision_student_exports(tmp_path, tiny_config, tiny_pair):
    """The other family: LLaVA-OneVision's checkpoint layout and image processor export too."""
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    pair = tiny_pair("llava_onevision")
    cfg = tiny_config(tmp_path, teacher=str(pair.teacher), student=str(pair.student),
                      **{"sft.max_steps": 2, "sft.save_steps": 2})
    model_dir = run_sft(cfg, tmp_path / "4-sft")
    exported = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert type(exported).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert AutoImageProcessor.from_pretrained(model_dir, backend="pil").image_grid_pinpoints
    dataset, collator, _ = load_training_data(cfg.data, cfg.student)
    batch = collator([dataset[0]])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    adapter = str(tmp_path / "4-sft" / "adapter")
    with_adapter = PeftModel.from_pretrained(load_model(cfg.student), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, with_adapter(**inputs).logits,
                                   rtol=1e-4, atol=1e-4)


def test_sft_refuses_verbalizers_of_another_model_before_training(tiny_config, tiny_pair, tmp_path):
    teacher = load_backbone(tiny_pair("qwen2_vl").teacher)
    foreign = VerbalizerSet(teacher, [1, 3]).save(tmp_path / "teacher-verbalizers")
    with pytest.raises(VlsiError, match="these verbalizers do not fit the student .*hidden_size"):
        run_sft(tiny_config(tmp_path), tmp_path / "out", student_verbalizers=foreign)
    assert not (tmp_path / "out").exists()
