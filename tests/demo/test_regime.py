"""The demo's regime numbers (vlsi.demo.regime) on the tiny pair, against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.utils import logging

from vlsi.data.synthetic import SyntheticConfig, generate_dataset
from vlsi.demo import regime
from vlsi.method.verbalizer import VerbalizerSet
from vlsi.models.backbones import load_backbone
from vlsi.train.config import DataConfig, RunConfig, VerbalizerConfig
from vlsi.train.stages.training_data import load_training_data

torch.set_num_threads(1)
logging.set_verbosity_error()

TEACHER_LAYERS, STUDENT_LAYERS = [1, 3, 5], [0, 2]


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    """(config, teacher verbalizer dir): verbalizers with random weights, not the logit lens."""
    root = tmp_path_factory.mktemp("regime")
    generate_dataset(root / "data", SyntheticConfig(seed=0, num_train=9, num_eval=2))
    pair = tiny_pair("qwen2_vl")
    torch.manual_seed(0)
    vset = VerbalizerSet(load_backbone(pair.teacher), TEACHER_LAYERS)
    with torch.no_grad():
        for p in vset.parameters():
            p.normal_(0, 0.2)
    vset.save(root / "verbalizers")
    cfg = RunConfig(teacher=str(pair.teacher), student=str(pair.student), output_dir=str(root / "out"),
                    data=DataConfig(train=[str(root / "data" / "train.json")], max_length=512),
                    verbalizer=VerbalizerConfig(student_layers=STUDENT_LAYERS))
    return cfg, root / "verbalizers"


def direct(cfg: RunConfig, verbalizers: Path, samples: int) -> dict:
    """One sample at a time, from ``output_hidden_states`` and the model's own logits, in float64."""
    dataset, collator, _ = load_training_data(cfg.data, cfg.teacher)
    teacher = load_backbone(cfg.teacher)
    teacher.model.eval()
    vset = VerbalizerSet.load(verbalizers, teacher).eval()
    vocab = min(teacher.vocab_size, load_backbone(cfg.student).vocab_size)
    per_layer = {k: [] for k in range(len(TEACHER_LAYERS) + 1)}
    lengths = []
    with torch.no_grad():
        for index in range(samples):
            batch = collator([dataset[index]])
            out = teacher.model(**teacher.model_inputs(batch), output_hidden_states=True)
            labels = batch["labels"][0]
            lengths.append(int((labels != -100).sum()))
            for p in range(labels.shape[0] - 1):
                y = int(labels[p + 1])
                if y == -100:
                    continue
                rows = [vset.logits(k, out.hidden_states[layer + 1][0, p:p + 1])[0]
                        for k, layer in enumerate(TEACHER_LAYERS)] + [out.logits[0, p]]
                for k, logits in enumerate(rows):
                    log_p = torch.log_softmax(logits[:vocab].double(), dim=-1)
                    per_layer[k].append((float(-(log_p.exp() * log_p).sum()), float(-log_p[y]),
                                         float(log_p[y].exp())))
    means = {k: [sum(v[m] for v in values) / len(values) for m in range(3)] for k, values in per_layer.items()}
    return {"means": means, "mean_response_tokens": sum(lengths) / len(lengths)}


def test_regime_numbers_equal_a_direct_computation(setup):
    cfg, verbalizers = setup
    got = regime.measure_regime(cfg, verbalizers, samples=5, batch_size=2)  # batches of 2, 2, 1
    ref = direct(cfg, verbalizers, 5)
    assert got["samples"] == 5 and got["student_target_layers"] == 2 and got["teacher_target_layers"] == 3
    assert got["mean_response_tokens"] == pytest.approx(ref["mean_response_tokens"], abs=1e-12)
    last = ref["means"][len(TEACHER_LAYERS)]
    assert [got["teacher_entropy_nats"], got["teacher_label_kl_nats"], got["teacher_label_probability"]] \
        == pytest.approx(last, rel=1e-4)
    assert [v["layer"] for v in got["verbalized"]] == TEACHER_LAYERS
    for k, v in enumerate(got["verbalized"]):
        got_k = [v["entropy_nats"], v["label_kl_nats"], v["label_probability"]]
        assert got_k == pytest.approx(ref["means"][k], rel=1e-4)
    # the layers do differ (random verbalizers), so a mix-up of layers would show
    assert len({round(v["label_kl_nats"], 3) for v in got["verbalized"]}) == len(TEACHER_LAYERS)
    # fewer samples than asked: all of them
    assert regime.measure_regime(cfg, verbalizers, samples=100)["samples"] == 9


