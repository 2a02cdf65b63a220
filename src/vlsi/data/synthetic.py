"""Synthetic visual-instruction data: shapes, colours, counts, positions and sequence puzzles.

A deterministic (by seed) generator of small PIL-drawn images with question/answer pairs in the
LLaVA JSON format. It is the ground for the CPU demo, in which a larger tiny VLM (the teacher) must
clearly beat a smaller one trained the same way, so every difficulty knob is a config field.

Run it as ``vlsi data synth OUT_DIR --seed 0 --num-train 2000`` or from Python::

    from vlsi.data.synthetic import SyntheticConfig, generate_dataset
    summary = generate_dataset("data/synth", SyntheticConfig(seed=0, image_size=56))

``OUT_DIR`` then holds ``images/{train,eval}-NNNNNN.png``, ``train.json``, ``eval.json`` (LLaVA
lists) and ``meta.json`` (the config and the counts per split, category and form). A record::

    {"id": "train-000123", "image": "images/train-000123.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the shape in the
                        top-left quadrant?"}, {"from": "gpt", "value": "red"}],
     "category": "color_at", "answer": "red", "form": "short"}

``answer`` is always the gpt turn verbatim. Multiple-choice records (``form: "mc"``) list their
options in the question ("A. red\\nB. blue\\n...", then "Answer with the option's letter from the
given choices directly."), answer with the letter only and carry ``options`` (the texts, in letter
order). Image paths are relative to ``OUT_DIR``.

Categories (each in short-answer or multiple-choice form; answers in brackets):
  shape_at     What shape is in the top-left quadrant?                [circle, star, ...]
  shape_of     What shape is the red object? / What shape is in the image? (one object)
  color_at     What colour is the shape in the bottom-right quadrant? [red, blue, ...]
  color_of     What colour is the triangle?
  count_color  How many red shapes are there?                         [digits 0..max_objects]
  count_shape  How many stars are there?              (counts drawn uniformly: no "1" shortcut)
  relative     Is the red shape to the left or to the right of the star?  [left/right]
               Is the star above or below the blue shape?                 [above/below]
  where        Where is the blue shape?                               [top-left, ..., bottom-right]
  sequence     Which shape completes the sequence?                    [star with a dot, circle]
Two-step categories (not in the default mix; ``REASONING_CATEGORIES``), each answer a digit
drawn uniformly from its range before the scene is built:
  count_and    How many red stars are there?                   (colour AND shape)
  count_or     How many shapes are red or blue?                (sum of two colour counts)
  count_more   How many more red shapes than blue shapes are there?   (difference, >= 0)
  count_add    If 2 more stars were added, how many stars would there be?  (count + 1..3)
Free-form list categories (not in the default mix; ``LIST_CATEGORIES``), short form only; the
answer lists the items in an order drawn at random, and any order is right:
  list_objects List every object with its colour.            [blue square, red circle, ...]
  list_color   Which shapes are red?                  (1..max_objects of them) [circle, square]
Objects are referred to by colour ("the red shape"), shape ("the star") or both ("the red star"),
whichever is unique in the image, so most answers combine two visual facts. Sequence puzzles
(the paper's Fig. 3) are panels read left to right, top to bottom, repeating a motif of
``period`` distinct tokens (shape, optionally colour and a black dot), the last panel a "?";
the answer is the next token of the shortest period, e.g. "star with a dot".

Difficulty knobs (``SyntheticConfig`` fields, defaults in brackets):
  image_size [56]   Pixels per side. A multiple of 28 matches Qwen2-VL/2.5-VL's 14-px patches
                    merged 2x2 (use 64 for Qwen3-VL's 16-px patches); other sizes are resized by
                    the processor, which blurs. With grid_size 2 each quadrant is then exactly one
                    merged visual token (56 px: 4 tokens per image).
  grid_size [2]     Cells per side (even, so cells fall inside quadrants); one object per cell.
  min_objects, max_objects [1, 4]   Objects per scene (at most grid_size**2).
  categories [all]  Fewer categories -> fewer answer types to learn.
  shapes, colors    Palettes (defaults: 6 shapes without hexagon, 6 colours); smaller is easier.
  object_scale [(0.6, 0.9)]  Object side as a fraction of its cell; sizes and positions jitter.
  sequence_length [6], sequence_periods [(2, 3)], sequence_attributes [("dot",)]
                    Panels incl. the "?"; motif lengths; which attributes vary ("color", "dot").
                    (4, (2,)) is the easy setting; at 56 px six panels are 18x28 px each.
  mc_fraction [0.25], mc_options [4]   Share of multiple-choice samples; options per question.
An earlier trial (112 px; colour/shape at quadrant, count of a colour, where) was too slow to learn
for a 12-layer, 128-wide Qwen2-VL on CPU; start small (56 px, a few categories) and grow.

Determinism: every sample draws from its own ``random.Random`` seeded by a hash of (seed, split,
index, attempt), so the same config gives byte-identical JSON and PNG files and a different seed
gives different data. Train and eval use different streams; an eval sample whose (image pixels,
question) pair already occurs in train or earlier in eval is redrawn, so the splits never share
one (the key ignores the form: an MC eval question is never a train question with options added).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from vlsi.errors import VlsiError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
# Hexagon is left out by default: at ~20 px it is hard to tell from a circle.
DEFAULT_SHAPES: tuple[str, ...] = SHAPES[:6]
# Saturated, well separated colours; none is close to the white background, the black dot marker
# or the greys of the sequence-panel grid.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 210, 0),
    "purple": (140, 40, 190),
    "orange": (255, 130, 0),
    "cyan": (0, 200, 210),
    "pink": (255, 110, 190),
}
DEFAULT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
# One-hop questions: one visual fact, or one count (the default mix).
BASIC_CATEGORIES: tuple[str, ...] = (
    "shape_at", "shape_of", "color_at", "color_of", "count_color", "count_shape",
    "relative", "where", "sequence",
)
# Two-step questions over the objects: two predicates combined, or arithmetic on a count.
# Perception is the same as for one count; the extra step is done by the language model.
REASONING_CATEGORIES: tuple[str, ...] = ("count_and", "count_or", "count_more", "count_add")
# Free-form lists: every order of the items is a right answer; a record's answer is one order
# drawn at random, and it is scored as a multiset (``unordered`` records, vlsi.tools.evaluate).
LIST_CATEGORIES: tuple[str, ...] = ("list_objects", "list_color")
LIST_SEPARATOR = ", "
CATEGORIES: tuple[str, ...] = BASIC_CATEGORIES + REASONING_CATEGORIES + LIST_CATEGORIES
SEQUENCE_ATTRIBUTES: tuple[str, ...] = ("color", "dot")
QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
PLURALS: dict[str, str] = {"cross": "crosses"}
LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SEQUENCE_QUESTION = "Which shape completes the sequence?"

BACKGROUND = (255, 255, 255)
DOT_RGB = (0, 0, 0)
INK_RGB = (90, 90, 90)  # the "?" glyph
GRID_RGB = (180, 180, 180)  # sequence panel borders
MIN_OBJECT_PX = 8  # below this a star, cross and diamond are no longer told apart
MAX_ATTEMPTS = 200  # draws per sample before the config is declared too small to fill a split

Box = tuple[int, int, int, int]  # inclusive pixel box: x0, y0, x1, y1


@dataclass
class SyntheticConfig:
    """What to generate; see the module docstring for what each knob does to difficulty."""

    seed: int = 0
    num_train: int = 2000
    num_eval: int = 300
    image_size: int = 56
    grid_size: int = 2
    min_objects: int = 1
    max_objects: int = 4
    categories: tuple[str, ...] = BASIC_CATEGORIES
    mc_fraction: float = 0.25
    mc_options: int = 4
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colors: tuple[str, ...] = DEFAULT_COLORS
    object_scale: tuple[float, float] = (0.6, 0.9)
    sequence_length: int = 6
    sequence_periods: tuple[int, ...] = (2, 3)
    sequence_attributes: tuple[str, ...] = ("dot",)

    def __post_init__(self) -> None:
        # YAML and JSON give lists; tuples keep the config hashable and its repr stable.
        for name in ("categories", "shapes", "colors", "object_scale", "sequence_periods",
                     "sequence_attributes"):
            value = getattr(self, name)
            if isinstance(value, str):
                _fail(name, f"must be a list, got the string {value!r}")
            setattr(self, name, tuple(value))
        self._validate_counts()
        self._validate_palettes()
        self._validate_sequence()
        self._validate_geometry()

    def _validate_counts(self) -> None:
        _check_int("seed", self.seed)
        _check_int("num_train", self.num_train, minimum=0)
        _check_int("num_eval", self.num_eval, minimum=0)
        _check_int("mc_options", self.mc_options, minimum=2)
        if self.mc_options > len(LETTERS):
            _fail("mc_options", f"must be at most {len(LETTERS)}, got {self.mc_options}")
        if not isinstance(self.mc_fraction, (int, float)) or not 0 <= self.mc_fraction <= 1:
            _fail("mc_fraction", f"must be in [0, 1], got {self.mc_fraction!r}")
        listed = [c for c in self.categories if c in LIST_CATEGORIES]
        if listed and self.mc_fraction:
            _fail("mc_fraction", f"must be 0 with the free-form categories {', '.join(listed)} "
                  "(they have no multiple-choice form)")

    def _validate_palettes(self) -> None:
        _check_choices("categories", self.categories, CATEGORIES, minimum=1)
        _check_choices("shapes", self.shapes, SHAPES, minimum=2)
        _check_choices("colors", self.colors, tuple(COLOR_RGB), minimum=2)

    def _validate_geometry(self) -> None:
        _check_int("image_size", self.image_size, minimum=16)
        _check_int("grid_size", self.grid_size, minimum=2)
        if self.grid_size % 2:
            _fail("grid_size", f"must be even so every cell lies in one quadrant, "
                  f"got {self.grid_size}")
        _check_int("min_objects", self.min_objects, minimum=1)
        _check_int("max_objects", self.max_objects, minimum=self.min_objects)
        if self.max_objects > self.grid_size**2:
            _fail("max_objects", f"must be at most grid_size**2 = {self.grid_size**2}, "
                  f"got {self.max_objects}")
        if "relative" in self.categories and self.max_objects < 2:
            _fail("max_objects", "must be at least 2 for the 'relative' category")
        low, high = _check_scale(self.object_scale)
        smallest = int((self.image_size // self.grid_size - 2) * low)
        if smallest < MIN_OBJECT_PX:
            _fail("image_size", f"{self.image_size} px with grid_size {self.grid_size} and "
                  f"object_scale {low} gives {smallest}-px objects (< {MIN_OBJECT_PX})")
        if "sequence" in self.categories:
            panel = _sequence_object_px(self.image_size, self.sequence_length, high)
            if panel < MIN_OBJECT_PX:
                _fail("image_size", f"{self.image_size} px gives {panel}-px shapes in "
                      f"{self.sequence_length} sequence panels (< {MIN_OBJECT_PX})")

    def _validate_sequence(self) -> None:
        _check_choices("sequence_attributes", self.sequence_attributes, SEQUENCE_ATTRIBUTES,
                       minimum=0)
        if not self.sequence_periods:
            _fail("sequence_periods", "must not be empty")
        for period in self.sequence_periods:
            _check_int("sequence_periods", period, minimum=1)
        _check_int("sequence_length", self.sequence_length, minimum=3)
        # The motif must repeat at least once before the "?" for the period to be readable.
        if self.sequence_length < max(self.sequence_periods) + 2:
            _fail("sequence_length", f"must be at least max(sequence_periods) + 2 = "
                  f"{max(self.sequence_periods) + 2}, got {self.sequence_length}")
        if len(_token_pool(self, self.colors[0])) < max(self.sequence_periods):
            _fail("sequence_periods", "a motif needs distinct tokens; the shapes and "
                  "sequence_attributes allow too few")


def _fail(name: str, message: str) -> None:
    raise ValueError(f"SyntheticConfig.{name}: {message}")


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(name, f"must be at least {minimum}, got {value}")


def _check_choices(name: str, values: tuple, allowed: tuple[str, ...], minimum: int) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        _fail(name, f"unknown {unknown}; choose from {list(allowed)}")
    if len(set(values)) != len(values):
        _fail(name, f"has duplicates: {list(values)}")
    if len(values) < minimum:
        _fail(name, f"needs at least {minimum} entries, got {list(values)}")


def _check_scale(scale: tuple) -> tuple[float, float]:
    if len(scale) != 2 or not all(isinstance(s, (int, float)) for s in scale):
        _fail("object_scale", f"must be two numbers (low, high), got {scale!r}")
    low, high = scale
    if not 0 < low <= high <= 1:
        _fail("object_scale", f"needs 0 < low <= high <= 1, got {scale!r}")
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Drawing


def _span(index: int, cells: int, size: int) -> tuple[int, int]:
    """Pixel range [start, stop) of cell ``index`` when ``size`` px are cut into ``cells``."""
    return round(index * size / cells), round((index + 1) * size / cells)


def _regular_points(cx: float, cy: float, radii: list[float]) -> list[tuple[float, float]]:
    """Vertices at equal angles starting straight up, alternating through ``radii``."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.sin(k * step), cy - r * math.cos(k * step)) for k, r in enumerate(radii)]


