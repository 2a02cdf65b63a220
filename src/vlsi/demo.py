"""``vlsi demo``: the smallest end-to-end run, on an embedded default, offline, on a CPU.

It exercises every piece the training stages stand on, once, on tiny models:

1. writes the synthetic visual-instruction dataset (``vlsi.data.synthetic``);
2. builds a tiny Qwen2-VL teacher (8 layers, d=96) and student (4 layers, d=64) sharing one
   tokenizer, and checks the tokenizers agree on the shared vocabulary;
3. validates the data as ``vlsi data check`` does and collates one batch with images;
4. runs both models, attaches verbalizers (default target layers, verb-FFN) to each, computes
   the two-pass interaction loss with adaptive layer matching (Algorithm 1) and back-propagates
   it into the student;
5. writes ``interaction.json`` (KLD matrix, selected pairs, loss) into the output directory.

The models are untrained, so the numbers show the mechanics, not the method's benefit; the
three training stages and the full demo build on this.

Run: ``vlsi demo [--out runs/demo] [--seed 0]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlsi.backbones import ImageEncoder, load_backbone, load_tokenizer
from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.data.synthetic import SyntheticConfig, generate_dataset
from vlsi.interaction import interaction_loss
from vlsi.tiny import save_tiny_pair
from vlsi.verbalizer import VerbalizerSet, capture_layer_context, prediction_positions
from vlsi.vocab import check_tokenizers, shared_vocab_size


def _forward(backbone, batch):
    with capture_layer_context(backbone) as ctx:
        out = backbone.model(**backbone.model_inputs(batch), output_hidden_states=True)
    return out, ctx


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0, batch_size: int = 8) -> dict:
    """Run the demo into ``out_dir`` and return the written summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    steps = tqdm(total=5, desc="vlsi demo", unit="step")

    data_dir = out / "data"
    if not (data_dir / "train.json").is_file():
        generate_dataset(data_dir, SyntheticConfig(seed=seed, num_train=64, num_eval=16), overwrite=True)
    steps.update()

    pair = save_tiny_pair(out / "tiny", "qwen2_vl", seed=seed)
    teacher, student = load_backbone(pair.teacher), load_backbone(pair.student)
    tok = load_tokenizer(pair.student)
    vocab = shared_vocab_size(teacher.vocab_size, student.vocab_size)
    check_tokenizers(load_tokenizer(pair.teacher), tok, vocab)
    steps.update()

    dataset = VisualInstructionDataset.from_files(
        [data_dir / "train.json"], tok, ImageEncoder.from_pretrained(pair.student), max_length=512
    )
    collate = VisionLanguageCollator.for_tokenizer(student.family, tok)
    batch = collate([dataset[i] for i in range(min(batch_size, len(dataset)))])
    steps.update()

    t_verb, s_verb = VerbalizerSet(teacher), VerbalizerSet(student)
    for p in [*teacher.model.parameters(), *t_verb.parameters(), *s_verb.parameters()]:
        p.requires_grad_(False)
    # As in the interaction step: only the student's decoder layers learn (LoRA in the real
    # stage); its vision parts, final norm and LM head stay frozen.
    student.freeze_vision()
    for p in [*student.lm_head.parameters(), *student.final_norm.parameters()]:
        p.requires_grad_(False)
    positions = prediction_positions(batch["labels"])
    with torch.no_grad():
        t_out, t_ctx = _forward(teacher, batch)
    s_out, s_ctx = _forward(student, batch)
    t_stack, t_fn = t_verb.response_inputs(t_out.hidden_states, positions, t_ctx)
    s_stack, s_fn = s_verb.response_inputs(s_out.hidden_states, positions, s_ctx)
    result = interaction_loss(s_stack, t_stack, s_fn, t_fn, vocab_size=vocab,
                              generator=torch.Generator().manual_seed(seed))
    result.loss.backward()
    grad_norm = sum(float(p.grad.norm()) ** 2 for p in student.model.parameters() if p.grad is not None) ** 0.5
    steps.update()

    pairs = [(s_verb.layers[i], t_verb.layers[j]) for i, j in result.weights.nonzero().tolist()]
    summary = {
        "samples": len(dataset),
        "skipped": len(dataset.summary.skipped),
        "batch_size": int(batch["input_ids"].shape[0]),
        "response_positions": int(positions.sum()),
        "shared_vocab": vocab,
        "student_target_layers": s_verb.layers,
        "teacher_target_layers": t_verb.layers,
        "kld": [[None if v != v else round(v, 5) for v in row] for row in result.kld.tolist()],
        "matched_layers": pairs,
        "loss": float(result.loss.detach()),
        "student_grad_norm": grad_norm,
    }
    (out / "interaction.json").write_text(json.dumps(summary, indent=2) + "\n")
    steps.update()
    steps.close()
    print(f"data: {summary['samples']} samples ({summary['skipped']} skipped); batch of "
          f"{summary['batch_size']} with {summary['response_positions']} response positions")
    print(f"matched (student layer -> teacher layer): {pairs}")
    print(f"interaction loss {summary['loss']:.4f}, student gradient norm {grad_norm:.4f}")
    print(f"wrote {out / 'interaction.json'}")
    return summary
