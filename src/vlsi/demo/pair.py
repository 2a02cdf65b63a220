"""The demo's pretrained teacher/student pair: built from scratch, shipped, verified.

    vlsi demo pretrain --out DIR [--quick] [--teacher-from PAIR|shipped]

:func:`build_pair` writes the synthetic data, builds the random-initialised tiny pair (one
tokenizer), trains the teacher (every parameter) and then the student, whose vision encoder is
the trained teacher's, frozen (:func:`vlsi.demo.pretrain.share_vision_encoder`). Layout::

    DIR/data/                 the synthetic dataset (regenerated identically by the demo)
    DIR/init/{teacher,student}/   the random initialisation
    DIR/teacher/model/        the trained teacher (curve.json beside it)
    DIR/student/model/        the trained student ("student before")
    DIR/pair.json             what the pair was made from, its files' SHA-256, the curves

Training on the CPU is bit-exact for a fixed thread count (``pretrain_threads`` for the
teacher, ``student_pretrain_threads`` for the student), so the same
recipe on the same kind of machine gives the same files; ``pair.json`` records the torch
version and threads so a difference can be explained. The package ships the pair built from
the default recipe in ``vlsi/demo/pair/`` (models, teacher snapshots and ``pair.json``; about 15 MB):
:func:`shipped_pair`. :func:`load_pair` refuses a pair made from another recipe, and
:func:`compare_pairs` lists the files where two pairs differ.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlsi.demo.recipe import DEFAULT_REGIME
from vlsi.errors import VlsiError

PAIR_FILE = "pair.json"
SHIPPED_DIR = Path(__file__).parent / "pair"  # the "counts" regime's pair
SHIPPED_DIRS = {"counts": SHIPPED_DIR, "lists": Path(__file__).parent / "pair-lists"}
ROLES = ("teacher", "student")


def rebuild_command(recipe: Any = None) -> str:
    """The command that rebuilds the pair of ``recipe`` (its regime named when it is one of ours)."""
    from vlsi.demo.recipe import REGIMES

    regime = next((name for name, make in REGIMES.items()
                   if recipe is not None and make().pretraining == recipe.pretraining), "REGIME")
    return f"vlsi demo pretrain --regime {regime} --out DIR"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class Pair:
    """A pretrained pair on disk."""

    root: Path
    meta: dict[str, Any]

    @property
    def teacher(self) -> Path:
        return self.root / self.meta["models"]["teacher"]

    @property
    def student(self) -> Path:
        return self.root / self.meta["models"]["student"]

    def snapshot(self, step: int) -> Path:
        return self.root / self.meta["teacher_snapshots"][str(step)]

    @property
    def shipped(self) -> bool:
        return any(self.root.resolve() == d.resolve() for d in SHIPPED_DIRS.values())


def model_files(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint directory, by relative path."""
    return {str(p.relative_to(model_dir)): sha256(p)
            for p in sorted(model_dir.rglob("*")) if p.is_file()}


def data_digest(data_dir: Path) -> str:
    """One SHA-256 over ``train.json`` and ``eval.json`` (the images follow from them)."""
    digest = hashlib.sha256()
    for name in ("train.json", "eval.json"):
        digest.update((data_dir / name).read_bytes())
    return digest.hexdigest()