def _shape_center(shape: str, box: Box) -> tuple[float, float]:
    """Where the dot marker goes: the visual centre (the centroid for a triangle)."""
    x0, y0, x1, y1 = box
    if shape == "triangle":
        return (x0 + x1) / 2, y0 + 2 * (y1 - y0) / 3
    if shape == "star":
        return (x0 + x1) / 2, (y0 + y1) / 2 + 0.1 * (y1 - y0) / 2
    return (x0 + x1) / 2, (y0 + y1) / 2


def _polygon(shape: str, box: Box) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape filling ``box`` (a square box)."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        # A fat star (inner radius 0.5) stays recognisable at 10-20 px; shifted down ~0.1 r so
        # its top point and bottom points touch the box edges.
        _, star_cy = _shape_center("star", box)
        return _regular_points(cx, star_cy, [r * 1.05, r * 0.5] * 5)
    if shape == "hexagon":
        return _regular_points(cx, cy, [r] * 6)
    if shape == "cross":
        t = r / 3  # half the arm width
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t),
                (cx + t, cy + t), (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t),
                (x0, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]) -> None:
    # Plain fills, no anti-aliasing: pixels are exactly palette colours, and drawing is fast.
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon(_polygon(shape, box), fill=rgb)


def _draw_dot(draw: ImageDraw.ImageDraw, shape: str, box: Box) -> None:
    cx, cy = _shape_center(shape, box)
    r = max(1.5, 0.15 * (box[2] - box[0]))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=DOT_RGB)


