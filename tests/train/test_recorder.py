"""Match recorder: counts, start/end windows, JSON round trip."""

import json

import pytest
import torch

from vlsi.train.recorder import MatchLog, MatchRecorder


def _one_hot(cols: list[int], t_l: int = 5) -> torch.Tensor:
    w = torch.zeros(len(cols), t_l)
    w[torch.arange(len(cols)), torch.tensor(cols)] = 1.0
    return w


def _recorder() -> MatchRecorder:
    rec = MatchRecorder(3, 5, student_layers=[1, 5, 9], teacher_layers=[1, 5, 9, 13, 17], strategy="vlsi")
    rec.update(_one_hot([0, 1, 2]), step=0)
    rec.update(_one_hot([0, 2, 3]), step=0)  # a second micro-batch of the same step
    rec.update(_one_hot([1, 2, 3]), step=1)
    rec.update(_one_hot([2, 3, 4]), step=2)
    rec.update(_one_hot([2, 3, 4]), step=3)
    return rec


def test_counts_overall():
    counts = _recorder().counts()
    assert counts.dtype == torch.int64 and counts.shape == (3, 5)
    assert counts.sum().item() == 15  # 5 updates x 3 student layers
    assert counts[0].tolist() == [2, 1, 2, 0, 0]
    assert counts[2].tolist() == [0, 0, 1, 2, 2]


def test_counts_first_and_last_fraction():
    rec = _recorder()
    # 4 distinct steps: first half = steps 0 and 1 (three updates), last quarter = step 3
    assert rec.counts(first_fraction=0.5)[0].tolist() == [2, 1, 0, 0, 0]
    assert rec.counts(first_fraction=0.5).sum().item() == 9
    assert rec.counts(last_fraction=0.25).tolist() == _one_hot([2, 3, 4]).long().tolist()
    assert torch.equal(rec.counts(first_fraction=1.0), rec.counts())
    with pytest.raises(ValueError, match="not both"):
        rec.counts(first_fraction=0.5, last_fraction=0.5)
    with pytest.raises(ValueError, match="fraction"):
        rec.counts(last_fraction=0.0)


def test_soft_weights_count_every_selected_pair():
    rec = MatchRecorder(2, 4)
    rec.update(torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3], [0.0, 0.5, 0.5, 0.0]]), step=7)
    assert rec.counts().tolist() == [[1, 1, 0, 1], [0, 1, 1, 0]]


def test_json_round_trip(tmp_path):
    rec = _recorder()
    path = tmp_path / "matches.json"
    rec.to_json(path)
    payload = json.loads(path.read_text())
    assert payload["strategy"] == "vlsi" and payload["student_layers"] == [1, 5, 9]
    assert payload["teacher_layers"] == [1, 5, 9, 13, 17]
    assert payload["counts"] == rec.counts().tolist()
    assert payload["history"][0] == [0, [0, 6, 12]]  # flat i * t_l + j
    back = MatchRecorder.from_json(path)
    assert torch.equal(back.counts(), rec.counts())
    assert torch.equal(back.counts(last_fraction=0.5), rec.counts(last_fraction=0.5))
    assert back.num_updates == 5 and back.strategy == "vlsi"


def test_json_with_inconsistent_counts_is_rejected(tmp_path):
    path = tmp_path / "matches.json"
    _recorder().to_json(path)
    payload = json.loads(path.read_text())
    payload["counts"][0][0] += 1
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="do not match"):
        MatchRecorder.from_json(path)


def test_errors():
    with pytest.raises(ValueError, match="student_layers"):
        MatchRecorder(2, 3, student_layers=[1])
    rec = MatchRecorder(2, 3)
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        rec.update(torch.zeros(3, 2), step=0)


def test_match_log_replays_kept_lines(tmp_path):
    path = tmp_path / "matches.jsonl"
    log = MatchLog(path, MatchRecorder(2, 3))
    for step in (1, 2, 3):
        log.add(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), step)
    resumed = MatchLog(path, MatchRecorder(2, 3), keep_until=2)
    assert [s for s, _ in resumed.recorder.history] == [1, 2]
    assert len(path.read_text().splitlines()) == 2
    assert resumed.recorder.counts().tolist() == [[2, 0, 0], [0, 0, 2]]
