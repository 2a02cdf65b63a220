"""VLsI's interaction loss on one batch, end to end, on a tiny pair built here (a few seconds on a CPU).

    python examples/method_in_code.py

What it does (docs/method.md explains every step):

1. builds a tiny teacher/student pair with one shared tokenizer (:func:`vlsi.models.tiny.save_tiny_pair`)
   in a temporary directory;
2. encodes ``examples/sample_record.json`` (one LLaVA-style record and its image) with the
   student's chat template and image processor, and collates it into a batch;
3. gives both models verbalizers on chosen target layers (untrained here: ``vlsi verbalize``
   trains them) and freezes them, with the teacher and the student's final norm and LM head;
4. runs the teacher (no grad) and the student (with grad, its LoRA weights trainable), gathers
   the positions that predict a response token, and computes one interaction loss with
   Algorithm 1's matching;
5. back-propagates it into the student's LoRA weights and prints the matched pairs and the loss.

The real step (``vlsi interact``) does the same per micro-batch inside a ``transformers.Trainer``
(:mod:`vlsi.train.stages.interact`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.method.interaction import interaction_loss
from vlsi.method.verbalizer import VerbalizerSet, prediction_positions
from vlsi.method.vocab import check_tokenizers, shared_vocab_size
from vlsi.models.backbones import ImageEncoder, load_backbone, load_tokenizer
from vlsi.models.tiny import save_tiny_pair
from vlsi.train.config import LoraSettings
from vlsi.train.lora import with_lora

RECORD = Path(__file__).resolve().parent / "sample_record.json"
# the tiny teacher has 8 decoder layers, the student 4; the last layer of each is not a target
# layer (the model's own LM head covers it). Real runs use the default rule (every 4th layer
# from index 1) or the paper's lists.
TEACHER_LAYERS = [0, 1, 2, 3, 4, 5, 6]
STUDENT_LAYERS = [0, 1, 2]


def main(record: Path = RECORD, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        pair = save_tiny_pair(Path(tmp) / "pair", "qwen2_vl", seed=seed)

        # -- one batch: the record encoded with the student's preprocessing -------------------
        tokenizer = load_tokenizer(pair.student)
        images = ImageEncoder.from_pretrained(pair.student)
        dataset = VisualInstructionDataset.from_files([record], tokenizer, images)
        batch = VisionLanguageCollator.for_tokenizer(images.family, tokenizer)([dataset[0]])

        # -- the two models, the shared vocabulary, the verbalizers ---------------------------
        teacher, student = load_backbone(pair.teacher), load_backbone(pair.student)
        vocab = shared_vocab_size(teacher.vocab_size, student.vocab_size)
        check_tokenizers(load_tokenizer(pair.teacher), tokenizer, vocab)
        teacher.model.requires_grad_(False)
        # verbalizers are frozen in this step (`vlsi verbalize` trained them; here they are new)
        t_verb = VerbalizerSet(teacher, TEACHER_LAYERS).requires_grad_(False)
        s_verb = VerbalizerSet(student, STUDENT_LAYERS).requires_grad_(False)
        # LoRA on the student's language model; everything else of the student is frozen, its
        # final norm and LM head included (the chunked loss refuses trainable ones)
        model = with_lora(student, LoraSettings(r=8, alpha=8, dropout=0.0), seed=seed)

        # -- the interaction loss on the response positions -----------------------------------
        positions = prediction_positions(batch["labels"])  # the positions that predict a reply token
        with torch.no_grad():
            t_out = teacher.model(**teacher.model_inputs(batch), output_hidden_states=True, use_cache=False)
        s_out = model(**student.model_inputs(batch), output_hidden_states=True, use_cache=False)
        # `decoder` verbalizers would also need each backbone's layer context
        # (vlsi.method.verbalizer.capture_layer_context); verb-ffn acts on each token alone
        t_stack, t_fn = t_verb.response_inputs(t_out.hidden_states, positions, transformed=True)
        s_stack, s_fn = s_verb.response_inputs(s_out.hidden_states, positions)
        result = interaction_loss(s_stack, t_stack, s_fn, t_fn, vocab_size=vocab, strategy="vlsi",
                                  generator=torch.Generator().manual_seed(seed))
        result.loss.backward()  # into the student's LoRA weights

        lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
        pairs = [(s_verb.layers[i], t_verb.layers[j]) for i, j in result.weights.nonzero().tolist()]
        print(f"response tokens: {int(positions.sum())}, shared vocabulary: {vocab}")
        print(f"student target layers {s_verb.layers}, teacher target layers {t_verb.layers}")
        print("KLD[i, j] (nan: outside Algorithm 1's search range):")
        print(result.kld)
        print("matched (student layer, teacher layer):", pairs)
        print(f"loss {result.loss.item():.4f} (last layer {result.last_loss:.4f}); "
              f"{len(lora_grads)} LoRA tensors received a gradient")
        return {"pairs": pairs, "loss": result.loss.item(), "lora_grads": len(lora_grads),
                "kld": result.kld, "weights": result.weights}


if __name__ == "__main__":
    main()
