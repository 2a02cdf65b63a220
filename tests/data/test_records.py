"""Parsing LLaVA-style and messages-style records (no tokenizer, no model)."""

import json

import pytest

from vlsi.data.records import Sample, Skip, read_records, split_image_tags
from vlsi.errors import DataError

IMG = {"type": "image"}


def text(t):
    return {"type": "text", "text": t}


def test_llava_json_list_multi_turn_multi_image(image_dir):
    records = [
        {
            "id": 7,
            "image": ["red.png", "blue.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\nLeft.\n<image>\nRight. Same colour?"},
                {"from": "gpt", "value": "No."},
                {"from": "human", "value": "Which is red?"},
                {"from": "gpt", "value": "The first."},
            ],
        }
    ]
    path = image_dir / "data.json"
    path.write_text(json.dumps(records))
    read = read_records(path)
    assert read.num_records == 1 and read.skips == []
    (s,) = read.samples
    assert s.id == "7"
    assert [t["role"] for t in s.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert s.turns[1]["content"] == [IMG, text("Left."), IMG, text("Right. Same colour?")]
    assert s.turns[2]["content"] == [text("No.")]
    assert s.images == [image_dir / "red.png", image_dir / "blue.png"]


def test_messages_style_string_and_typed_content(image_dir, write_jsonl):
    path = write_jsonl(image_dir / "m.jsonl", [
        {"id": "typed", "images": ["red.png", "blue.png"], "messages": [
            {"role": "user", "content": [IMG, text("and"), IMG, text("compare")]},
            {"role": "assistant", "content": [text("same shape")]}]},
        {"id": "string", "images": ["green.png"], "messages": [
            {"role": "user", "content": "Look: <image> what?"},
            {"role": "assistant", "content": "green"}]},
        {"id": "text-only", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])
    typed, string, text_only = read_records(path).samples
    assert typed.turns[0]["content"] == [IMG, text("and"), IMG, text("compare")]
    assert typed.images == [image_dir / "red.png", image_dir / "blue.png"]
    assert string.turns[0]["content"] == [text("Look:"), IMG, text("what?")]
    assert text_only.images == [] and text_only.turns[1]["content"] == [text("hello")]


def test_images_without_tags_go_to_the_start_of_the_first_user_turn(image_dir, write_jsonl, llava_record):
    path = write_jsonl(image_dir / "d.jsonl", [
        llava_record("a", "What colour?", "red", image=["red.png", "blue.png"]),
        {"id": "m", "images": ["red.png"], "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A red box."}]},
    ])
    a, m = read_records(path).samples
    assert a.turns[0]["content"] == [IMG, IMG, text("What colour?")]
    assert m.turns[0]["content"] == [text("sys")]
    assert m.turns[1]["content"] == [IMG, text("Describe.")]


def test_image_root_and_default_ids(tmp_path, image_dir, write_jsonl, llava_record):
    data_dir = tmp_path / "elsewhere"
    data_dir.mkdir()
    path = write_jsonl(data_dir / "d.jsonl", [
        llava_record(None, "<image>\nQ", "A", image="red.png"),
        "",
        llava_record(None, "Q2", "A2"),
    ])
    read = read_records(path, image_root=image_dir)
    assert [s.id for s in read.samples] == [f"{path}:1", f"{path}:3"]  # blank line counted, not a record
    assert read.samples[0].images == [image_dir / "red.png"]
    assert read.num_records == 2
    listed = data_dir / "d.json"
    listed.write_text(json.dumps([llava_record(None, "Q", "A"), llava_record("x", "Q", "A")]))
    assert [s.id for s in read_records(listed).samples] == [f"{listed}:0", "x"]


def test_bad_records_are_skipped_with_reasons(image_dir, write_jsonl, llava_record):
    path = write_jsonl(image_dir / "bad.jsonl", [
        llava_record("good", "<image>\nQ", "A", image="red.png"),
        '{"id": "broken", "conversations": [',
        llava_record("missing", "<image>\nQ", "A", image="nope.png"),
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Q"}]},
        llava_record("two-tags", "<image><image>\nQ", "A", image="red.png"),
        llava_record("no-image", "<image>\nQ", "A"),
        {"id": "bot", "conversations": [{"from": "bot", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        ["not", "an", "object"],
        {"id": "neither"},
    ])
    read = read_records(path)
    assert [s.id for s in read.samples] == ["good"]
    assert [(s.id, s.reason) for s in read.skips] == [
        (f"{path}:2", "malformed JSON line 2: Expecting value"),
        ("missing", f"image not found: {image_dir / 'nope.png'}"),
        ("no-answer", "no assistant turn"),
        ("two-tags", "2 <image> tags but 1 image"),
        ("no-image", "1 <image> tag but 0 images"),
        ("bot", "turn 0: unknown role 'bot'"),
        (f"{path}:8", "record is not a JSON object"),
        ("neither", "no 'conversations' or 'messages' list"),
    ]
    assert {s.kind for s in read.skips} >= {
        "malformed_json", "image_not_found", "no_assistant_turn", "image_count_mismatch", "bad_record"}
    assert read.num_records == 9


def test_strict_stops_at_the_first_bad_record_with_one_line(image_dir, write_jsonl, llava_record):
    path = write_jsonl(image_dir / "bad.jsonl", [
        llava_record("good", "Q", "A"),
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Q"}]},
        '{"broken',
    ])
    with pytest.raises(DataError) as err:
        read_records(path, strict=True)
    assert str(err.value) == "no-answer: no assistant turn"


def test_unreadable_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_records(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1},')
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(bad)


def test_split_image_tags():
    assert split_image_tags("no tags\n") == [text("no tags\n")]
    assert split_image_tags("<image>\n") == [IMG]
    assert split_image_tags("a <image> b<image>") == [text("a"), IMG, text("b"), IMG]


def test_skip_and_sample_types():
    assert str(Skip("x", "no assistant turn", "no_assistant_turn")) == "x: no assistant turn"
    assert Sample("x", [{"role": "user", "content": [text("q")]}]).num_turns == 1