def test_stats_of_known_distributions():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0], [10.0, -10.0, -10.0, -10.0]])
    stats = regime.distribution_stats(logits, torch.tensor([1, 0]))
    q = 3 * torch.tensor(-20.0).exp().item()
    entropy_2 = -((1 - q) * torch.tensor(1 - q).log().item() + q * (-20.0 + torch.tensor(1 - q).log().item()))
    assert stats["entropy_nats"] == pytest.approx(torch.tensor(3.0).log().item() + entropy_2, rel=1e-5)
    assert stats["label_kl_nats"] == pytest.approx(torch.tensor(3.0).log().item(), rel=1e-5)
    assert stats["label_probability"] == pytest.approx(1 / 3 + 1.0, rel=1e-5)


def test_demo_regime_is_kept_and_reused(setup, tmp_path, monkeypatch):
    cfg, verbalizers = setup
    config = tmp_path / "vlsi.yaml"
    config.write_text(json.dumps({"teacher": cfg.teacher, "student": cfg.student, "output_dir": str(tmp_path / "o"),
                                  "data": {"train": cfg.data.train, "max_length": 512,
                                           "image_root": str(Path(cfg.data.train[0]).parent)},
                                  "verbalizer": {"student_layers": STUDENT_LAYERS}}))
    first = regime.demo_regime(tmp_path, config, verbalizers, 4)
    assert json.loads((tmp_path / regime.REGIME_FILE).read_text()) == first and first["samples"] == 4
    monkeypatch.setattr(regime, "measure_regime", lambda *a, **k: pytest.fail("measured again"))
    assert regime.demo_regime(tmp_path, config, verbalizers, 4) == first
    with pytest.raises(pytest.fail.Exception):
        regime.demo_regime(tmp_path, config, verbalizers, 3)  # another sample count: measured anew
    subset = tmp_path / "first-2.json"
    subset.write_text(json.dumps(json.loads(Path(cfg.data.train[0]).read_text())[:2]))
    monkeypatch.undo()
    (tmp_path / "sub").mkdir()
    other = regime.demo_regime(tmp_path / "sub", config, verbalizers, 4, data=subset)  # 4 asked, 2 there
    assert other["data"] == [str(subset)] and other["samples"] == 2
    head, rows = regime.regime_rows(first)
    assert len(rows) == len(TEACHER_LAYERS) + 1 and len(head) == 4
    assert not any("|" in cell for cell in head + sum(rows, []))  # a "|" would split a Markdown cell
    assert "t_s = 2" in regime.regime_line(first) and "t_l = 3" in regime.regime_line(first)


def test_the_demo_prints_the_targets_in_one_line():
    from vlsi.demo.run import targets_summary

    line = targets_summary({"samples": 512, "mean_response_tokens": 8.67, "student_target_layers": 4,
                            "teacher_target_layers": 2, "teacher_entropy_nats": 0.1366,
                            "teacher_label_probability": 0.9146, "teacher_label_kl_nats": 0.1282,
                            "verbalized": [{"label_probability": 0.733}, {"label_probability": 0.804}]})
    assert "\n" not in line
    for needle in ("512 distillation samples", "8.7 response tokens", "t_s = 4, t_l = 2",
                   "entropy 0.137 nats", "gives the label 0.915", "KL from the label 0.128",
                   "verbalized layers give the label 0.73, 0.80"):
        assert needle in line, needle


def test_vlsi_demo_regime_prints_the_numbers_as_json(setup, tmp_path, capsys):
    import json

    from vlsi.cli import main
    from vlsi.train.config import dump_config

    cfg, verbalizers = setup
    config = tmp_path / "vlsi.yaml"
    config.write_text(dump_config(cfg))
    assert main(["demo", "regime", str(config), str(verbalizers), "--samples", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == regime.measure_regime(cfg, verbalizers, samples=3)
    capsys.readouterr()
    assert main(["demo", "regime", str(config), str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: teacher verbalizers") and err.count("\n") == 1
