"""The stages' training data (vlsi.train.stages.training_data): one scan per process, skip reports."""

from __future__ import annotations

import json

from vlsi.train.config import DataConfig
from vlsi.train.stages import training_data


def test_training_data_is_scanned_once_per_process(tiny_pair, synth_dir, monkeypatch):
    from vlsi.data.dataset import VisualInstructionDataset

    scans = []
    original = VisualInstructionDataset.from_files.__func__
    monkeypatch.setattr(VisualInstructionDataset, "from_files",
                        classmethod(lambda cls, *a, **k: scans.append(a[0]) or original(cls, *a, **k)))
    monkeypatch.setattr(training_data, "_SCANNED", {})
    train = synth_dir / "train.json"
    data = DataConfig(train=[str(train)], image_root=str(synth_dir), max_length=256)
    pair = tiny_pair("qwen2_vl")
    first, _, _ = training_data.load_training_data(data, pair.student)
    again, _, _ = training_data.load_training_data(data, pair.teacher)  # same tokenizer and processor files
    assert again is first and len(scans) == 1
    other, _, _ = training_data.load_training_data(DataConfig(train=[str(train)], image_root=str(synth_dir),
                                                       max_length=128), pair.student)
    assert other is not first and len(scans) == 2
    text = train.read_text()
    train.write_text(text.replace("]", " ]", 1))  # same records, another size: scanned again
    try:
        changed, _, _ = training_data.load_training_data(data, pair.student)
        assert changed is not first and len(scans) == 3
    finally:
        train.write_text(text)


def test_skips_are_reported_once_with_reasons_and_ids(tiny_pair, synth_dir, tmp_path, capsys):
    records = json.loads((synth_dir / "train.json").read_text())
    records[1]["image"] = "images/missing.png"
    records[3]["conversations"] = records[3]["conversations"][:1]  # no assistant turn
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    data = DataConfig(train=[str(bad)], image_root=str(synth_dir), max_length=256)
    dataset, _, _ = training_data.load_training_data(data, tiny_pair("qwen2_vl").student)
    metrics = tmp_path / "metrics.jsonl"
    record = training_data.report_skips(dataset, "sft", metrics)
    out = capsys.readouterr().out
    assert f"sft: data: kept {len(records) - 2} of {len(records)} records; skipped 2" in out
    assert record["data_skipped_by_reason"] == {"image_not_found": 1, "no_assistant_turn": 1}
    assert record["data_first_skipped"] == [records[1]["id"], records[3]["id"]]
    training_data.report_skips(dataset, "sft", metrics)  # a resumed stage does not log it twice
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["data_skipped"] == 2 and logged[0]["step"] == 0
