"""``vlsi data check``: the report, its printed form, and one-line errors."""

import argparse

import pytest

from vlsi.data.check import add_cli, check_data, format_report, length_stats
from vlsi.errors import DataError, VlsiError


@pytest.fixture
def data_file(image_dir, write_jsonl, llava_record):
    return write_jsonl(image_dir / "d.jsonl", [
        llava_record("single", "<image>\nWhat colour?", "red", image="red.png"),
        {"id": "multi", "images": ["red.png", "blue.png"], "messages": [
            {"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
        llava_record("text", "Hi.", "Hello."),
        llava_record("missing", "<image>\nQ", "A", image="nope.png"),
        '{"id": 5,',
        llava_record("long", "Q", "red " * 300),
    ])


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_report_counts_skips_and_lengths(tiny_pair, data_file, image_dir):
    report = check_data(data_file, tiny_pair("qwen2_vl").student, max_length=128)
    assert {k: report[k] for k in ("records", "kept", "skipped", "images", "single_image",
                                   "multi_image", "text_only", "turns", "replies", "multi_turn")} == {
        "records": 6, "kept": 3, "skipped": 3, "images": 3, "single_image": 1,
        "multi_image": 1, "text_only": 1, "turns": 8, "replies": 4, "multi_turn": 1}
    assert report["skipped_by_kind"] == {"image_not_found": 1, "malformed_json": 1, "too_long": 1}
    assert [(s["id"], s["reason"].split(":")[0]) for s in report["skipped_samples"]] == [
        ("missing", "image not found"), (f"{data_file}:5", "malformed JSON line 5"), ("long", "too long")]
    length, supervised = report["length"], report["supervised"]
    assert length["min"] <= length["p50"] <= length["p95"] <= length["max"] <= 128
    assert set(length) == {"min", "mean", "p50", "p95", "max"}
    assert supervised["min"] >= 2  # at least "red" + <|im_end|>
    assert supervised["max"] < length["min"]


def test_printed_report(tiny_pair, data_file, capsys):
    run_cli(["check", str(data_file), "--model", str(tiny_pair("qwen2_vl").student), "--max-length", "128"])
    out = capsys.readouterr().out
    assert "records: 6  kept: 3  skipped: 3" in out
    assert "skipped by reason: image_not_found 1, malformed_json 1, too_long 1" in out
    assert "  missing: image not found: " in out
    assert f"  {data_file}:5: malformed JSON line 5: " in out
    assert "  long: too long: " in out
    assert "tokens per sample (expanded): min " in out and "supervised tokens: min " in out


def test_strict_and_empty_are_one_line_errors(tiny_pair, data_file, image_dir, write_jsonl, llava_record):
    model = str(tiny_pair("qwen2_vl").student)
    with pytest.raises(DataError) as err:
        run_cli(["check", str(data_file), "--model", model, "--strict"])
    assert str(err.value).startswith("missing: image not found: ") and "\n" not in str(err.value)

    empty = write_jsonl(image_dir / "empty.jsonl", [llava_record("missing", "<image>", "A", image="x.png")])
    with pytest.raises(DataError, match=r"no usable samples .* \(1 of 1 records skipped\)$"):
        run_cli(["check", str(empty), "--model", model])
    report = check_data(empty, model)
    assert report["kept"] == 0 and report["length"] is None
    assert "tokens per sample (expanded): no samples kept" in format_report(report)


def test_bad_paths_are_one_line_errors(tiny_pair, data_file, tmp_path):
    with pytest.raises(VlsiError, match="model path not found"):
        check_data(data_file, tmp_path / "no-model")
    with pytest.raises(VlsiError, match="no config.json"):
        check_data(data_file, tmp_path)
    with pytest.raises(DataError, match="data file not found"):
        check_data(tmp_path / "none.jsonl", tiny_pair("qwen2_vl").student)


def test_pixel_bounds_change_the_token_counts(tiny_pair, data_file):
    model = tiny_pair("qwen2_vl").student
    small = check_data(data_file, model, max_length=4096, max_pixels=28 * 28)
    large = check_data(data_file, model, max_length=4096)
    assert small["kept"] == large["kept"] == 4  # max_length 4096 keeps the long one
    assert small["length"]["mean"] < large["length"]["mean"]


def test_length_stats():
    assert length_stats([]) is None
    assert length_stats([5, 1, 3, 2, 4]) == {"min": 1, "mean": 3.0, "p50": 3, "p95": 5, "max": 5}


def test_structure_check_needs_no_model(data_file, image_dir, capsys):
    (image_dir / "broken.png").write_bytes(b"not a png")
    from vlsi.data.check import check_structure

    report = check_structure(data_file)
    assert (report["records"], report["kept"], report["model"], report["length"]) == (6, 4, None, None)
    assert report["skipped_by_kind"] == {"image_not_found": 1, "malformed_json": 1}  # no length check
    run_cli(["check", str(data_file)])
    out = capsys.readouterr().out
    assert "records: 6  kept: 4  skipped: 2" in out and "model: none" in out
    assert "tokens per sample" not in out


def test_structure_check_opens_every_image(image_dir, write_jsonl, llava_record):
    from vlsi.data.check import check_structure

    (image_dir / "broken.png").write_bytes(b"not a png")
    path = write_jsonl(image_dir / "b.jsonl", [llava_record("bad", "<image>\nQ", "A", image="broken.png"),
                                               llava_record("good", "<image>\nQ", "A", image="red.png")])
    report = check_structure(path)
    assert report["kept"] == 1 and report["skipped_by_kind"] == {"image_unreadable": 1}
    with pytest.raises(DataError, match="bad: image unreadable"):
        check_structure(path, strict=True)
