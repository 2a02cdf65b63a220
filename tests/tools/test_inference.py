"""Batched generation (greedy and beam) on tiny checkpoints, and ``vlsi generate``."""

from __future__ import annotations

import json

import pytest
import torch

from vlsi.cli import main
from vlsi.errors import DataError, VlsiError
from vlsi.tools import inference
from vlsi.tools.inference import Generator, Prompt, resolve_device, user_turns


@pytest.fixture(scope="module")
def generator(tiny_pair):
    return Generator.from_pretrained(tiny_pair("qwen2_vl").student)


def _manual_greedy(gen: Generator, prompt: Prompt, steps: int) -> list[int]:
    """Reference: full forward each step, argmax, no cache, no batching."""
    inputs = gen.inputs([prompt])
    ids = inputs["input_ids"]
    out = []
    model = gen.backbone.model
    for _ in range(steps):
        step_inputs = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in inputs:
            pad = torch.zeros(1, ids.shape[1] - inputs["mm_token_type_ids"].shape[1], dtype=torch.long)
            step_inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], 1)
        with torch.no_grad():
            nxt = int(model(**step_inputs).logits[0, -1].argmax())
        out.append(nxt)
        if nxt in gen.end_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_greedy_matches_manual_decoding_and_batching(generator, write_image, tmp_path):
    red = write_image(tmp_path / "red.png", color=(220, 20, 20))
    blue = write_image(tmp_path / "blue.png", size=(84, 56), color=(20, 20, 220))
    prompts = [Prompt("<image>\nWhat colour is it?", [red]),
               Prompt("Describe", [blue]),  # no tag: the image goes first
               Prompt("Text only, a longer prompt than the others to force padding")]
    batched = generator.generate(prompts, max_new_tokens=6)
    single = [generator.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    ref = _manual_greedy(generator, prompts[0], 6)
    assert generator.decode(ref) == single[0]


def test_beam_search_runs_and_beam_one_is_greedy(generator, write_image, tmp_path):
    img = write_image(tmp_path / "g.png", color=(20, 200, 20))
    prompt = [Prompt("<image>\nWhat is it?", [img])]
    assert generator.generate(prompt, max_new_tokens=5, num_beams=1) == generator.generate(prompt, max_new_tokens=5)
    beams = generator.generate(prompt, max_new_tokens=5, num_beams=3)
    assert len(beams) == 1 and isinstance(beams[0], str)


def test_prompt_image_mismatch_is_a_data_error(tmp_path, write_image):
    img = write_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="2 <image> tags but 1 images"):
        user_turns(Prompt("<image><image> two?", [img]))
    assert user_turns(Prompt("Q", [img, img]))[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]


def test_generate_cli(tiny_pair, write_image, tmp_path, capsys):
    img = write_image(tmp_path / "c.png")
    student = str(tiny_pair("qwen2_vl").student)
    assert main(["generate", "--model", student, "--image", str(img), "--prompt", "What colour?",
                 "--max-new-tokens", "4"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", "--model", student, "--image", str(img), "--prompt", "What colour?",
                 "--max-new-tokens", "4", "--num-beams", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", student, "--image", str(tmp_path / "none.png"),
                 "--prompt", "Q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image not found") and err.count("\n") == 1
    assert greedy.endswith("\n")


@pytest.fixture
def two_bf16_gpus(monkeypatch):
    """torch reports two bf16-capable CUDA GPUs (nothing is moved to them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_resolve_device_prefers_the_gpu_in_bf16(two_bf16_gpus):
    assert resolve_device() == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device("cuda:1") == (torch.device("cuda", 1), torch.bfloat16)
    assert resolve_device("cpu") == (torch.device("cpu"), None)  # the checkpoint's own dtype
    for bad, message in (("cuda:2", "has 2 CUDA GPU"), ("gpu0", "not a device"), ("meta", "only cpu, cuda")):
        with pytest.raises(VlsiError, match=message):
            resolve_device(bad)


def test_resolve_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == (torch.device("cpu"), None)
    with pytest.raises(VlsiError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_commands_load_the_model_on_the_resolved_device(two_bf16_gpus, monkeypatch, tmp_path, write_image):
    """``generate``, ``eval`` and ``verbalize-layers`` hand resolve_device's answer to the loader."""
    loads = []

    def record(path, dtype=None, device=None):
        loads.append((device, dtype))
        raise VlsiError("stop before loading")

    monkeypatch.setattr(inference.Generator, "from_pretrained", staticmethod(record))
    image = write_image(tmp_path / "red.png")
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"id": "q0", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}]))
    commands = [["generate", "--model", str(tmp_path), "--prompt", "Q"],
                ["eval", "--model", str(tmp_path), "--data", str(data)],
                ["verbalize-layers", "--model", str(tmp_path), "--verbalizers", str(tmp_path), "--image", str(image),
                 "--prompt", "Q", "--out", str(tmp_path / "o.html")]]
    for argv in commands:
        assert main(argv) == 2 and main(argv + ["--device", "cpu"]) == 2
    assert loads == [(torch.device("cuda"), torch.bfloat16), (torch.device("cpu"), None)] * 3
