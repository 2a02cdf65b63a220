"""Offline tiny backbones: random-initialised teacher/student pairs saved as HF checkpoints.

Tests and the demo cannot download anything, so this module builds, for each supported family,
a small teacher and a smaller student that share one locally trained tokenizer (byte-level BPE
with Qwen-style special tokens and a chat template) and saves each as an ordinary Hugging Face
checkpoint directory: ``config.json``, ``model.safetensors``, tokenizer files,
``chat_template.jinja``, ``preprocessor_config.json`` and ``generation_config.json``.
``AutoModelForImageTextToText.from_pretrained(dir)`` loads them back.

Example::

    from vlsi.models.tiny import TinySize, save_tiny_pair
    pair = save_tiny_pair("runs/tiny", family="qwen2_vl")
    pair.teacher, pair.student   # two checkpoint directories

Like the real Qwen2-VL pair (2B: 151,936 LM-head rows, 7B: 152,064), teacher and student pad
their LM heads to different sizes past the tokenizer's length, so the shared-vocabulary logic
is exercised.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlsi.errors import VlsiError
from vlsi.models.backbones import Backbone, read_model_type
from vlsi.models.families import family_for

TINY_MANIFEST = "tiny.json"  # the settings a saved pair was built with

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
]

# Chat templates written for this project in the Qwen "im_start/im_end" style. A string content
# is used as is; a list content renders {"type": "image"} as the family's image placeholder and
# {"type": "text"} as its text. No default system prompt: the tiny models have short contexts.
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '__IMAGE__' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
def chat_template(family: str) -> str:
    """The tiny checkpoints' chat template for ``family``."""
    return _TEMPLATE.replace("__IMAGE__", family_for(family).chat_image_markup)


# Text the tokenizer is trained on: the words of the synthetic visual-instruction data and
# some general English, so that common words become single tokens. Any text still encodes
# (byte-level BPE has no unknown token).
_CORPUS = """
What colour is the shape in the top-left quadrant? What color is the circle? red green blue
yellow purple orange cyan magenta white black gray pink brown. circle square triangle diamond
star cross plus hexagon pentagon heart. top-left top-right bottom-left bottom-right left right
above below center middle. How many shapes are there? How many red shapes are in the image?
zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10. Is the red shape
left of the blue shape? yes no. Where is the triangle? Which shape completes the sequence?
a star with a dot, a diamond with a dot, a square without a dot. The answer is (B). Answer with
the option's letter from the given choices directly. A. B. C. D. Options: Question: Hint:
The image shows a pattern of shapes in a row. The last panel is a question mark.
You are a helpful assistant. Describe the image. This image contains a small object.
the a an of in on at to is are was with without and or for from by this that which what where
""".split()


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a built-in corpus, Qwen-style special tokens.

    Deterministic: the same ``vocab_size`` gives the same vocabulary. Returns a
    ``PreTrainedTokenizerFast`` with eos ``<|im_end|>`` and pad ``<|endoftext|>``; the chat
    template is set per family by :func:`save_tiny_pair`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(_CORPUS[i : i + 16]) for i in range(0, len(_CORPUS), 16)]
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=4096,
    )


@dataclass(frozen=True)
class TinySize:
    """Shape of a tiny backbone: language model and vision encoder.

    ``extra_vocab`` LM-head rows are added past the tokenizer's length (HF pads real Qwen
    checkpoints the same way).
    """

    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_width: int = 32
    extra_vocab: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 8:
            raise ValueError("head_dim (hidden_size / num_heads) must be a multiple of 8 (M-RoPE)")


TEACHER = TinySize(num_layers=8, hidden_size=96, intermediate_size=192, num_heads=4,
                   num_kv_heads=2, vision_depth=2, vision_width=48, extra_vocab=24)
STUDENT = TinySize(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_kv_heads=2, vision_depth=2, vision_width=32, extra_vocab=8)

