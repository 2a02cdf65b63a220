"""The resolved run (vlsi.train.resolved): each fact computed once per object, the facts of the tiny
pair, the step directories, and identities equal to what the fingerprints record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import default_target_layers
from vlsi.train import fingerprint, identity, resolved
from vlsi.train.resolved import ResolvedRun, RunLayout, resolve_run, safetensors_parameters
from vlsi.train.stages.distill import layout, step_plan

STEPS = ("teacher-verbalize", "student-verbalize", "interact", "sft")


def _counting(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call's arguments."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_a_resolved_run_is_returned_as_is_and_lays_out_the_steps(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "out")
    run = resolve_run(cfg)
    assert resolve_run(run) is run and run.cfg is cfg
    assert run.layout == layout(cfg) == RunLayout(tmp_path / "out")
    paths = run.layout
    assert [paths.teacher_verbalize, paths.student_verbalize, paths.interact, paths.sft] == [
        tmp_path / "out" / name for name in ("1-teacher-verbalize", "2-student-verbalize", "3-interact", "4-sft")]
    assert paths.interact_adapter == tmp_path / "out" / "3-interact" / "adapter"
    assert paths.model == tmp_path / "out" / "4-sft" / "model"
    assert paths.teacher_cache == tmp_path / "out" / "teacher-cache"
    assert paths.verbalize_dir("student") == paths.student_verbalize
    with pytest.raises(VlsiError, match="role must be 'teacher' or 'student'"):
        paths.verbalize_dir("judge")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_model_facts_of_the_tiny_pair(tiny_pair, tiny_config, tmp_path, family):
    pair = tiny_pair(family)
    run = resolve_run(tiny_config(tmp_path, teacher=str(pair.teacher), student=str(pair.student)))
    for role, path in (("teacher", pair.teacher), ("student", pair.student)):
        config = json.loads((Path(path) / "config.json").read_text())
        text = config.get("text_config") or config
        facts = run.facts(role)
        assert facts.path == run.model_dir(role) == Path(path)
        assert facts.model_type == config["model_type"] == family == facts.family.model_type
        assert (facts.num_layers, facts.hidden_size, facts.vocab_size) == (
            text["num_hidden_layers"], text["hidden_size"], text["vocab_size"])
        assert facts.parameters == safetensors_parameters(Path(path))
        assert facts.target_layers == default_target_layers(facts.num_layers)  # none configured
        shape = run.plan_shape(role)
        assert (shape.num_layers, shape.hidden_size, shape.target_layers) == (
            facts.num_layers, facts.hidden_size, facts.target_layers)
    assert run.shared_vocab == min(run.teacher.vocab_size, run.student.vocab_size)
    assert run.student.parameters < run.teacher.parameters


def test_configured_target_layers_are_validated_with_their_key(tiny_config, tmp_path):
    run = resolve_run(tiny_config(tmp_path, **{"verbalizer.student_layers": [0]}))
    assert run.configured_layers("student") == [0] and run.student.target_layers == [0]
    assert run.plan_shape("student").target_layers == [0]
    bad = resolve_run(tiny_config(tmp_path, **{"verbalizer.student_layers": [99]}))
    for fact in (lambda: bad.student, lambda: bad.plan_shape("student")):
        with pytest.raises(VlsiError, match=r"^verbalizer\.student_layers: "):
            fact()


def test_each_fact_is_computed_once(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "_HASHES", {})
    facts = _counting(monkeypatch, resolved, "model_facts")
    digests = _counting(monkeypatch, identity, "file_digest")
    shapes = _counting(monkeypatch, resolved, "shape_from_checkpoint")
    run = resolve_run(tiny_config(tmp_path))
    assert run.student is run.student and run.teacher is run.teacher
    assert len(facts) == 2
    steps = step_plan(run)
    hashed = len(digests)  # data file, both configs, both models' weight files: once each
    assert hashed == len({str(Path(args[0]).resolve()) for args in digests})
    assert step_plan(run) == steps and len(digests) == hashed  # nothing hashed again
    run.plan_shape("teacher"), run.plan_shape("teacher", [0]), run.checkpoint_shape("teacher")
    assert len(shapes) == 1
    assert run.plan_shape("teacher", [0]).target_layers == [0]
    assert run.checkpoint_shape("teacher").target_layers == []  # the kept shape is not changed


def test_identities_are_those_the_fingerprints_record(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path)
    run = resolve_run(cfg)
    assert run.data_identity == identity.identity_of_data(cfg.data)
    assert run.teacher_identity == identity.identity_of_teacher(cfg.teacher, None)
    assert run.student_identity == identity.model_identity(cfg.student)
    for step in STEPS:  # the same run identity from the config and from the resolved run
        assert fingerprint.digest(fingerprint.step_inputs(run, step)) == fingerprint.digest(
            fingerprint.step_inputs(cfg, step))


def test_a_step_without_teacher_never_reads_it(tiny_config, tmp_path):
    run = resolve_run(tiny_config(tmp_path, teacher=str(tmp_path / "missing")))
    assert fingerprint.step_inputs(run, "sft")["student"] == run.student_identity
    assert run.student.model_type == "qwen2_vl"
    for _ in range(2):  # a failure is not kept: raised again on the next use
        with pytest.raises(VlsiError, match="model path not found"):
            run.teacher


def test_the_object_is_frozen(tiny_config, tmp_path):
    run = resolve_run(tiny_config(tmp_path))
    assert isinstance(run, ResolvedRun)
    with pytest.raises(AttributeError):
        run.cfg = None