def _draw_question_mark(draw: ImageDraw.ImageDraw, box: Box) -> None:
    """A "?" from an arc, a stem and a dot: no font, so pixels do not depend on the system."""
    x0, y0, x1, y1 = box
    u = min(x1 - x0, y1 - y0) / 10
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - u
    width = max(1, round(0.8 * u))
    draw.arc((cx - 2 * u, cy - 4 * u, cx + 2 * u, cy), start=180, end=90, fill=INK_RGB, width=width)
    draw.line((cx, cy, cx, cy + 1.5 * u), fill=INK_RGB, width=width)
    draw.ellipse((cx - 0.7 * u, cy + 2.3 * u, cx + 0.7 * u, cy + 3.7 * u), fill=INK_RGB)


# ---------------------------------------------------------------------------------------------
# Scenes: objects on a grid, one per cell, so they never overlap


@dataclass(frozen=True)
class _Object:
    shape: str
    color: str
    row: int
    col: int
    box: Box


@dataclass(frozen=True)
class _QA:
    """A question with its true answer; ``choices`` is the answer space, ``near`` the facts
    present in the image that make hard multiple-choice distractors (tried first)."""

    question: str
    answer: str
    choices: tuple[str, ...]
    near: tuple[str, ...] = ()


def _sample_scene(rng: random.Random, cfg: SyntheticConfig, count: int | None = None
                  ) -> list[_Object]:
    """``count`` objects (default: uniform in [min_objects, max_objects]) in distinct cells."""
    if count is None:
        count = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(cfg.grid_size**2), count))
    return [_sample_object(rng, cfg, *divmod(cell, cfg.grid_size)) for cell in cells]


