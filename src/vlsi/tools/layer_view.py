"""``vlsi verbalize-layers``: what each target layer would answer (paper Fig. 3, appendix C).

For target layer ``l`` of a model with trained verbalizers, the response is decoded greedily
with the next token taken from ``verbalizer_l`` applied to layer ``l``'s hidden state at the
last position, not from the model's own head; the chosen token is fed back through the whole
model as usual (KV cache on), until the end-of-turn token or ``max_new_tokens``. The last row
is the model's own head (its ordinary greedy answer). Several models (e.g. the student before
and after VLsI, and the teacher) are shown side by side, rows aligned by relative depth.

Mechanics: a forward hook on decoder layer ``l`` keeps its output; a ``LogitsProcessor``
replaces the head's scores with the verbalizer's logits of that output, so ``generate`` keeps
handling the cache and M-RoPE positions. Token-wise verbalizers (``verb-ffn``, ``mlp``, ``ffn``)
need only the last position and decode with the KV cache; ``decoder`` verbalizers attend over
the sequence, so for them the cache is off and each step re-reads the whole sequence
(quadratic, fine for short answers). Only token ids the tokenizer knows are eligible (the LM
head's padding rows are masked).

Writes ``OUT.html`` (the ``layer_view.html.j2`` template; self-contained: the image inlined as
a data URI, no external assets) and ``OUT.md`` beside it.
"""

from __future__ import annotations

import base64
import io
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import VerbalizerSet, capture_layer_context
from vlsi.tools.inference import Generator, Prompt, as_images, resolve_device
from vlsi.tools.pages import render


@dataclass
class LayerResponses:
    """One model's answer at every target layer; the last entry is the model's own head."""

    name: str
    num_layers: int
    layers: list[int]  # target layers, then num_layers - 1 for the head
    responses: list[str]

    def depth(self, row: int) -> float:
        """Relative depth of row ``row``: (layer + 1) / num_layers."""
        return (self.layers[row] + 1) / self.num_layers


class _VerbalizedScores(LogitsProcessor):
    """Replace the head's scores with target layer k's verbalized logits ([B, V_rows])."""

    def __init__(self, verbalizers: VerbalizerSet, k: int, store: dict[str, Any], vocab: int):
        self.verbalizers, self.k, self.store, self.vocab = verbalizers, k, store, vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        h = self.store["hidden"]  # [B, T, d] (the layer's output on this step's tokens)
        vset = self.verbalizers
        if vset.token_wise:
            logits = vset.head(vset.transform(self.k, h[:, -1]))
        else:
            logits = vset.head(vset.transform(self.k, h, self.store["context"]))[:, -1]
        logits = logits.to(scores.dtype)
        if logits.shape[-1] != scores.shape[-1]:
            raise VlsiError(f"verbalizer gives {logits.shape[-1]} logits, head {scores.shape[-1]}")
        logits[:, self.vocab:] = torch.finfo(logits.dtype).min
        return logits


@contextmanager
def _keep_layer_output(verbalizers: VerbalizerSet, layer: int) -> Iterator[dict[str, Any]]:
    store: dict[str, Any] = {}

    def hook(_module: torch.nn.Module, _args: tuple, output: Any) -> None:
        store["hidden"] = output[0] if isinstance(output, tuple) else output

    backbone = verbalizers.backbone
    handle = backbone.decoder_layers[layer].register_forward_hook(hook)
    try:
        if verbalizers.token_wise:
            yield store
        else:
            with capture_layer_context(backbone) as context:
                store["context"] = context
                yield store
    finally:
        handle.remove()


@torch.no_grad()
def layer_responses(generator: Generator, verbalizers: VerbalizerSet, prompts: list[Prompt],
                    max_new_tokens: int = 32, name: str = "model") -> list[LayerResponses]:
    """Greedy answers to each prompt from every target layer and from the model's head."""
    if verbalizers.backbone is not generator.backbone:
        raise VlsiError("the verbalizers must be loaded onto the generator's backbone")
    model = generator.backbone.model.eval()
    vocab = len(generator.tokenizer)
    inputs = generator.inputs(prompts)
    start = inputs["input_ids"].shape[1]
    common = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                  eos_token_id=generator.end_ids, pad_token_id=generator.tokenizer.pad_token_id)
    rows: list[list[str]] = []
    for k, layer in enumerate(verbalizers.layers):
        with _keep_layer_output(verbalizers, layer) as store:
            processors = LogitsProcessorList([_VerbalizedScores(verbalizers, k, store, vocab)])
            out = model.generate(**inputs, logits_processor=processors,
                                 use_cache=verbalizers.token_wise, **common)
        rows.append([generator.decode(r) for r in out[:, start:].tolist()])
    out = model.generate(**inputs, **common)
    rows.append([generator.decode(r) for r in out[:, start:].tolist()])
    num_layers = generator.backbone.num_layers
    layers = list(verbalizers.layers) + [num_layers - 1]
    return [LayerResponses(name, num_layers, layers, [row[i] for row in rows])
            for i in range(len(prompts))]


