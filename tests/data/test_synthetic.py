"""Tests of the synthetic visual-instruction generator (vlsi.data.synthetic); each runs in < 1 s."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlsi.data.synthetic import (
                                 BASIC_CATEGORIES,
                                 CATEGORIES,
                                 LIST_CATEGORIES,
                                 REASONING_CATEGORIES,
                                 COLOR_RGB,
                                 LETTERS,
                                 MC_INSTRUCTION,
                                 QUADRANTS,
                                 SHAPES,
                                 SyntheticConfig,
                                 add_cli,
                                 content_key,
                                 generate_dataset,
                                 )
from vlsi.errors import VlsiError

SMALL = dict(num_train=180, num_eval=90)  # 20 and 10 samples per category


def _load(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def _pixels(out: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(out / record["image"]).convert("RGB"))


def _question(record: dict) -> str:
    """The question line, without the "<image>" line and without MC options."""
    return record["conversations"][0]["value"].split("\n")[1]


def _true_answer(record: dict) -> str:
    if record["form"] == "mc":
        return record["options"][LETTERS.index(record["answer"])]
    return record["answer"]


def _quadrant_slices(size: int) -> dict[str, tuple[slice, slice]]:
    half = size // 2
    top, bottom, left, right = slice(0, half), slice(half, size), slice(0, half), slice(half, size)
    return {"top-left": (top, left), "top-right": (top, right),
            "bottom-left": (bottom, left), "bottom-right": (bottom, right)}


def _all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, SyntheticConfig(seed=7, **SMALL))
    return out


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    config = SyntheticConfig(seed=3, num_train=45, num_eval=18)
    generate_dataset(tmp_path / "a", config)
    generate_dataset(tmp_path / "b", config)
    first, second = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert len(first) == 45 + 18 + 3
    assert first == second  # JSON bytes and PNG bytes (hence pixels) alike


def test_different_seeds_differ(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", SyntheticConfig(seed=1, num_train=45, num_eval=9))
    generate_dataset(tmp_path / "b", SyntheticConfig(seed=2, num_train=45, num_eval=9))
    assert _load(tmp_path / "a", "train") != _load(tmp_path / "b", "train")
    same = sum(np.array_equal(_pixels(tmp_path / "a", r), _pixels(tmp_path / "b", r))
               for r in _load(tmp_path / "a", "train"))
    assert same < 5


def test_splits_share_no_image_question_pair(dataset: Path) -> None:
    def keys(split: str) -> set[str]:
        return {content_key(Image.open(dataset / r["image"]).convert("RGB"), _question(r))
                for r in _load(dataset, split)}

    assert not keys("train") & keys("eval")


def test_tiny_sample_space_rejects_duplicates_then_fails(tmp_path: Path) -> None:
    # 2 shapes x 2 dots -> 12 period-2 motifs, x 2 colours: 24 distinct images in all.
    tiny = dict(categories=("sequence",), shapes=("circle", "square"), colors=("red", "blue"),
                sequence_length=4, sequence_periods=(2,))
    summary = generate_dataset(tmp_path / "ok", SyntheticConfig(num_train=20, num_eval=4, **tiny))
    assert summary["eval_duplicates_rejected"] > 0
    pairs = {split: {(r["answer"], _pixels(tmp_path / "ok", r).tobytes())
                     for r in _load(tmp_path / "ok", split)} for split in ("train", "eval")}
    assert not pairs["train"] & pairs["eval"]
    with pytest.raises(ValueError, match="too few distinct samples"):
        generate_dataset(tmp_path / "full", SyntheticConfig(num_train=200, num_eval=30, **tiny))


def test_every_category_present_and_meta_counts(dataset: Path) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    for split, size in (("train", SMALL["num_train"]), ("eval", SMALL["num_eval"])):
        records = _load(dataset, split)
        counts = Counter(r["category"] for r in records)
        assert set(counts) == set(BASIC_CATEGORIES)  # the default mix
        assert meta["splits"][split]["num_samples"] == len(records) == size
        assert meta["splits"][split]["categories"] == dict(counts)
        assert sum(meta["splits"][split]["forms"].values()) == size
    assert meta["config"]["seed"] == 7


def test_records_are_llava_format(dataset: Path) -> None:
    for split in ("train", "eval"):
        for k, record in enumerate(_load(dataset, split)):
            assert record["id"] == f"{split}-{k:06d}"
            assert record["image"] == f"images/{record['id']}.png"
            image = Image.open(dataset / record["image"])
            assert image.size == (56, 56) and image.mode == "RGB"
            human, gpt = record["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert human["value"].startswith("<image>\n")
            assert sum(turn["value"].count("<image>") for turn in record["conversations"]) == 1
            assert record["form"] in ("short", "mc") and record["category"] in CATEGORIES
            assert gpt["value"] == record["answer"]


def test_short_answers_come_from_the_answer_space(dataset: Path) -> None:
    shape = "|".join(SHAPES)
    allowed = {
        "shape_at": set(SHAPES), "shape_of": set(SHAPES),
        "color_at": set(COLOR_RGB), "color_of": set(COLOR_RGB),
        "count_color": set("01234"), "count_shape": set("01234"),
        "where": set(QUADRANTS), "relative": {"left", "right", "above", "below"},
    }
    for record in _load(dataset, "train") + _load(dataset, "eval"):
        answer = _true_answer(record)
        if record["category"] == "sequence":
            assert re.fullmatch(rf"({shape})( with a dot)?", answer), answer
        else:
            assert answer in allowed[record["category"]], record


def test_mc_options_and_letters(dataset: Path) -> None:
    mc = [r for r in _load(dataset, "train") if r["form"] == "mc"]
    assert len(mc) == round(0.25 * SMALL["num_train"])
    for record in mc:
        options = record["options"]
        assert 2 <= len(options) <= 4 and len(set(options)) == len(options)
        listed = "\n".join(f"{LETTERS[k]}. {text}" for k, text in enumerate(options))
        assert record["conversations"][0]["value"].endswith(f"\n{listed}\n{MC_INSTRUCTION}")
        assert record["answer"] in LETTERS[: len(options)]


def test_mc_answer_text_is_the_true_answer(tmp_path: Path) -> None:
    # The image and question of a sample do not depend on its form, so the all-short and the
    # all-MC datasets of one seed ask the same questions.
    generate_dataset(tmp_path / "short", SyntheticConfig(seed=5, num_train=90, num_eval=0,
                                                         mc_fraction=0.0))
    generate_dataset(tmp_path / "mc", SyntheticConfig(seed=5, num_train=90, num_eval=0,
                                                      mc_fraction=1.0))
    pairs = zip(_load(tmp_path / "short", "train"), _load(tmp_path / "mc", "train"))
    for short, mc in pairs:
        assert (short["form"], mc["form"]) == ("short", "mc")
        assert _question(short) == _question(mc)
        assert _true_answer(mc) == short["answer"]


def test_color_at_answer_is_the_quadrants_colour(dataset: Path) -> None:
    records = [r for r in _load(dataset, "train") + _load(dataset, "eval")
               if r["category"] == "color_at"]
    assert records
    for record in records:
        quadrant = re.search(r"the (\S+) quadrant", _question(record)).group(1)
        pixels = _pixels(dataset, record)[_quadrant_slices(56)[quadrant]].reshape(-1, 3)
        colours = Counter(tuple(p) for p in pixels if tuple(p) != (255, 255, 255))
        assert colours.most_common(1)[0][0] == COLOR_RGB[_true_answer(record)]


def test_count_color_matches_the_quadrants_holding_that_colour(dataset: Path) -> None:
    # On the default 2x2 grid each quadrant holds at most one object.
    records = [r for r in _load(dataset, "train") if r["category"] == "count_color"]
    assert records
    for record in records:
        colour = re.fullmatch(r"How many (\w+) shapes are there\?", _question(record)).group(1)
        pixels = _pixels(dataset, record)
        holding = sum((pixels[region] == COLOR_RGB[colour]).all(axis=-1).any()
                      for region in _quadrant_slices(56).values())
        assert str(holding) == _true_answer(record)


def test_where_answer_holds_the_named_colour(dataset: Path) -> None:
    checked = 0
    for record in _load(dataset, "train") + _load(dataset, "eval"):
        match = re.fullmatch(r"Where is the (\w+) shape\?", _question(record))
        if record["category"] != "where" or not match:
            continue
        mask = (_pixels(dataset, record) == COLOR_RGB[match.group(1)]).all(axis=-1)
        rows, cols = np.nonzero(mask)
        vertical = "top" if rows.mean() < 28 else "bottom"
        horizontal = "left" if cols.mean() < 28 else "right"
        assert f"{vertical}-{horizontal}" == _true_answer(record)
        checked += 1
    assert checked


def test_sequence_answers_name_colour_when_colour_varies(tmp_path: Path) -> None:
    config = SyntheticConfig(num_train=20, num_eval=0, categories=("sequence",),
                             sequence_attributes=("color", "dot"), image_size=84)
    generate_dataset(tmp_path, config)
    for record in _load(tmp_path, "train"):
        assert _question(record) == "Which shape completes the sequence?"
        colour, shape = _true_answer(record).split(" ")[:2]
        assert colour in config.colors and shape in config.shapes


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    generate_dataset(tmp_path, SyntheticConfig(num_train=20, num_eval=5))
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path, SyntheticConfig(num_train=9, num_eval=2))
    generate_dataset(tmp_path, SyntheticConfig(num_train=9, num_eval=2), overwrite=True)
    assert len(list((tmp_path / "images").iterdir())) == 11  # no stale images left


@pytest.mark.parametrize("overrides, field", [
    ({"seed": "0"}, "seed"),
    ({"num_train": -1}, "num_train"),
    ({"image_size": 16}, "image_size"),
    ({"image_size": 24, "categories": ("sequence",)}, "image_size"),
    ({"grid_size": 3}, "grid_size"),
    ({"min_objects": 0}, "min_objects"),
    ({"max_objects": 5}, "max_objects"),
    ({"max_objects": 1, "categories": ("relative",)}, "max_objects"),
    ({"categories": ()}, "categories"),
    ({"categories": ("colour",)}, "categories"),
    ({"categories": "color_at"}, "categories"),
    ({"mc_fraction": 1.5}, "mc_fraction"),
    ({"mc_options": 1}, "mc_options"),
    ({"shapes": ("blob", "circle")}, "shapes"),
    ({"colors": ("red",)}, "colors"),
    ({"colors": ("red", "red")}, "colors"),
    ({"object_scale": (0.9, 0.5)}, "object_scale"),
    ({"sequence_length": 4}, "sequence_length"),
    ({"sequence_periods": ()}, "sequence_periods"),
    ({"sequence_attributes": ("size",)}, "sequence_attributes"),
])
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field}:"):
        SyntheticConfig(**overrides)


def test_config_accepts_lists() -> None:
    config = SyntheticConfig(categories=["color_at", "where"], object_scale=[0.5, 0.8])
    assert config.categories == ("color_at", "where") and config.object_scale == (0.5, 0.8)


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="vlsi data")
    add_cli(parser.add_subparsers(dest="command", required=True))
    argv = ["synth", str(tmp_path), "--seed", "4", "--num-train", "12", "--num-eval", "6",
            "--image-size", "84", "--categories", "color_at", "where"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["categories"] == {"color_at": 6, "where": 6}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["config"]["image_size"] == 84 and meta["config"]["seed"] == 4
    with pytest.raises(VlsiError, match="overwrite"):
        args.func(parser.parse_args(argv))


@pytest.fixture(scope="module")
def reasoning(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reasoning")
    generate_dataset(out, SyntheticConfig(seed=3, num_train=400, num_eval=40, mc_fraction=0.0,
                                          categories=REASONING_CATEGORIES,
                                          shapes=SHAPES[:4], colors=tuple(COLOR_RGB)[:4],
                                          object_scale=(1.0, 1.0)))
    return out


def _quadrants_with(pixels: np.ndarray, colour: str) -> int:
    return int(sum((pixels[region] == COLOR_RGB[colour]).all(axis=-1).any()
                   for region in _quadrant_slices(56).values()))


def test_reasoning_answers_follow_from_the_pixels(reasoning: Path) -> None:
    records = _load(reasoning, "train") + _load(reasoning, "eval")
    assert set(Counter(r["category"] for r in records)) == set(REASONING_CATEGORIES)
    colours = "|".join(COLOR_RGB)
    for record in records:
        question, answer, pixels = _question(record), int(record["answer"]), _pixels(reasoning, record)
        if record["category"] == "count_or":
            a, b = re.fullmatch(rf"How many shapes are ({colours}) or ({colours})\?", question).groups()
            assert answer == _quadrants_with(pixels, a) + _quadrants_with(pixels, b), record
        elif record["category"] == "count_more":
            a, b = re.fullmatch(rf"How many more ({colours}) shapes than ({colours}) shapes are there\?",
                                question).groups()
            assert answer == _quadrants_with(pixels, a) - _quadrants_with(pixels, b) >= 0, record
        elif record["category"] == "count_and":
            colour = re.fullmatch(rf"How many ({colours}) \w+ are there\?", question).group(1)
            assert answer <= _quadrants_with(pixels, colour), record
        else:
            added = int(re.fullmatch(r"If (\d) more .+", question).group(1))
            assert 1 <= added <= 3 and 0 <= answer - added <= 4, record


def test_reasoning_answers_are_balanced(reasoning: Path) -> None:
    # each answer is drawn uniformly before its scene, so no value dominates a category
    records = _load(reasoning, "train")
    for category in REASONING_CATEGORIES:
        counts = Counter(r["answer"] for r in records if r["category"] == category)
        assert max(counts.values()) < 0.4 * sum(counts.values()), (category, counts)


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lists")
    generate_dataset(out, SyntheticConfig(seed=5, num_train=400, num_eval=40, mc_fraction=0.0,
                                          categories=LIST_CATEGORIES, shapes=SHAPES[:4],
                                          colors=tuple(COLOR_RGB)[:6], object_scale=(1.0, 1.0)))
    return out


def _objects_in(pixels: np.ndarray) -> list[str]:
    """The colour of each quadrant's object (objects fill their cells: one colour per quadrant)."""
    found = []
    for region in _quadrant_slices(56).values():
        colours = [c for c, rgb in COLOR_RGB.items() if (pixels[region] == rgb).all(axis=-1).any()]
        assert len(colours) <= 1
        found += colours
    return found


