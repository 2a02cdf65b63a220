"""Run identities (vlsi.train.fingerprint) on fabricated directories: what each step's inputs hold,
which settings count, digests of files, models, data and earlier steps, and the differences
a refusal names."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from vlsi import __version__
from vlsi.errors import VlsiError
from vlsi.files import canonical_digest
from vlsi.train import fingerprint
from vlsi.train import identity as identities
from vlsi.train.config import DataConfig, InteractionConfig, RunConfig, TrainingConfig, VerbalizerConfig
from vlsi.train.resolved import resolve_run
from vlsi.train.teacher_cache import FORMAT, MANIFEST

STEPS = ("teacher-verbalize", "student-verbalize", "interact", "sft")


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    """Each test starts with an empty per-process digest memo."""
    monkeypatch.setattr(identities, "_HASHES", {})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model(root: Path, config: dict, weights: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer.json").write_text("{}")  # not a weight file: not part of the identity
    for name, data in weights.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def run(tmp_path) -> RunConfig:
    teacher = _model(tmp_path / "teacher", {"model_type": "qwen2_vl", "layers": 8}, {"model.safetensors": b"T" * 64})
    student = _model(tmp_path / "student", {"model_type": "qwen2_vl", "layers": 4}, {"model.safetensors": b"S" * 32})
    data = tmp_path / "train.json"
    data.write_text('[{"id": "a"}]')
    return RunConfig(teacher=str(teacher), student=str(student), output_dir=str(tmp_path / "out"),
                     data=DataConfig(train=[str(data)]),
                     verbalizer=VerbalizerConfig(teacher_layers=[1, 3], student_layers=[1]),
                     training=TrainingConfig(max_steps=4, logging_steps=1))


def _touch(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_file_digest_is_the_sha256_and_follows_content(tmp_path):
    f = tmp_path / "w.bin"
    _touch(f, b"abc", 1_000_000_000)
    assert identities.file_digest(f) == _sha(b"abc")
    _touch(f, b"abd", 2_000_000_000)  # same size, another mtime: hashed again
    assert identities.file_digest(f) == _sha(b"abd")


def test_file_digest_is_memoised_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    _touch(f, b"abc", 1_000_000_000)
    first = identities.file_digest(f)
    _touch(f, b"xyz", 1_000_000_000)  # same size and mtime: the memo answers, the file is not read
    assert identities.file_digest(f) == first == _sha(b"abc")


def test_large_files_are_sampled_at_both_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(identities, "WHOLE_FILE_LIMIT", 16)
    monkeypatch.setattr(identities, "SAMPLE_BYTES", 4)
    f = tmp_path / "big.safetensors"
    data = bytes(range(40))
    _touch(f, data, 1_000_000_000)
    sampled = _sha(b"40" + data[:4] + data[-4:])  # size, first and last SAMPLE_BYTES
    assert identities.file_digest(f) == sampled
    middle = bytearray(data)
    middle[20] ^= 0xFF
    _touch(f, bytes(middle), 2_000_000_000)
    assert identities.file_digest(f) == sampled  # a byte in the middle is not read
    head = bytearray(data)
    head[0] ^= 0xFF
    _touch(f, bytes(head), 3_000_000_000)
    assert identities.file_digest(f) != sampled


def test_model_identity_holds_path_config_and_every_weight_file(tmp_path):
    root = _model(tmp_path / "m", {"model_type": "x"}, {
        "model-00001-of-00002.safetensors": b"a", "model-00002-of-00002.safetensors": b"b",
        "model.safetensors.index.json": b"{}", "extra.bin": b"c"})
    identity = identities.model_identity(tmp_path / "m" / ".." / "m")
    assert identity == {
        "path": str(root.resolve()),
        "config": _sha(json.dumps({"model_type": "x"}).encode()),
        "weights": {"extra.bin": _sha(b"c"), "model-00001-of-00002.safetensors": _sha(b"a"),
                    "model-00002-of-00002.safetensors": _sha(b"b"), "model.safetensors.index.json": _sha(b"{}")},
    }


def test_a_teacher_without_weights_takes_them_from_its_complete_cache(run, tmp_path):
    (Path(run.teacher) / "model.safetensors").unlink()
    assert resolve_run(run).teacher_identity["weights"] == {}  # no cache: no weights
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = {"format": FORMAT, "complete": False, "teacher": {"weights": {"model.safetensors": "f" * 64}}}
    (cache / MANIFEST).write_text(json.dumps(manifest))
    run.interaction = InteractionConfig(teacher_cache=str(cache))
    assert resolve_run(run).teacher_identity["weights"] == {}  # an incomplete cache stands in for nothing
    (cache / MANIFEST).write_text(json.dumps({**manifest, "complete": True}))
    identity = resolve_run(run).teacher_identity
    assert identity["weights"] == {"model.safetensors": "f" * 64}
    assert identity["path"] == str(Path(run.teacher).resolve())  # path and config stay the teacher's own
    assert identity["config"] == identities.model_identity(run.teacher)["config"]


def test_data_identity_hashes_the_training_files_and_keeps_the_other_settings(run):
    train = Path(run.data.train[0])
    identity = resolve_run(run).data_identity
    assert identity["train"] == {str(train.resolve()): _sha(train.read_bytes())}
    assert identity["max_length"] == run.data.max_length and identity["strict"] is False
    assert "eval" not in identity


def test_directory_identity_is_the_step_digest_else_the_weights(tmp_path):
    step = tmp_path / "step"
    fingerprint.write(step, {"a": 1})
    assert fingerprint.directory_identity(step) == "step:" + canonical_digest({"a": 1})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "verbalizers.safetensors").write_bytes(b"v")
    (plain / "verbalizers.json").write_text("{}")  # not a weight file
    assert fingerprint.directory_identity(plain) == "files:" + canonical_digest({"verbalizers.safetensors": _sha(b"v")})
    assert fingerprint.directory_identity(tmp_path / "missing") == "files:" + canonical_digest({})


def test_step_inputs_of_each_step(run):
    inputs = {step: fingerprint.step_inputs(run, step) for step in STEPS}
    for step, record in inputs.items():
        assert record["step"] == step and record["version"] == __version__
        assert record["data"] == resolve_run(run).data_identity
    teacher, student = inputs["teacher-verbalize"], inputs["student-verbalize"]
    assert teacher["model"] == identities.model_identity(run.teacher)
    assert student["model"] == identities.model_identity(run.student)
    assert teacher["verbalizer"] == {"architecture": "verb-ffn", "layers": [1, 3]}
    assert student["verbalizer"] == {"architecture": "verb-ffn", "layers": [1]}
    assert set(inputs["interact"]) >= {"teacher", "student", "verbalizer", "interaction", "lora", "training"}
    assert "teacher" not in inputs["sft"] and inputs["sft"]["lora"] == {"r": 64, "alpha": 64, "dropout": 0.05}
    # settings that cannot change a result are left out
    for record in (teacher, inputs["interact"], inputs["sft"]):
        assert not fingerprint.NOT_RESULT_SETTINGS & set(record["training"])
        assert record["training"]["max_steps"] == 4
    upstream = {"adapter": "step:abc"}
    assert fingerprint.step_inputs(run, "sft", upstream)["adapter"] == "step:abc"
    with pytest.raises(VlsiError, match="unknown step 'verbalize'"):
        fingerprint.step_inputs(run, "verbalize")


def test_a_stage_override_changes_that_stage_only(run):
    before = {step: fingerprint.digest(fingerprint.step_inputs(run, step)) for step in STEPS}
    run.sft = {"learning_rate": 0.5}
    after = {step: fingerprint.digest(fingerprint.step_inputs(run, step)) for step in STEPS}
    assert [s for s in STEPS if before[s] != after[s]] == ["sft"]
    run.training.logging_steps, run.training.save_steps = 7, 3  # not result settings
    assert {step: fingerprint.digest(fingerprint.step_inputs(run, step)) for step in STEPS} == after
    run.interaction.strategy = "uniform"
    changed = {step for step in STEPS if fingerprint.digest(fingerprint.step_inputs(run, step)) != after[step]}
    assert changed == {"interact"}


def test_differences_walk_mappings_and_shorten_long_values():
    before = {"interaction": {"strategy": "vlsi", "k": 3}, "gone": 1, "long": "x" * 80, "layers": [1, 2]}
    after = {"interaction": {"strategy": "uniform", "k": 3}, "new": True, "long": "y" * 80, "layers": [1, 3]}
    assert fingerprint.differences(before, after) == [
        "gone: removed",
        "interaction.strategy: 'vlsi' -> 'uniform'",
        "layers: [1, 2] -> [1, 3]",
        f"long: {repr('x' * 80)[:57]}... -> {repr('y' * 80)[:57]}...",
        "new: added",
    ]
    assert fingerprint.differences(before, before) == []
    assert fingerprint.differences(1, 1.5, "lr") == ["lr: 1 -> 1.5"]


def test_write_recorded_and_changed(tmp_path):
    step = tmp_path / "3-interact"
    assert fingerprint.recorded(step) is None and fingerprint.changed(step, {"a": 1}) is None
    digest = fingerprint.write(step, {"a": 1, "b": {"c": 2}})
    assert digest == fingerprint.digest({"b": {"c": 2}, "a": 1})  # canonical: key order does not count
    assert fingerprint.recorded(step) == {"digest": digest, "inputs": {"a": 1, "b": {"c": 2}}}
    assert fingerprint.changed(step, {"a": 1, "b": {"c": 2}}) == []
    assert fingerprint.changed(step, {"a": 2, "b": {"c": 2}}) == ["a: 1 -> 2"]


def test_refusal_names_at_most_three_differences(tmp_path):
    err = fingerprint.refusal(tmp_path, ["a: 1 -> 2", "b: added", "c: removed", "d: 3 -> 4", "e: added"],
                              "rerun with --restart-changed")
    assert isinstance(err, fingerprint.ChangedInputsError) and isinstance(err, VlsiError)
    assert str(err) == (f"{tmp_path} holds a result of other inputs (a: 1 -> 2; b: added; c: removed; and 2 more); "
                        "use a new output directory, or rerun with --restart-changed")
    assert str(fingerprint.refusal(tmp_path, ["a: 1 -> 2"], "x")) == (
        f"{tmp_path} holds a result of other inputs (a: 1 -> 2); use a new output directory, or x")