def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) like Qwen's 16/24/24."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def tiny_config(family: str, size: TinySize, tokenizer) -> Any:
    """A transformers config of ``family`` with the shapes of ``size`` (the entry's builder)."""
    entry = family_for(family)
    ids = _token_ids(tokenizer)
    head_dim = size.hidden_size // size.num_heads
    text = dict(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        vocab_size=len(tokenizer) + size.extra_vocab,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)}
    return entry.tiny_config(size, text, rope, ids)


def tiny_image_processor(family: str) -> Any:
    """The family's PIL image processor with the tiny checkpoints' geometry."""
    return family_for(family).tiny_image_processor()


VISION_INIT_STD = 0.1


def widen_vision_init(parameters: list[nn.Parameter], std: float = VISION_INIT_STD) -> None:
    """Re-draw every matrix/kernel in ``parameters`` from N(0, std^2); norms and biases stay.

    HF draws every weight from N(0, 0.02) (the text config's ``initializer_range``; the vision
    config's own value is not used), which suits widths in the thousands. At the tiny widths
    here (32-48) the vision tower's output then barely depends on the image, and a tiny VLM
    trained from scratch does not learn to look at it (the measurement is in ``docs/demo.md``).
    Only the vision tower and projector are re-drawn.
    """
    with torch.no_grad():
        for param in parameters:
            if param.dim() >= 2:
                param.normal_(0.0, std)


def build_tiny_model(family: str, size: TinySize, tokenizer, seed: int = 0):
    """A randomly initialised ``...ForConditionalGeneration`` of ``family`` (float32)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(family, size, tokenizer))
    widen_vision_init(Backbone(model).vision_parameters())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def save_tiny_checkpoint(out_dir: str | Path, family: str, size: TinySize, tokenizer, seed: int = 0) -> Path:
    """Build a tiny model of ``family`` and save it as a complete HF checkpoint directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(family, size, tokenizer, seed=seed)
    model.save_pretrained(out)
    tokenizer.chat_template = chat_template(family)
    tokenizer.save_pretrained(out)
    tiny_image_processor(family).save_pretrained(out)
    return out


@dataclass
class TinyPair:
    teacher: Path
    student: Path
    family: str
    sizes: dict[str, TinySize] = field(default_factory=dict)


def save_tiny_pair(
    out_dir: str | Path,
    family: str = "qwen2_vl",
    *,
    teacher: TinySize = TEACHER,
    student: TinySize = STUDENT,
    seed: int = 0,
    tokenizer_vocab: int = 512,
    force: bool = False,
) -> TinyPair:
    """Save a teacher and a student of ``family`` under ``out_dir/{teacher,student}``.

    Both share one tokenizer. A pair already saved there with the same settings (recorded in
    ``out_dir/tiny.json``) is reused; one of other settings (another family, sizes or seed) is
    refused with a one-line error, or rebuilt with ``force``.
    """
    family_for(family)  # raises with the supported list
    out = Path(out_dir)
    pair = TinyPair(out / "teacher", out / "student", family, {"teacher": teacher, "student": student})
    settings = {"family": family, "teacher": asdict(teacher), "student": asdict(student), "seed": seed,
                "tokenizer_vocab": tokenizer_vocab}
    manifest = out / TINY_MANIFEST
    saved = [d for d in (pair.teacher, pair.student) if (d / "config.json").is_file()]
    if saved and not force:
        recorded = json.loads(manifest.read_text()) if manifest.is_file() else None
        if recorded == settings:
            return pair
        held = recorded["family"] if recorded else read_model_type(saved[0])
        raise VlsiError(f"{out} already holds a tiny {held} pair of other settings than asked ({family}); "
                        "use another directory, or --force to rebuild it there")
    for directory in (pair.teacher, pair.student):
        if directory.exists():
            shutil.rmtree(directory)
    tokenizer = build_tiny_tokenizer(tokenizer_vocab)
    save_tiny_checkpoint(pair.teacher, family, teacher, tokenizer, seed=seed)
    save_tiny_checkpoint(pair.student, family, student, tokenizer, seed=seed + 1)
    manifest.write_text(json.dumps(settings, indent=1) + "\n")
    return pair