def test_list_answers_name_every_object_in_a_drawn_order(lists: Path) -> None:
    records = _load(lists, "train") + _load(lists, "eval")
    assert set(Counter(r["category"] for r in records)) == set(LIST_CATEGORIES)
    firsts = Counter()
    for record in records:
        assert record["unordered"] is True and record["form"] == "short"
        items = record["answer"].split(", ")
        colours = _objects_in(_pixels(lists, record))
        if record["category"] == "list_objects":
            assert _question(record) == "List every object with its colour."
            assert sorted(i.split()[0] for i in items) == sorted(colours), record
            assert all(i.split()[1] in SHAPES[:4] for i in items)
            if len(items) > 1:  # the order is drawn, not the reading order of the quadrants
                firsts[items[0].split()[0] == colours[0]] += 1
        else:
            colour = re.fullmatch(r"Which shapes are (\w+)\?", _question(record)).group(1)
            assert len(items) == colours.count(colour) >= 1, record
            assert all(i in SHAPES[:4] for i in items)
    assert firsts[True] and firsts[False]


def test_list_categories_have_no_multiple_choice_form() -> None:
    with pytest.raises(ValueError, match="mc_fraction.*free-form categories list_objects"):
        SyntheticConfig(categories=("list_objects", "count_color"), mc_fraction=0.25)
