"""The demo's recipes: task, model sizes and budgets (full and ``--quick``), one per regime.

:data:`REGIMES` maps ``--regime`` to its recipe: ``lists`` (:func:`lists_recipe`, the default:
free-form answers right in any order, a 5-layer student) and ``counts`` (:class:`DemoRecipe`'s
own defaults: one-digit counts, a 2-layer student). ``docs/demo.md`` has the curves, the search
behind every number here and where each shipped pair falls short of the paper's regime. Both:

* both models are pretrained long on the instruction data before distillation, so that
  continued SFT of the student adds little (the report says whether each curve has reached
  its plateau);
* they share one vision encoder (Qwen2-VL-2B, -7B and -72B share one ViT): the teacher's,
  trained with it, is copied into the student and frozen, so the teacher's advantage is its
  deeper and wider language model;
* the questions need that language model (counts: combined by "and", "or", "more than" and
  arithmetic on a count, :data:`vlsi.data.synthetic.REASONING_CATEGORIES`; lists: every item
  named once, in an order of the model's choosing, :data:`vlsi.data.synthetic.LIST_CATEGORIES`).

Pretraining a pair takes longer than the demo's budget (30 to 80 minutes), so the package ships
one per regime (:mod:`vlsi.demo.pair`); ``vlsi demo pretrain [--regime R] --out DIR`` rebuilds
it from scratch with :attr:`DemoRecipe.pretraining` and reports whether the files are identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vlsi.data.synthetic import DEFAULT_COLORS, DEFAULT_SHAPES, LIST_CATEGORIES, SyntheticConfig
from vlsi.models.tiny import TinySize

DEMO_CATEGORIES = ("count_color", "count_shape", "count_and", "count_or", "count_more", "count_add")


def demo_task(seed: int = 0, num_train: int = 16000, num_eval: int = 400) -> SyntheticConfig:
    """56-px images (4 vision tokens, one per quadrant), 4 shapes x 4 colours, 1-4 objects.

    Objects fill their cell (``object_scale`` 1), so a shape is always drawn the same way;
    every question is a count, alone or combined with a second predicate or a sum.
    """
    return SyntheticConfig(
        seed=seed, num_train=num_train, num_eval=num_eval, image_size=56, grid_size=2,
        min_objects=1, max_objects=4, categories=DEMO_CATEGORIES, mc_fraction=0.0,
        shapes=DEFAULT_SHAPES[:4], colors=DEFAULT_COLORS[:4], object_scale=(1.0, 1.0),
    )


def list_task(seed: int = 0, num_train: int = 32000, num_eval: int = 400) -> SyntheticConfig:
    """The "lists" regime: free-form answers that are right in any order (scored as a multiset).

    56-px images (one vision token per quadrant), 4 shapes x 6 colours, 1-4 objects filling
    their cells; "List every object with its colour." and "Which shapes are red?".
    """
    return SyntheticConfig(
        seed=seed, num_train=num_train, num_eval=num_eval, image_size=56, grid_size=2,
        min_objects=1, max_objects=4, categories=LIST_CATEGORIES, mc_fraction=0.0,
        shapes=DEFAULT_SHAPES[:4], colors=DEFAULT_COLORS, object_scale=(1.0, 1.0),
    )


@dataclass(frozen=True)
class StageBudget:
    steps: int
    learning_rate: float
    min_learning_rate: float
    batch_size: int = 32


@dataclass(frozen=True)
class DemoRecipe:
    """Everything a demo run needs besides its output directory and seeds.

    ``task``, the sizes, the two pretraining budgets, ``curve_*`` and the two thread counts
    decide the pretrained pair (:attr:`pretraining`); the rest decides the distillation runs.
    """

    task: SyntheticConfig = field(default_factory=demo_task)
    teacher: TinySize = TinySize(num_layers=8, hidden_size=96, intermediate_size=192, num_heads=4,
                                 num_kv_heads=2, vision_depth=2, vision_width=48, extra_vocab=24)
    student: TinySize = TinySize(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=1,
                                 num_kv_heads=1, vision_depth=2, vision_width=48, extra_vocab=8)
    teacher_pretrain: StageBudget = StageBudget(8000, 2e-3, 1e-4)
    student_pretrain: StageBudget = StageBudget(20000, 2e-3, 1e-4)
    student_samples: int | None = None  # the student pretrains on the first N (None: all)
    pair_seed: int = 0
    pretrain_threads: int = 2  # the teacher's; CPU training is bit-exact for a fixed thread count
    student_pretrain_threads: int = 1  # an 8-wide model trains as fast on one thread
    curve_every: int = 500    # pretraining curve: held-out accuracy every N steps
    curve_samples: int = 400  # ... on this many eval samples (teacher-forced)
    teacher_snapshots: tuple[int, ...] = (2000, 4000, 6000)  # weaker teachers (the map)

    verbalize: StageBudget = StageBudget(100, 2e-3, 1e-4)
    interact: StageBudget = StageBudget(200, 2e-3, 1e-4)
    sft: StageBudget = StageBudget(200, 2e-3, 1e-4)
    distill_samples: int | None = None  # None: distil on the whole training split
    label_noise: float = 0.0  # share of distillation answers made wrong (vlsi.demo.noise)
    lora_r: int = 16          # the student's width: LoRA can express any update of a matrix
    lora_alpha: int = 32
    strategy: str = "vlsi"
    temperature_rule: str = "paper"
    num_beams: int = 5        # Table 4(b): VLsI without SFT, with beam search
    panel_questions: int = 4  # Fig. 3 panel: eval questions shown layer by layer
    max_new_tokens: int = 8   # answers are one digit
    workers: int = 2          # seeds run side by side, one torch thread each (vlsi.demo.workers)
    eval_samples: int | None = None  # None: the whole held-out split
    regime_samples: int = 512  # distillation samples the targets' information is measured on (vlsi.demo.regime)

    @property
    def pretraining(self) -> dict[str, Any]:
        """The fields that decide the pretrained pair (recorded in its ``pair.json``)."""
        keys = ("task", "teacher", "student", "teacher_pretrain", "student_pretrain",
                "student_samples", "pair_seed", "pretrain_threads", "student_pretrain_threads",
                "curve_every", "curve_samples", "teacher_snapshots")
        full = asdict(self)
        return {k: full[k] for k in keys}

    @property
    def teacher_pretraining(self) -> dict[str, Any]:
        """The fields that decide the pretrained teacher alone (a pair's teacher is reusable
        by any recipe that agrees on these: :func:`vlsi.demo.pair.reuse_teacher`)."""
        keys = ("task", "teacher", "teacher_pretrain", "pair_seed", "pretrain_threads",
                "curve_every", "curve_samples", "teacher_snapshots")
        full = self.pretraining
        return {k: full[k] for k in keys}

    def quick(self) -> DemoRecipe:
        """``--quick``: the shipped pair, distilled on a fraction of the budget (plumbing)."""
        return replace(self, verbalize=replace(self.verbalize, steps=10),
                       interact=replace(self.interact, steps=12), sft=replace(self.sft, steps=12),
                       distill_samples=512, panel_questions=1, eval_samples=48)

    def quick_pretraining(self) -> DemoRecipe:
        """A pair recipe small enough for the test suite (``vlsi demo pretrain --quick``)."""
        return replace(self, task=replace(self.task, num_train=256, num_eval=32),
                       teacher_pretrain=replace(self.teacher_pretrain, steps=12),
                       student_pretrain=replace(self.student_pretrain, steps=8),
                       curve_every=6, curve_samples=16, teacher_snapshots=(6,))


MAX_LENGTH = 256  # tokens per sample, prompt and answer


def training_config(budget: StageBudget, seed: int) -> dict[str, Any]:
    """The ``training`` settings of one stage of ``budget`` (a :class:`~vlsi.train.config.TrainingConfig` mapping)."""
    return dict(learning_rate=budget.learning_rate, min_learning_rate=budget.min_learning_rate,
                max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
                gradient_accumulation_steps=1, warmup_ratio=0.05, gradient_checkpointing=False,
                bf16=False, logging_steps=max(1, min(25, budget.steps // 4)),
                save_steps=max(50, budget.steps // 3), save_total_limit=1, seed=seed)


def lists_recipe() -> DemoRecipe:
    """The "lists" regime (docs/demo.md), chosen by its criteria before any distillation ran:

    * multi-token answers with many right orders, the reference one order drawn at random, so
      the teacher's distribution over the next item holds what one reference cannot;
    * a 5-layer, 8-wide student (4 target layers) and a 10-layer, 64-wide teacher (9), so the
      matching chooses (a 24-wide student came within 5 points of the teacher: docs/demo.md);
    * the teacher pretrains on all 32,000 training samples, the student (and every
      distillation run) on the first 8,000: the teacher saw four times the distillation data.
    """
    base = DemoRecipe()
    return replace(
        base, task=list_task(),
        teacher=TinySize(num_layers=10, hidden_size=64, intermediate_size=128, num_heads=4,
                         num_kv_heads=2, vision_depth=2, vision_width=48, extra_vocab=24),
        student=TinySize(num_layers=5, hidden_size=8, intermediate_size=16, num_heads=1,
                         num_kv_heads=1, vision_depth=2, vision_width=48, extra_vocab=8),
        teacher_pretrain=StageBudget(6000, 2e-3, 1e-4),
        student_pretrain=StageBudget(10000, 2e-3, 1e-4),
        student_samples=8000, distill_samples=8000, teacher_snapshots=(1500, 3000, 4500),
        pretrain_threads=1, max_new_tokens=32)


REGIMES = {"lists": lists_recipe, "counts": DemoRecipe}
DEFAULT_REGIME = "lists"  # docs/demo.md
