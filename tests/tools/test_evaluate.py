"""Answer extraction, normalisation, the two input formats, and scoring."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from vlsi.errors import DataError
from vlsi.tools.evaluate import (
                                 EvalItem,
                                 extract_choice,
                                 items_from_json,
                                 list_items,
                                 load_items,
                                 mc_question,
                                 normalize_answer,
                                 score,
                                 summarize,
                                 )
from vlsi.tools.inference import Prompt

OPTIONS = ["red", "blue", "green", "circle"]


@pytest.mark.parametrize("text, letter", [
    ("B", "B"),
    ("B.", "B"),
    ("b", "B"),
    ("(C)", "C"),
    ("(B) blue", "B"),
    ("B. blue", "B"),
    ("C: green", "C"),
    ("The answer is (B).", "B"),
    ("The answer is B", "B"),
    ("Answer: C", "C"),
    ("The correct option is D.", "D"),
    ("I think it is (D), because of the shape.", "D"),
    ("A", "A"),
    ("A.", "A"),
    ("blue", "B"),              # no letter: the one option the response names
    ("It is green.", "C"),
    ("A circle", "D"),          # "A" is the article here, not option A
    ("the answer is a circle", "D"),
])
def test_extract_choice(text, letter):
    assert extract_choice(text, 4, OPTIONS) == letter


@pytest.mark.parametrize("text", ["E", "The answer is E.", "", "I do not know", "red or blue"])
def test_extract_choice_none(text):
    assert extract_choice(text, 4, OPTIONS) is None


def test_extract_choice_without_options_uses_letters_only():
    assert extract_choice("blue", 4) is None
    assert extract_choice("(b)", 2) == "B"
    assert extract_choice("C", 2) is None  # only A and B exist


@pytest.mark.parametrize("a, b", [
    ("Red", "red"), ("red.", "red"), ("  the  red star ", "red star"), ("Three", "3"),
    ("3!", "3"), ("top-left", "top left"), ("A circle", "circle"),
])
def test_normalize_answer_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [("red", "blue"), ("3", "4"), ("red star", "star"), ("circle", "circles")])
def test_normalize_answer_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_score_mc_and_short():
    mc = EvalItem("q1", Prompt("?"), "B", "color", ["red", "blue"])
    assert score(mc, "The answer is (B).")["correct"]
    assert not score(mc, "A")["correct"]
    assert score(mc, "A")["extracted"] == "A"
    short = EvalItem("q2", Prompt("?"), "Three", "count")
    assert score(short, "3.")["correct"]
    assert not score(short, "4")["correct"]


def test_unordered_answers_are_scored_as_multisets():
    item = EvalItem("l1", Prompt("?"), "red circle, blue square, red circle", "list_objects",
                    unordered=True)
    assert score(item, "blue square, red circle, red circle")["correct"]
    assert score(item, "Red circle,blue square , the red circle.")["correct"]
    assert not score(item, "blue square, red circle")["correct"]  # one red circle missed
    assert not score(item, "blue square, red circle, red circle, red circle")["correct"]
    assert not score(item, "red circle blue square red circle")["correct"]  # no separators
    ordered = EvalItem("l2", Prompt("?"), "red circle, blue square", "x")
    assert not score(ordered, "blue square, red circle")["correct"]
    assert list_items("y, x,, X") == ["x", "x", "y"]


def test_summarize_by_category_and_form():
    rows = [{"category": "a", "form": "mc", "correct": True},
            {"category": "a", "form": "short", "correct": False},
            {"category": "b", "form": "short", "correct": True},
            {"category": "b", "form": "short", "correct": True}]
    res = summarize(rows)
    assert res.accuracy == 0.75 and res.count == 4
    assert res.by_category == {"a": 0.5, "b": 1.0}
    assert res.by_form == {"mc": 1.0, "short": 2 / 3}


def _png_b64(colour=(255, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tsv_reading(tmp_path):
    rows = [
        ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
        ["7", "What colour?", "nan", "red", "blue", "green", "yellow", "A", "color", _png_b64()],
        ["8", "Which?", "Look closely.", "x", "y", "nan", "nan", "B", "misc", _png_b64((0, 0, 255))],
        ["9", "Bad answer", "nan", "x", "y", "nan", "nan", "C", "misc", _png_b64()],
        ["10", "Bad image", "nan", "x", "y", "nan", "nan", "A", "misc", "bm90IGFuIGltYWdl"],
    ]
    path = tmp_path / "mmb.tsv"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    items, skips = load_items(path)
    assert [it.id for it in items] == ["7", "8"]
    assert items[0].options == ["red", "blue", "green", "yellow"] and items[0].reference == "A"
    assert items[1].options == ["x", "y"] and items[1].category == "misc"
    assert items[1].prompt.text.startswith("Look closely.\nWhich?\nA. x\nB. y\n")
    assert "nan" not in items[0].prompt.text
    assert items[0].prompt.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert {s.id: s.kind for s in skips} == {"9": "bad_record", "10": "image_unreadable"}


def test_tsv_missing_column(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("question\tA\nq\ta\n")
    with pytest.raises(DataError, match="lacks column"):
        load_items(path)


def test_json_items(tmp_path):
    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    records = [
        {"id": "s1", "image": "a.png", "category": "color_of", "form": "short",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                           {"from": "gpt", "value": "red"}]},
        {"id": "m1", "image": "a.png", "category": "color_of", "options": ["red", "blue"],
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?\nA. red\nB. blue"},
                           {"from": "gpt", "value": "A"}]},
        {"id": "multi", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                          {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Bye"}]},
        {"id": "noans", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "list", "image": "a.png", "category": "list_color", "unordered": True,
         "conversations": [{"from": "human", "value": "<image>\nWhich shapes are red?"},
                           {"from": "gpt", "value": "circle, square"}]},
        {"id": "missing", "image": "nope.png",
         "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "x"}]},
    ]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records))
    items, skips = items_from_json(path)
    by_id = {it.id: it for it in items}
    assert set(by_id) == {"s1", "m1", "multi", "list"}
    assert by_id["list"].unordered and not by_id["s1"].unordered
    assert by_id["s1"].reference == "red" and by_id["s1"].form == "short"
    assert by_id["s1"].prompt.text == "<image>What colour?"
    assert by_id["m1"].form == "mc" and by_id["m1"].options == ["red", "blue"]
    assert by_id["multi"].reference == "Bye" and len(by_id["multi"].prompt.turns) == 2
    assert {s.id for s in skips} == {"noans", "missing"}


def test_load_items_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_items(tmp_path / "none.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no usable question"):
        load_items(tmp_path / "empty.json")


def test_mc_question_layout():
    text = mc_question("Q?", ["a", "b", "c"], hint="H")
    assert text.splitlines() == ["H", "Q?", "A. a", "B. b", "C. c",
                                 "Answer with the option's letter from the given choices directly."]


def test_an_unreadable_image_is_a_counted_skip_and_the_rest_is_scored(tiny_pair, tmp_path, capsys):
    from vlsi.tools.evaluate import default_predictions_path, run_eval

    Image.new("RGB", (56, 56), (220, 20, 20)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [{"id": f"q{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
        for i, image in enumerate(["red.png", "broken.png", "red.png"])]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    model = tiny_pair("qwen2_vl").student
    result = run_eval(model, data, out=tmp_path / "p.jsonl", max_new_tokens=2)
    assert result.count == 2 and result.skipped == 1
    assert [json.loads(line)["id"] for line in (tmp_path / "p.jsonl").read_text().splitlines()] == ["q0", "q2"]
    assert "skipped q1: image unreadable" in capsys.readouterr().err
    default = default_predictions_path(model, data)
    assert model.resolve() not in default.resolve().parents and default.name.endswith(".predictions.jsonl")