def _sample_object(rng: random.Random, cfg: SyntheticConfig, row: int, col: int) -> _Object:
    x_start, x_stop = _span(col, cfg.grid_size, cfg.image_size)
    y_start, y_stop = _span(row, cfg.grid_size, cfg.image_size)
    room = min(x_stop - x_start, y_stop - y_start) - 2  # 1-px gap on each side of the cell
    side = min(room, max(MIN_OBJECT_PX, int(room * rng.uniform(*cfg.object_scale))))
    left = x_start + 1 + rng.randint(0, x_stop - x_start - 2 - side)
    top = y_start + 1 + rng.randint(0, y_stop - y_start - 2 - side)
    box = (left, top, left + side - 1, top + side - 1)
    return _Object(rng.choice(cfg.shapes), rng.choice(cfg.colors), row, col, box)


def _render_scene(objects: list[_Object], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj.shape, obj.box, COLOR_RGB[obj.color])
    return image


def _quadrant(obj: _Object, grid_size: int) -> str:
    half = grid_size // 2
    return QUADRANTS[2 * (obj.row >= half) + (obj.col >= half)]


def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _referents(obj: _Object, objects: list[_Object]) -> list[str]:
    """Phrases that pick out ``obj`` alone among ``objects``."""
    colors = Counter(o.color for o in objects)
    shapes = Counter(o.shape for o in objects)
    pairs = Counter((o.color, o.shape) for o in objects)
    phrases = []
    if colors[obj.color] == 1:
        phrases.append(f"the {obj.color} shape")
    if shapes[obj.shape] == 1:
        phrases.append(f"the {obj.shape}")
    if not phrases and pairs[(obj.color, obj.shape)] == 1:
        phrases.append(f"the {obj.color} {obj.shape}")
    return phrases


def _others(values: list[str], answer: str) -> tuple[str, ...]:
    return tuple(v for v in dict.fromkeys(values) if v != answer)


# ---------------------------------------------------------------------------------------------
# Questions about a scene: each returns None when the scene cannot support the question


SceneQuestion = Callable[[random.Random, list[_Object], SyntheticConfig], "_QA | None"]


def _alone_in_quadrant(objects: list[_Object], grid_size: int) -> list[tuple[str, _Object]]:
    by_quadrant: dict[str, list[_Object]] = {}
    for obj in objects:
        by_quadrant.setdefault(_quadrant(obj, grid_size), []).append(obj)
    return [(q, objs[0]) for q, objs in sorted(by_quadrant.items()) if len(objs) == 1]


def _ask_at(attribute: str, question: str) -> SceneQuestion:
    """``What <attribute> ... the <quadrant> quadrant?`` about the object alone in a quadrant."""
    def ask(rng: random.Random, objects: list[_Object], cfg: SyntheticConfig) -> _QA | None:
        candidates = _alone_in_quadrant(objects, cfg.grid_size)
        if not candidates:
            return None
        quadrant, obj = rng.choice(candidates)
        value = getattr(obj, attribute)
        return _QA(question.format(quadrant=quadrant), value, getattr(cfg, attribute + "s"),
                   _others([getattr(o, attribute) for o in objects], value))
    return ask


_ask_shape_at = _ask_at("shape", "What shape is in the {quadrant} quadrant?")
_ask_color_at = _ask_at("color", "What colour is the shape in the {quadrant} quadrant?")


