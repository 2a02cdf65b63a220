"""The demo report's numbers (vlsi.demo.report): the verdict rule, the aggregation, the map."""

from __future__ import annotations

import pytest

from vlsi.demo.pipeline import FIXED_ROWS, SEED_ROWS
from vlsi.demo.report import accuracy_at, aggregate, paired, plateau_line, teacher_map, verdicts


def test_paired_verdict_rule():
    assert paired([0.6, 0.62, 0.61], [0.5, 0.52, 0.5])["beats"]
    assert not paired([0.6, 0.62, 0.49], [0.5, 0.52, 0.5])["beats"]  # one seed negative
    noisy = paired([0.51, 0.60, 0.502], [0.5, 0.5, 0.5])  # all positive, mean < std
    assert all(d > 0 for d in noisy["per_seed"]) and noisy["mean"] < noisy["std"] and not noisy["beats"]
    assert not paired([0.9], [0.1])["tested"] and not paired([0.9], [0.1])["beats"]


def _result(acc: float) -> dict:
    return {"accuracy": acc, "count": 100, "by_category": {"c": acc}, "by_form": {"short": acc}}


def _seeds(values: dict[str, list[float]]) -> list[dict]:
    return [{"seed": k, "results": {key: _result(v[k]) for key, v in values.items()}}
            for k in range(len(next(iter(values.values()))))]


def test_aggregate_pairs_by_seed_and_the_verdicts_follow():
    fixed = {"teacher": _result(0.9), "student_before": _result(0.6)}
    seeds = _seeds({"sft_only": [0.62, 0.61, 0.63], "llkd": [0.64, 0.66, 0.66],
                    "vlsi_no_sft": [0.5, 0.5, 0.5], "vlsi_no_sft_beam": [0.55, 0.5, 0.6],
                    "vlsi": [0.66, 0.65, 0.67], "vlsi_on_policy": [0.67, 0.64, 0.69]})
    agg = aggregate(fixed, seeds)
    assert list(agg["rows"]) == [k for k, _ in FIXED_ROWS + SEED_ROWS]
    assert agg["paired"]["sft_only"]["beats"]
    assert not agg["paired"]["llkd"]["beats"]  # +2, -1, +1: not positive on every seed
    lines = verdicts(agg)
    assert lines[1].startswith("VLsI beats SFT-only: +4.0 pts")
    assert lines[2].startswith("VLsI does NOT beat last-layer KD") and "not positive on every seed" in lines[2]
    on_policy = agg["on_policy_minus_vlsi"]  # on-policy paired with off-policy VLsI by seed
    assert [round(d, 6) for d in on_policy["per_seed"]] == [0.01, -0.01, 0.02]
    assert lines[3].startswith("VLsI on-policy (λ = 0.5) minus VLsI: +0.7 pts ± 1.5 (per seed: +1.0 pts, "
                               "-1.0 pts, +2.0 pts)")
    points = teacher_map(agg, [[{"step": 2000, "seed": k, "teacher": _result(0.7), "vlsi": _result(a)}
                                for k, a in enumerate([0.6, 0.61, 0.62])]])
    assert [p["teacher_step"] for p in points] == [2000, "final"]
    assert round(points[0]["gap"], 6) == 0.1 and round(points[0]["mean"], 6) == -0.01
    assert points[1]["mean"] == agg["paired"]["sft_only"]["mean"]


def test_plateau_line_applies_the_one_point_rule():
    curves = {"teacher": [{"step": s, "eval_accuracy": a} for s, a in ((400, 0.60), (800, 0.900), (1000, 0.905))],
              "student": [{"step": s, "eval_accuracy": a} for s, a in ((400, 0.50), (800, 0.700), (1000, 0.750))]}
    line = plateau_line(curves)
    assert "teacher: +0.5 pts from step 800 to 1,000 (at its plateau)" in line
    assert "student: +5.0 pts from step 800 to 1,000 (not at its plateau)" in line
    # the 80% step between two curve points: the accuracy there is interpolated
    between = {"teacher": [{"step": s, "eval_accuracy": a} for s, a in ((500, 0.80), (1000, 0.90), (1250, 0.92))]}
    # 80% of 1250 = 1000 is a point: +2.0; at 80% of 1200 = 960 the accuracy is 0.892
    assert "+2.0 pts from step 1,000 to 1,250 (not at its plateau)" in plateau_line(between)
    between["teacher"][-1]["step"] = 1200
    assert accuracy_at(between["teacher"], 960) == pytest.approx(0.892)
    assert "+2.8 pts from step 960 (interpolated) to 1,200 (not at its plateau)" in plateau_line(between)
