"""The demo's embedded default: task, model sizes and budgets (full and ``--quick``).

Every number here was chosen from measured learning curves (``docs/demo.md`` has them and the
command that produced them); the reasons are in the field comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vlsi.data.synthetic import DEFAULT_COLORS, DEFAULT_SHAPES, SyntheticConfig
from vlsi.tiny import TinySize

# Questions about what is in the image (no absolute positions: the tiny LMs see the 4 vision
# tokens through M-RoPE only and learn "top-left"-style questions far too slowly on a CPU).
DEMO_CATEGORIES = ("color_of", "shape_of", "count_color", "count_shape")


def demo_task(seed: int = 0, num_train: int = 4000, num_eval: int = 300) -> SyntheticConfig:
    """56-px images (4 vision tokens, one per quadrant), 4 shapes x 4 colours, up to 4 objects.

    Objects fill their cell (``object_scale`` 1), so a shape is always drawn the same way and
    the tiny vision encoders learn it in a few hundred steps; counting ("How many stars?") is
    what separates the sizes.
    """
    return SyntheticConfig(
        seed=seed, num_train=num_train, num_eval=num_eval, image_size=56, grid_size=2,
        min_objects=1, max_objects=4, categories=DEMO_CATEGORIES, mc_fraction=0.0,
        shapes=DEFAULT_SHAPES[:4], colors=DEFAULT_COLORS[:4], object_scale=(1.0, 1.0),
    )


@dataclass(frozen=True)
class StageBudget:
    steps: int
    learning_rate: float
    min_learning_rate: float
    batch_size: int = 32


@dataclass(frozen=True)
class DemoRecipe:
    """Everything a demo run needs besides its output directory and seed."""

    task: SyntheticConfig = field(default_factory=demo_task)
    # Same vision encoder for both (as Qwen2-VL-2B and -72B share one ViT); the language
    # models differ: 8 layers x 96 against 3 layers x 16. Trained the same way (1,000 steps of
    # 32, lr 2e-3), an 8x96 reached 80.7% held-out (teacher-forced) and a 2x16 53.0%.
    teacher: TinySize = TinySize(num_layers=8, hidden_size=96, intermediate_size=192, num_heads=4,
                                 num_kv_heads=2, vision_depth=2, vision_width=48, extra_vocab=24)
    student: TinySize = TinySize(num_layers=3, hidden_size=16, intermediate_size=32, num_heads=2,
                                 num_kv_heads=1, vision_depth=2, vision_width=48, extra_vocab=8)
    teacher_pretrain: StageBudget = StageBudget(1000, 2e-3, 1e-4)
    student_pretrain: StageBudget = StageBudget(1000, 2e-3, 1e-4)
    verbalize: StageBudget = StageBudget(150, 2e-3, 1e-4)
    interact: StageBudget = StageBudget(300, 2e-3, 1e-4)
    sft: StageBudget = StageBudget(300, 2e-3, 1e-4)
    lora_r: int = 16          # the student's width: LoRA can express any update of a matrix
    lora_alpha: int = 32
    curve_every: int = 100    # pretraining curve: held-out accuracy every N steps
    curve_samples: int = 200  # ... on this many eval samples (teacher-forced)
    panel_questions: int = 4  # Fig. 3 panel: eval questions shown layer by layer
    max_new_tokens: int = 8   # answers are one or two words

    def quick(self) -> DemoRecipe:
        """``--quick``: the same pipeline on a fraction of the budget (checks the plumbing)."""
        def cut(b: StageBudget, steps: int) -> StageBudget:
            return replace(b, steps=steps)

        return replace(
            self, task=replace(self.task, num_train=600, num_eval=64),
            teacher_pretrain=cut(self.teacher_pretrain, 100),
            student_pretrain=cut(self.student_pretrain, 60),
            verbalize=cut(self.verbalize, 15), interact=cut(self.interact, 30),
            sft=cut(self.sft, 30), curve_every=40, curve_samples=64, panel_questions=2,
        )