def _ask_shape_of(rng: random.Random, objects: list[_Object], cfg: SyntheticConfig) -> _QA | None:
    near = [o.shape for o in objects]
    if len(objects) == 1:
        return _QA("What shape is in the image?", objects[0].shape, cfg.shapes)
    colors = Counter(o.color for o in objects)
    unique = [o for o in objects if colors[o.color] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return _QA(f"What shape is the {obj.color} object?", obj.shape, cfg.shapes,
               _others(near, obj.shape))


def _ask_color_of(rng: random.Random, objects: list[_Object], cfg: SyntheticConfig) -> _QA | None:
    shapes = Counter(o.shape for o in objects)
    unique = [o for o in objects if shapes[o.shape] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return _QA(f"What colour is the {obj.shape}?", obj.color, cfg.colors,
               _others([o.color for o in objects], obj.color))


def _count_choices(cfg: SyntheticConfig) -> tuple[str, ...]:
    # Digits, not number words: one token each in the Qwen tokenizers.
    return tuple(str(n) for n in range(cfg.max_objects + 1))


def _sample_count_scene(rng: random.Random, cfg: SyntheticConfig, attribute: str
                        ) -> tuple[list[_Object], str, int]:
    """A scene with exactly ``count`` objects of one ``attribute`` value ("color" or "shape").

    The count is drawn uniformly from 0..max_objects first: in freely drawn scenes about 70% of
    the answers are "1", a shortcut that would hide the difference between models.
    """
    count = rng.randint(0, cfg.max_objects)
    scene = _sample_scene(rng, cfg, rng.randint(max(count, cfg.min_objects), cfg.max_objects))
    palette = cfg.colors if attribute == "color" else cfg.shapes
    value = rng.choice(palette)
    others = [v for v in palette if v != value]
    chosen = set(rng.sample(range(len(scene)), count))
    scene = [replace(obj, **{attribute: value if k in chosen else rng.choice(others)})
             for k, obj in enumerate(scene)]
    return scene, value, count


def _count_qa(question: str, count: int, cfg: SyntheticConfig) -> _QA:
    return _QA(question, str(count), _count_choices(cfg),
               _others([str(count - 1), str(count + 1)], str(count)))


def _ask_relative(rng: random.Random, objects: list[_Object], cfg: SyntheticConfig) -> _QA | None:
    pairs = [(a, b) for a in objects for b in objects
             if a is not b and _referents(a, objects) and _referents(b, objects)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    ref_a = rng.choice(_referents(a, objects))
    ref_b = rng.choice(_referents(b, objects))
    axes = [axis for axis, differ in (("x", a.col != b.col), ("y", a.row != b.row)) if differ]
    # Objects in distinct cells differ in a row or a column, so one axis always exists.
    if rng.choice(axes) == "x":
        answer = "left" if a.col < b.col else "right"
        return _QA(f"Is {ref_a} to the left or to the right of {ref_b}?", answer, ("left", "right"))
    answer = "above" if a.row < b.row else "below"
    return _QA(f"Is {ref_a} above or below {ref_b}?", answer, ("above", "below"))


def _ask_where(rng: random.Random, objects: list[_Object], cfg: SyntheticConfig) -> _QA | None:
    candidates = [o for o in objects if _referents(o, objects)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    quadrant = _quadrant(obj, cfg.grid_size)
    return _QA(f"Where is {rng.choice(_referents(obj, objects))}?", quadrant, QUADRANTS,
               _others([_quadrant(o, cfg.grid_size) for o in objects], quadrant))


def _recolour(rng: random.Random, scene: list[_Object], plan: list[str | None],
              cfg: SyntheticConfig, avoid: tuple[str, ...]) -> list[_Object]:
    """Give object ``k`` colour ``plan[k]``, or (``None``) a palette colour not in ``avoid``."""
    others = [c for c in cfg.colors if c not in avoid]
    return [replace(obj, color=color if color is not None else rng.choice(others))
            for obj, color in zip(scene, plan)]


def _scene_with(rng: random.Random, cfg: SyntheticConfig, needed: int) -> list[_Object]:
    """A scene of at least ``needed`` objects (and at least ``min_objects``)."""
    return _sample_scene(rng, cfg, rng.randint(max(needed, cfg.min_objects), cfg.max_objects))


def _ask_count_and(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[_Object], _QA]:
    count = rng.randint(0, cfg.max_objects)
    scene = _scene_with(rng, cfg, count)
    color, shape = rng.choice(cfg.colors), rng.choice(cfg.shapes)
    chosen = set(rng.sample(range(len(scene)), count))
    pairs = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) != (color, shape)]
    scene = [replace(obj, color=color, shape=shape) if k in chosen
             else replace(obj, **dict(zip(("color", "shape"), rng.choice(pairs))))
             for k, obj in enumerate(scene)]
    return scene, _count_qa(f"How many {color} {_plural(shape)} are there?", count, cfg)


def _ask_count_or(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[_Object], _QA]:
    count = rng.randint(0, cfg.max_objects)
    scene = _scene_with(rng, cfg, count)
    first, second = rng.sample(cfg.colors, 2)
    chosen = set(rng.sample(range(len(scene)), count))
    plan = [rng.choice((first, second)) if k in chosen else None for k in range(len(scene))]
    scene = _recolour(rng, scene, plan, cfg, avoid=(first, second))
    return scene, _count_qa(f"How many shapes are {first} or {second}?", count, cfg)


def _ask_count_more(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[_Object], _QA]:
    difference = rng.randint(0, cfg.max_objects)
    smaller = rng.randint(0, (cfg.max_objects - difference) // 2)
    larger = smaller + difference
    scene = _scene_with(rng, cfg, larger + smaller)
    first, second = rng.sample(cfg.colors, 2)
    plan: list[str | None] = [first] * larger + [second] * smaller
    plan += [None] * (len(scene) - len(plan))
    rng.shuffle(plan)
    scene = _recolour(rng, scene, plan, cfg, avoid=(first, second))
    return scene, _count_qa(f"How many more {first} shapes than {second} shapes are there?",
                            difference, cfg)


def _ask_count_add(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[_Object], _QA]:
    scene, shape, count = _sample_count_scene(rng, cfg, "shape")
    added = rng.randint(1, 3)
    answer = count + added
    question = (f"If {added} more {_plural(shape) if added > 1 else shape} "
                f"{'were' if added > 1 else 'was'} added, how many {_plural(shape)} would there be?")
    choices = tuple(str(n) for n in range(1, cfg.max_objects + 4))
    return scene, _QA(question, str(answer), choices,
                      _others([str(count), str(answer - 1), str(answer + 1)], str(answer)))


def _ask_list_objects(rng: random.Random, objects: list[_Object], cfg: SyntheticConfig) -> _QA:
    items = [f"{o.color} {o.shape}" for o in objects]
    rng.shuffle(items)
    return _QA("List every object with its colour.", LIST_SEPARATOR.join(items), ())


def _ask_list_color(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[_Object], _QA]:
    count = rng.randint(1, cfg.max_objects)
    scene = _scene_with(rng, cfg, count)
    color = rng.choice(cfg.colors)
    chosen = set(rng.sample(range(len(scene)), count))
    scene = _recolour(rng, scene, [color if k in chosen else None for k in range(len(scene))],
                      cfg, avoid=(color,))
    items = [o.shape for o in scene if o.color == color]
    rng.shuffle(items)
    return scene, _QA(f"Which shapes are {color}?", LIST_SEPARATOR.join(items), ())


_REASONING_QUESTIONS = {
    "count_and": _ask_count_and,
    "count_or": _ask_count_or,
    "count_more": _ask_count_more,
    "count_add": _ask_count_add,
    "list_color": _ask_list_color,
}


_SCENE_QUESTIONS: dict[str, SceneQuestion] = {
    "shape_at": _ask_shape_at,
    "shape_of": _ask_shape_of,
    "color_at": _ask_color_at,
    "color_of": _ask_color_of,
    "relative": _ask_relative,
    "where": _ask_where,
    "list_objects": _ask_list_objects,
}


# ---------------------------------------------------------------------------------------------
# Sequence puzzles (paper Fig. 3)


@dataclass(frozen=True)
class _Token:
    shape: str
    color: str
    dot: bool


def _token_pool(cfg: SyntheticConfig, base_color: str) -> list[_Token]:
    """Every token a motif may use; attributes that do not vary keep one value."""
    colors = cfg.colors if "color" in cfg.sequence_attributes else (base_color,)
    dots = (False, True) if "dot" in cfg.sequence_attributes else (False,)
    return [_Token(s, c, d) for s in cfg.shapes for c in colors for d in dots]


def _phrase(token: _Token, attributes: tuple[str, ...]) -> str:
    """The answer text, naming only the attributes the puzzle varies: "red star with a dot"."""
    words = f"{token.color} {token.shape}" if "color" in attributes else token.shape
    return words + " with a dot" if token.dot else words


def _panel_layout(panels: int) -> tuple[int, int]:
    """(columns, rows) of the panel grid, read left to right, top to bottom."""
    cols = math.ceil(math.sqrt(panels))
    return cols, math.ceil(panels / cols)


def _sequence_object_px(image_size: int, panels: int, scale: float) -> int:
    cols, rows = _panel_layout(panels)
    return int((min(image_size // cols, image_size // rows) - 4) * scale)


def _render_sequence(shown: list[_Token], cfg: SyntheticConfig) -> Image.Image:
    size, panels = cfg.image_size, cfg.sequence_length
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cols, rows = _panel_layout(panels)
    side = _sequence_object_px(size, panels, cfg.object_scale[1])
    for k in range(panels):
        x_start, x_stop = _span(k % cols, cols, size)
        y_start, y_stop = _span(k // cols, rows, size)
        draw.rectangle((x_start, y_start, x_stop - 1, y_stop - 1), outline=GRID_RGB)
        left = (x_start + x_stop - side) // 2
        top = (y_start + y_stop - side) // 2
        box = (left, top, left + side - 1, top + side - 1)
        if k == panels - 1:
            _draw_question_mark(draw, (x_start, y_start, x_stop - 1, y_stop - 1))
            continue
        token = shown[k]
        _draw_shape(draw, token.shape, box, COLOR_RGB[token.color])
        if token.dot:
            _draw_dot(draw, token.shape, box)
    return image


def _sequence_near(rng: random.Random, motif: list[_Token], answer: _Token,
                   cfg: SyntheticConfig) -> list[_Token]:
    """Hard distractors: the motif's other tokens and the answer with one attribute changed."""
    near = [t for t in motif if t != answer]
    if "dot" in cfg.sequence_attributes:
        near.append(_Token(answer.shape, answer.color, not answer.dot))
    near.append(_Token(rng.choice([s for s in cfg.shapes if s != answer.shape]), answer.color,
                       answer.dot))
    if "color" in cfg.sequence_attributes:
        near.append(_Token(answer.shape, rng.choice([c for c in cfg.colors if c != answer.color]),
                           answer.dot))
    return near


def _make_sequence(rng: random.Random, cfg: SyntheticConfig) -> tuple[Image.Image, _QA]:
    pool = _token_pool(cfg, rng.choice(cfg.colors))
    # Distinct tokens in the motif make its length the shortest period of the sequence.
    motif = rng.sample(pool, rng.choice(cfg.sequence_periods))
    shown = [motif[k % len(motif)] for k in range(cfg.sequence_length - 1)]
    answer = motif[(cfg.sequence_length - 1) % len(motif)]
    attributes = cfg.sequence_attributes
    near = [_phrase(t, attributes) for t in _sequence_near(rng, motif, answer, cfg)]
    choices = tuple(_phrase(t, attributes) for t in pool)
    qa = _QA(SEQUENCE_QUESTION, _phrase(answer, attributes), choices,
             _others(near, _phrase(answer, attributes)))
    return _render_sequence(shown, cfg), qa


# ---------------------------------------------------------------------------------------------
# Samples and splits


def _rng(*parts: object) -> random.Random:
    """An independent stream per (seed, split, index, ...): samples do not depend on each other."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_sample(category: str, rng: random.Random,
                 cfg: SyntheticConfig) -> tuple[Image.Image, _QA] | None:
    if category == "sequence":
        return _make_sequence(rng, cfg)
    if category in _REASONING_QUESTIONS:
        objects, qa = _REASONING_QUESTIONS[category](rng, cfg)
    elif category == "count_color":
        objects, color, count = _sample_count_scene(rng, cfg, "color")
        qa = _count_qa(f"How many {color} shapes are there?", count, cfg)
    elif category == "count_shape":
        objects, shape, count = _sample_count_scene(rng, cfg, "shape")
        qa = _count_qa(f"How many {_plural(shape)} are there?", count, cfg)
    else:
        objects = _sample_scene(rng, cfg)
        qa = _SCENE_QUESTIONS[category](rng, objects, cfg)
    return None if qa is None else (_render_scene(objects, cfg.image_size), qa)


def _multiple_choice(rng: random.Random, qa: _QA, max_options: int) -> tuple[list[str], str]:
    """Options (answer + distractors, image facts first) in random order, and the answer letter."""
    near = [c for c in qa.near if c in qa.choices and c != qa.answer]
    rest = [c for c in qa.choices if c != qa.answer and c not in near]
    rng.shuffle(near)
    rest = rng.sample(rest, len(rest))
    options = [qa.answer] + (near + rest)[: min(max_options, len(qa.choices)) - 1]
    rng.shuffle(options)
    return options, LETTERS[options.index(qa.answer)]


def _record(sample_id: str, category: str, qa: _QA, options: list[str] | None,
            letter: str | None) -> dict:
    prompt, answer = qa.question, qa.answer
    if options is not None:
        listed = "\n".join(f"{LETTERS[k]}. {text}" for k, text in enumerate(options))
        prompt, answer = f"{qa.question}\n{listed}\n{MC_INSTRUCTION}", letter
    record = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
        "category": category,
        "answer": answer,
        "form": "mc" if options is not None else "short",
    }
    if category in LIST_CATEGORIES:
        record["unordered"] = True
    if options is not None:
        record["options"] = options
    return record


def content_key(image: Image.Image, question: str) -> str:
    """Identity of an (image pixels, question) pair; train and eval never share one."""
    return hashlib.sha1(image.tobytes() + b"\0" + question.encode()).hexdigest()


def _balanced(values: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """``n`` values, each of ``values`` as often as possible (counts differ by at most one)."""
    plan = [values[k % len(values)] for k in range(n)]
    rng.shuffle(plan)
    return plan


def _forms(n: int, mc_fraction: float, rng: random.Random) -> list[str]:
    mc = round(n * mc_fraction)
    plan = ["mc"] * mc + ["short"] * (n - mc)
    rng.shuffle(plan)
    return plan


@dataclass
class _Split:
    records: list[dict] = field(default_factory=list)
    duplicates_rejected: int = 0


def _generate_split(split: str, n: int, cfg: SyntheticConfig, images_dir: Path,
                    seen: set[str], reject_seen: bool) -> _Split:
    """Draw, render and save ``n`` samples; with ``reject_seen`` redraw any pair in ``seen``."""
    categories = _balanced(cfg.categories, n, _rng(cfg.seed, split, "categories"))
    forms = _forms(n, cfg.mc_fraction, _rng(cfg.seed, split, "forms"))
    result = _Split()
    for index in range(n):
        for attempt in range(MAX_ATTEMPTS):
            drawn = _draw_sample(categories[index], _rng(cfg.seed, split, index, attempt), cfg)
            if drawn is None:
                continue
            image, qa = drawn
            key = content_key(image, qa.question)
            if reject_seen and key in seen:
                result.duplicates_rejected += 1
                continue
            seen.add(key)
            break
        else:
            raise ValueError(
                f"{split} sample {index} ({categories[index]}): no new (image, question) pair in "
                f"{MAX_ATTEMPTS} draws; the config allows too few distinct samples for "
                f"num_train={cfg.num_train}, num_eval={cfg.num_eval} (enlarge shapes, colors, "
                f"max_objects or categories)")
        options = letter = None
        if forms[index] == "mc":
            # A separate stream, so a sample's image and question do not depend on its form.
            options, letter = _multiple_choice(_rng(cfg.seed, split, index, attempt, "mc"), qa,
                                               cfg.mc_options)
        sample_id = f"{split}-{index:06d}"
        image.save(images_dir / f"{sample_id}.png")
        result.records.append(_record(sample_id, categories[index], qa, options, letter))
    return result


def _split_counts(records: list[dict], cfg: SyntheticConfig) -> dict:
    categories = Counter(r["category"] for r in records)
    forms = Counter(r["form"] for r in records)
    return {
        "num_samples": len(records),
        "categories": {c: categories[c] for c in cfg.categories},
        "forms": {f: forms[f] for f in ("short", "mc")},
    }


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    """Create ``out/images``; refuse to mix with an earlier dataset unless ``overwrite``."""
    existing = [name for name in ("train.json", "eval.json", "meta.json") if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({', '.join(existing)}); "
                              "pass overwrite=True (--overwrite) to replace it")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    # Only this generator's own files go, so a smaller rerun leaves no stale images behind.
    for stale in sorted(images.glob("train-*.png")) + sorted(images.glob("eval-*.png")):
        stale.unlink()
    return images


def generate_dataset(out_dir: str | Path, config: SyntheticConfig | None = None, *,
                     overwrite: bool = False) -> dict:
    """Write ``images/``, ``train.json``, ``eval.json`` and ``meta.json`` under ``out_dir``.

    Returns a summary: ``out_dir``, ``splits`` (counts per category and form),
    ``eval_duplicates_rejected`` and ``seconds``. Raises ``FileExistsError`` when ``out_dir``
    already holds a dataset and ``overwrite`` is false.
    """
    cfg = config if config is not None else SyntheticConfig()
    out = Path(out_dir)
    images = _prepare_out_dir(out, overwrite)
    started = time.perf_counter()
    seen: set[str] = set()
    train = _generate_split("train", cfg.num_train, cfg, images, seen, reject_seen=False)
    evaluation = _generate_split("eval", cfg.num_eval, cfg, images, seen, reject_seen=True)
    meta = {
        "generator": "vlsi.data.synthetic",
        "format": "llava",
        "config": asdict(cfg),
        "splits": {"train": _split_counts(train.records, cfg),
                   "eval": _split_counts(evaluation.records, cfg)},
        "eval_duplicates_rejected": evaluation.duplicates_rejected,
    }
    _write_json(out / "train.json", train.records)
    _write_json(out / "eval.json", evaluation.records)
    _write_json(out / "meta.json", meta)
    # Timing stays out of meta.json so that file is byte-identical across runs.
    return {"out_dir": str(out), "splits": meta["splits"],
            "eval_duplicates_rejected": evaluation.duplicates_rejected,
            "seconds": round(time.perf_counter() - started, 3)}


# ---------------------------------------------------------------------------------------------
# Command line: `vlsi data synth`

_CLI_FIELDS = ("seed", "num_train", "num_eval", "image_size", "grid_size", "min_objects",
               "max_objects", "categories", "mc_fraction", "mc_options", "shapes", "colors",
               "sequence_length")


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``synth`` sub-command; its handler is stored as ``args.func``."""
    defaults = SyntheticConfig.__dataclass_fields__
    parser = subparsers.add_parser(
        "synth", help="generate the synthetic shapes/colours/sequence dataset",
        description="Write a synthetic LLaVA-format dataset (images, train.json, eval.json, "
                    "meta.json) to OUT_DIR. Unset options keep SyntheticConfig's defaults.")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    for name, kind in (("seed", int), ("num_train", int), ("num_eval", int), ("image_size", int),
                       ("grid_size", int), ("min_objects", int), ("max_objects", int),
                       ("mc_fraction", float), ("mc_options", int), ("sequence_length", int)):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                            help=f"default {defaults[name].default}")
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, metavar="CATEGORY",
                        help=f"subset of {' '.join(CATEGORIES)} (default all)")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, metavar="SHAPE",
                        help=f"shape palette from {' '.join(SHAPES)}")
    parser.add_argument("--colors", nargs="+", choices=tuple(COLOR_RGB), metavar="COLOR",
                        help=f"colour palette from {' '.join(COLOR_RGB)}")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset in OUT_DIR")
    parser.set_defaults(func=run_synth)
    return parser


def run_synth(args: argparse.Namespace) -> int:
    """Handler of ``vlsi data synth``: build the config, generate, print the summary as JSON."""
    given = vars(args)
    overrides = {name: given[name] for name in _CLI_FIELDS if given.get(name) is not None}
    try:
        summary = generate_dataset(args.out_dir, SyntheticConfig(**overrides),
                                   overwrite=args.overwrite)
    except (ValueError, FileExistsError) as error:
        raise VlsiError(str(error)) from error
    print(json.dumps(summary, indent=2))
    return 0