# -- rendering -------------------------------------------------------------------------------

def image_data_uri(image: Image.Image, max_side: int = 224) -> str:
    """PNG data URI of ``image``, upscaled with nearest neighbour so small images stay crisp."""
    scale = max(1, max_side // max(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _row_label(col: LayerResponses, row: int) -> str:
    if row == len(col.layers) - 1:
        return f"head (layer {col.layers[row]}/{col.num_layers - 1})"
    return f"layer {col.layers[row]} ({col.depth(row):.0%})"


def comparison_rows(columns: list[LayerResponses]) -> list[list[tuple[str, str] | None]]:
    """Rows aligned from the top; the heads share the last row. Cell: (label, response)."""
    depth = max(len(c.layers) for c in columns)
    rows: list[list[tuple[str, str] | None]] = []
    for r in range(depth):
        row = []
        for col in columns:
            n = len(col.layers)
            i = r if r < depth - 1 else n - 1  # last row: every model's head
            if r < depth - 1 and r >= n - 1:
                row.append(None)
            else:
                row.append((_row_label(col, i), col.responses[i]))
        rows.append(row)
    return rows


def panel(prompt_text: str, image: Image.Image | None, columns: list[LayerResponses],
          reference: str | None = None) -> dict[str, Any]:
    """One question's block for the page templates (``macros.html.j2``'s ``panel``): the image's
    data URI, the question, the reference, the models' names and :func:`comparison_rows`."""
    return {"image": image_data_uri(image) if image is not None else None, "question": prompt_text,
            "reference": reference, "names": [c.name for c in columns], "rows": comparison_rows(columns)}


def _md_cell(text: str) -> str:
    return (text or "∅").replace("|", "\\|").replace("\n", " ")


def markdown_panel(prompt_text: str, columns: list[LayerResponses], image_name: str | None = None,
                   reference: str | None = None) -> str:
    lines = []
    if image_name:
        lines.append(f"Image: `{image_name}`  ")
    lines.append("Q: " + prompt_text.replace("\n", " / ") + "  ")
    if reference is not None:
        lines.append(f"Reference: {reference}")
    lines += ["", "| " + " | ".join(c.name for c in columns) + " |",
              "|" + "---|" * len(columns)]
    for row in comparison_rows(columns):
        lines.append("| " + " | ".join("" if c is None else f"{c[0]}: {_md_cell(c[1])}" for c in row) + " |")
    return "\n".join(lines) + "\n"


def run_verbalize_layers(model: str | Path, verbalizers: str | Path, image: str | Path | None,
                         prompt: str, out: str | Path, compare: list[tuple[str, str]] | None = None,
                         max_new_tokens: int = 32, device: str | None = None) -> tuple[Path, Path]:
    """``vlsi verbalize-layers``: write ``out`` (.html) and the Markdown beside it.

    ``device``: as :func:`vlsi.tools.inference.resolve_device` (default: the GPU when there is one).
    """
    target, dtype = resolve_device(device)
    images = as_images([image]) if image else []
    columns = []
    for model_dir, verb_dir in [(str(model), str(verbalizers))] + list(compare or []):
        generator = Generator.from_pretrained(model_dir, dtype=dtype, device=target)
        vset = VerbalizerSet.load(verb_dir, generator.backbone)
        [col] = layer_responses(generator, vset, [Prompt(prompt, images)], max_new_tokens,
                                name=Path(model_dir).name or model_dir)
        columns.append(col)
    out = Path(out)
    if out.suffix != ".html":
        out = out.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "Layer-wise verbalized responses"
    page = render("layer_view.html.j2", title=title,
                  panels=[panel(prompt, images[0] if images else None, columns)])
    out.write_text(page, encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(f"# {title}\n\n" + markdown_panel(prompt, columns, str(image) if image else None),
                  encoding="utf-8")
    for col in columns:
        print(f"== {col.name}")
        for layer, text in zip(col.layers, col.responses):
            print(f"  layer {layer:>3}: {text}")
    print(f"wrote {out} and {md}")
    return out, md