def build_pair(out: str | Path, recipe: Any, *, say: Callable[[str], None] = print,
               teacher_from: Pair | None = None) -> Pair:
    """Train the pair of ``recipe`` into ``out`` (resumable) and write ``pair.json``.

    With ``teacher_from``, that pair's teacher is reused (:func:`reuse_teacher`) and only the
    student trains.
    """
    from torch.utils.data import Subset
    from transformers import set_seed

    from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
    from vlsi.data.synthetic import generate_dataset
    from vlsi.demo.pretrain import GREEDY, SNAPSHOTS, curve_measure, generated_accuracy, pretrain
    from vlsi.demo.recipe import MAX_LENGTH, training_config
    from vlsi.models.backbones import ImageEncoder, load_tokenizer
    from vlsi.models.tiny import save_tiny_pair
    from vlsi.tools.evaluate import load_items
    from vlsi.train.config import TrainingConfig

    out = Path(out)
    if (out / PAIR_FILE).is_file():
        pair = read_pair(out)
        check_recipe(pair, recipe)
        return pair
    out.mkdir(parents=True, exist_ok=True)
    if teacher_from is not None:
        reuse_teacher(out, teacher_from, recipe)
    threads = torch.get_num_threads()
    role_threads = {"teacher": recipe.pretrain_threads, "student": recipe.student_pretrain_threads}
    try:
        start = time.perf_counter()
        data = out / "data"
        if not (data / "meta.json").is_file():
            say(f"writing the synthetic dataset to {data}")
            generate_dataset(data, recipe.task, overwrite=True)
        set_seed(recipe.pair_seed)
        init = save_tiny_pair(out / "init", "qwen2_vl", teacher=recipe.teacher,
                              student=recipe.student, seed=recipe.pair_seed)
        tokenizer = load_tokenizer(init.student)
        images = ImageEncoder.from_pretrained(init.student)
        train = VisualInstructionDataset.from_files([data / "train.json"], tokenizer, images,
                                                    max_length=MAX_LENGTH)
        evalset = VisualInstructionDataset.from_files([data / "eval.json"], tokenizer, images,
                                                      max_length=MAX_LENGTH)
        curve_set = Subset(evalset, range(min(recipe.curve_samples, len(evalset))))
        collate = VisionLanguageCollator.for_tokenizer("qwen2_vl", tokenizer)
        measure = None  # teacher-forced accuracy
        if curve_measure(recipe.task.categories) == GREEDY:
            items = load_items(data / "eval.json")[0][:recipe.curve_samples]
            measure = generated_accuracy(items, tokenizer, images, recipe.max_new_tokens)
        done: dict[str, Any] = {}
        student_train = (train if recipe.student_samples is None
                         else Subset(train, range(min(recipe.student_samples, len(train)))))
        for role, init_dir, budget, role_train in (
                ("teacher", init.teacher, recipe.teacher_pretrain, train),
                ("student", init.student, recipe.student_pretrain, student_train)):
            say(f"training the {role} ({budget.steps} steps of {budget.batch_size}, "
                f"{role_threads[role]} thread(s))")
            torch.set_num_threads(role_threads[role])
            tcfg = TrainingConfig(**training_config(budget, recipe.pair_seed))
            done[role] = pretrain(
                init_dir, out / role, role_train, curve_set, collate, tcfg,
                eval_every=recipe.curve_every, name=f"{role} pretraining",
                vision_from=done["teacher"].model_dir if role == "student" else None,
                snapshot_steps=tuple(recipe.teacher_snapshots) if role == "teacher" else (),
                measure=measure,
            )
        shutil.rmtree(out / "init")  # the random weights are rebuilt from the seed on demand
        snapshots = {str(step): f"teacher/{SNAPSHOTS}/step-{step}" for step in recipe.teacher_snapshots}
        meta = {
            "recipe": _jsonable(recipe.pretraining),
            "models": {"teacher": "teacher/model", "student": "student/model"},
            "teacher_snapshots": snapshots,
            "data_sha256": data_digest(data),
            "files": {role: model_files(done[role].model_dir) for role in ROLES},
            "curves": {role: done[role].curve for role in ROLES},
            "params": {role: done[role].params for role in ROLES},
            "seconds": {role: round(done[role].seconds, 1) for role in ROLES},
            "wall_seconds": round(time.perf_counter() - start, 1),
            "built_with": {"torch": torch.__version__, "threads": role_threads,
                           "machine": platform.machine(), "python": platform.python_version()},
        }
        (out / PAIR_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    finally:
        torch.set_num_threads(threads)
    return Pair(out, meta)


def reuse_teacher(out: str | Path, source: Pair, recipe: Any) -> None:
    """Seed ``out`` with ``source``'s trained teacher and snapshots, so that :func:`build_pair`
    trains only the student (a new student size or budget for the same teacher).

    Refused (one line) when ``source``'s teacher was made from another teacher recipe
    (:attr:`~vlsi.demo.recipe.DemoRecipe.teacher_pretraining`; its ``task`` decides the data).
    """
    from vlsi.demo.pretrain import CURVE, MODEL_DIR
    from vlsi.files import write_json_atomic
    from vlsi.train.stages.run import STEP_COMPLETE

    ours = _jsonable(recipe.teacher_pretraining)
    theirs = {k: source.meta["recipe"].get(k) for k in ours}
    if theirs != ours:
        differ = ", ".join(k for k in ours if theirs[k] != ours[k])
        raise VlsiError(f"{source.root}: its teacher was made from another recipe ({differ} "
                        "differ); it cannot be reused")
    out = Path(out)
    teacher = out / "teacher"
    if (teacher / STEP_COMPLETE).is_file():
        return
    shutil.copytree(source.teacher, teacher / MODEL_DIR, dirs_exist_ok=True)
    for rel in source.meta["teacher_snapshots"].values():
        shutil.copytree(source.root / rel, out / rel, dirs_exist_ok=True)
    write_json_atomic(teacher / CURVE, {"name": "teacher pretraining",
                                        "eval_samples": recipe.curve_samples,
                                        "points": source.meta["curves"]["teacher"]})
    write_json_atomic(teacher / STEP_COMPLETE, {
        "stage": "teacher pretraining", "seconds": source.meta["seconds"]["teacher"],
        "params": source.meta["params"]["teacher"], "reused_from": str(source.root)})


def load_teacher_source(path: str | Path, regime: str = DEFAULT_REGIME) -> Pair:
    """The pair at ``path`` (``shipped``: the package's of ``regime``) read for :func:`reuse_teacher`."""
    pair = read_pair(shipped_pair(regime) if str(path) == "shipped" else path)
    check_model_files(pair, ("teacher",))
    return pair


def check_recipe(pair: Pair, recipe: Any) -> None:
    """A pair made from another pretraining recipe is refused (one line)."""
    if pair.meta.get("recipe") != _jsonable(recipe.pretraining):
        where = "the shipped pair" if pair.shipped else str(pair.root)
        raise VlsiError(f"{where} was made from another pretraining recipe than this demo's; "
                        f"rebuild it with `{rebuild_command(recipe)}` and pass --pair DIR")


def shipped_pair(regime: str = DEFAULT_REGIME) -> Path:
    """The directory of the pair the package ships for ``regime`` (``vlsi.demo.recipe.REGIMES``)."""
    if regime not in SHIPPED_DIRS:
        raise VlsiError(f"unknown demo regime {regime!r}; choose from {', '.join(SHIPPED_DIRS)}")
    return SHIPPED_DIRS[regime]


def read_pair(path: str | Path) -> Pair:
    """The pair whose ``pair.json`` is at ``path`` (refused in one line when there is none)."""
    root = Path(path)
    meta_file = root / PAIR_FILE
    if not meta_file.is_file():
        raise VlsiError(f"{root} holds no pretrained pair ({PAIR_FILE} missing); build one with "
                        f"`{rebuild_command()}`")
    return Pair(root, json.loads(meta_file.read_text()))


def check_model_files(pair: Pair, roles: tuple[str, ...] = ROLES) -> None:
    """Every file ``pair.json`` lists for ``roles`` is present."""
    for role in roles:
        model = pair.teacher if role == "teacher" else pair.student
        missing = [f for f in pair.meta["files"][role] if not (model / f).is_file()]
        if missing:
            raise VlsiError(f"{model}: pretrained {role} incomplete (missing {missing[0]})")


def load_pair(path: str | Path, recipe: Any) -> Pair:
    """The pair at ``path`` (``pair.json`` read, recipe checked, model files present)."""
    pair = read_pair(path)
    check_recipe(pair, recipe)
    check_model_files(pair)
    return pair


def compare_pairs(built: Pair, reference: Pair) -> list[str]:
    """Files whose SHA-256 differ between two pairs (empty: identical models and data)."""
    diffs = []
    if built.meta["data_sha256"] != reference.meta["data_sha256"]:
        diffs.append("data (train.json / eval.json)")
    for role in ROLES:
        ours, theirs = built.meta["files"][role], reference.meta["files"][role]
        diffs += [f"{role}/{name}" for name in sorted(set(ours) | set(theirs))
                  if ours.get(name) != theirs.get(name)]
    return diffs


def install_pair(pair: Pair, target: Path = SHIPPED_DIR) -> None:
    """Copy a built pair's models and ``pair.json`` to ``target`` (how the shipped one is made)."""
    if target.exists():
        shutil.rmtree(target)
    for role in ROLES:
        shutil.copytree(pair.teacher if role == "teacher" else pair.student,
                        target / pair.meta["models"][role])
    for step, rel in pair.meta["teacher_snapshots"].items():
        shutil.copytree(pair.root / rel, target / rel)
    shutil.copy2(pair.root / PAIR_FILE, target / PAIR_FILE)
