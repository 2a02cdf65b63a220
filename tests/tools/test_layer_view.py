"""``vlsi verbalize-layers``: per-layer decoding, the page it writes, its command line."""

from __future__ import annotations

import html
import re

import pytest
import torch

from vlsi.cli import main
from vlsi.method.verbalizer import VerbalizerSet
from vlsi.tools.inference import Generator, Prompt
from vlsi.tools.layer_view import LayerResponses, comparison_rows, layer_responses


@pytest.fixture(scope="module")
def teacher(tiny_pair):
    return Generator.from_pretrained(tiny_pair("qwen2_vl").teacher)


def _lens_greedy(gen: Generator, vset: VerbalizerSet, k: int, prompt: Prompt, steps: int) -> list[int]:
    """Reference: no cache, full forward per step, verbalizer k on hidden_states[layer + 1]."""
    inputs = gen.inputs([prompt])
    ids, out = inputs["input_ids"], []
    vocab = len(gen.tokenizer)
    for _ in range(steps):
        step = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        pad = torch.zeros(1, ids.shape[1] - inputs["mm_token_type_ids"].shape[1], dtype=torch.long)
        step["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], 1)
        with torch.no_grad():
            hs = gen.backbone.model(**step, output_hidden_states=True).hidden_states
            logits = vset.logits(k, hs[vset.layers[k] + 1][0, -1])[:vocab]
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in gen.end_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def _randomised(vset: VerbalizerSet, seed: int = 0) -> VerbalizerSet:
    """Non-identity verbalizers (trained ones are not the logit lens either)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return vset


def test_each_layer_decodes_with_its_own_verbalizer(teacher, write_image, tmp_path):
    img = write_image(tmp_path / "a.png")
    prompt = Prompt("<image>\nWhat colour is it?", [img])
    vset = _randomised(VerbalizerSet(teacher.backbone, None, "verb-ffn"))
    [col] = layer_responses(teacher, vset, [prompt], max_new_tokens=5)
    assert col.layers == vset.layers + [teacher.backbone.num_layers - 1]
    for k in range(vset.num_targets):
        assert col.responses[k] == teacher.decode(_lens_greedy(teacher, vset, k, prompt, 5))
    assert col.responses[-1] == teacher.generate([prompt], max_new_tokens=5)[0]
    assert len(set(col.responses)) > 1  # different layers, different answers


def test_decoder_verbalizers_decode_without_cache(teacher, write_image, tmp_path):
    img = write_image(tmp_path / "b.png")
    prompt = Prompt("<image>\nWhat is it?", [img])
    vset = _randomised(VerbalizerSet(teacher.backbone, [1], "decoder"), seed=1)
    [col] = layer_responses(teacher, vset, [prompt], max_new_tokens=4)
    inputs = teacher.inputs([prompt])
    from vlsi.method.verbalizer import capture_layer_context

    with torch.no_grad(), capture_layer_context(teacher.backbone) as ctx:
        hs = teacher.backbone.model(**inputs, output_hidden_states=True).hidden_states
        first = int(vset.head(vset.transform(0, hs[2], ctx))[0, -1, :len(teacher.tokenizer)].argmax())
    if first in teacher.end_ids:
        assert col.responses[0] == ""
    else:
        assert col.responses[0].startswith(teacher.decode([first]))


def test_comparison_rows_align_heads():
    a = LayerResponses("a", 8, [1, 5, 7], ["x1", "x5", "xh"])
    b = LayerResponses("b", 4, [1, 3], ["y1", "yh"])
    rows = comparison_rows([a, b])
    assert [r[0][1] for r in rows] == ["x1", "x5", "xh"]
    assert rows[0][1][1] == "y1" and rows[1][1] is None and rows[2][1][1] == "yh"
    assert rows[2][0][0].startswith("head")


def test_verbalize_layers_cli_writes_html_and_markdown(tiny_pair, teacher, write_image, tmp_path, capsys):
    pair = tiny_pair("qwen2_vl")
    img = write_image(tmp_path / "c.png")
    VerbalizerSet(teacher.backbone, None, "verb-ffn").save(tmp_path / "tv")
    student = Generator.from_pretrained(pair.student)
    VerbalizerSet(student.backbone, None, "mlp").save(tmp_path / "sv")
    out = tmp_path / "view.html"
    assert main(["verbalize-layers", "--model", str(pair.teacher), "--verbalizers", str(tmp_path / "tv"),
                 "--image", str(img), "--prompt", "What colour <is> it?", "--out", str(out),
                 "--compare", str(pair.student), str(tmp_path / "sv"), "--max-new-tokens", "3"]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing external
    assert html.escape("What colour <is> it?") in page
    assert page.count("<th>") == 2
    md = out.with_suffix(".md").read_text()
    assert "| layer 1 (25%): " in md and "| layer 1 (50%): " in md
    assert "head (layer 7/7)" in md and "head (layer 3/3)" in md
    # verbalizers of another backbone are refused in one line
    assert main(["verbalize-layers", "--model", str(pair.student), "--verbalizers", str(tmp_path / "tv"),
                 "--prompt", "Q", "--out", str(out)]) == 2
    assert "do not fit this backbone" in capsys.readouterr().err
