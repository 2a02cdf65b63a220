"""The shipped loss benchmark: its pure functions exactly, on fabricated rows; a run at a tiny
size (``make test-all``) produces well-formed figures. No test asserts on the speed or memory of
the machine it runs on."""

import json

import pytest

from vlsi.tools import bench


def test_linear_fit():
    intercept, slope = bench._linear_fit([1.0, 2.0, 4.0], [3.0, 5.0, 9.0])
    assert abs(intercept - 1.0) < 1e-12 and abs(slope - 2.0) < 1e-12
    assert bench._linear_fit([4.0], [8.0]) == (0.0, 2.0)


def _rows() -> list[dict]:
    """Fabricated benchmark rows: naive measured at 64 and 128 tokens, skipped at 256."""
    return [
        {"tokens": 64, "chunked": {"status": "measured", "peak_bytes": 100, "seconds": 1.0},
         "naive": {"status": "measured", "tokens": 64, "peak_bytes": 1000, "seconds": 2.0}},
        {"tokens": 128, "chunked": {"status": "measured", "peak_bytes": 125, "seconds": 2.0},
         "naive": {"status": "measured", "tokens": 128, "peak_bytes": 1800, "seconds": 3.0}},
        {"tokens": 256, "chunked": {"status": "measured", "peak_bytes": 120, "seconds": 4.0},
         "naive": {"status": "skipped", "estimated_bytes": 10**9}},
    ]


def test_naive_fit_extrapolation_ratios_and_summary_of_fabricated_rows():
    rows = _rows()
    fit = bench._naive_fit(rows)
    assert fit == {"points": 2, "bytes_intercept": 200.0, "bytes_per_token": 12.5,
                   "seconds_intercept": 1.0, "seconds_per_token": 1 / 64}
    bench._fill_extrapolations(rows, fit)
    assert rows[2]["naive"] == {"status": "extrapolated", "estimated_bytes": 10**9, "peak_bytes": 3400, "seconds": 5.0}
    bench._ratios(rows)
    assert [(r["memory_ratio"], r["time_ratio"], r["ratio_kind"]) for r in rows] == [
        (10.0, 2.0, "measured"), (14.4, 1.5, "measured"), (3400 / 120, 1.25, "extrapolated")]
    assert bench._summary(rows, chunk_size=100) == {
        "chunked_peak_spread": 0.25, "chunked_peak_spread_full_chunks": 125 / 120 - 1,
        "full_chunk_tokens": [128, 256], "worst_measured_time_ratio": 1.5}
    table = bench.format_table({"results": rows, "summary": bench._summary(rows, 100)})
    assert "   14.40     1.50" in table and "extrapolated" in table and "chunked peak spread over token counts: 25.0%" in table


def test_without_a_measured_naive_run_nothing_is_extrapolated():
    rows = _rows()
    for row in rows:
        row["naive"] = {"status": "skipped", "estimated_bytes": 1}
    assert bench._naive_fit(rows) is None
    bench._fill_extrapolations(rows, None)
    bench._ratios(rows)
    assert all(r["naive"]["status"] == "skipped" and r["memory_ratio"] is None and "ratio_kind" not in r for r in rows)
    assert bench._summary(rows, 64)["worst_measured_time_ratio"] is None
    failed = _rows()
    failed[0]["chunked"] = {"status": "failed", "error": "exit 1"}
    bench._ratios(failed)
    assert failed[0]["memory_ratio"] is None and failed[1]["memory_ratio"] == 14.4


def test_naive_bytes_estimate():
    # float32 [N, V]: t_s + t_l + 2 layers of log-probs, t_s + 1 saved teacher rows, 3 temporaries
    assert bench.naive_bytes_estimate(10, 100, 2, 3) == 10 * 100 * 4 * (7 + 3 + 3)


@pytest.mark.slow
def test_tiny_benchmark_writes_a_well_formed_report(tmp_path):
    """The figures are produced and consistent with each other; how fast or how small they are
    on a shared machine is not asserted."""
    out = tmp_path / "bench.json"
    report = bench.run_loss_benchmark(
        vocab_size=2048, hidden_size=32, t_s=3, t_l=6, tokens=[64, 128, 256], chunk_size=32,
        dtype="float32", naive_max_tokens=128, out_json=out, threads=1, verbose=False,
    )
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["config"]["vocab_size"] == 2048 and "clear_refs" in on_disk["method"]
    rows = {row["tokens"]: row for row in on_disk["results"]}
    assert sorted(rows) == [64, 128, 256]
    for n, row in rows.items():
        chunked, naive = row["chunked"], row["naive"]
        assert chunked["status"] == "measured", chunked
        assert chunked["peak_bytes"] >= 0 and chunked["seconds"] > 0 and chunked["loss"] > 0
        # the floor is measured in the same worker: head matmuls and log-softmaxes only
        assert chunked["floor_seconds"] > 0 and chunked["floor_counts"]["teacher_matmuls"] > 0
        assert row["memory_ratio"] == naive["peak_bytes"] / max(chunked["peak_bytes"], 1)
        assert row["time_ratio"] == naive["seconds"] / chunked["seconds"]
    for n in (64, 128):
        naive = rows[n]["naive"]
        assert naive["status"] == "measured" and naive["peak_bytes"] >= 0 and naive["seconds"] > 0
        assert rows[n]["ratio_kind"] == "measured"
        # same seed, same matching: both compute the same loss
        assert abs(naive["loss"] - rows[n]["chunked"]["loss"]) < 1e-4 * naive["loss"]
    # past --naive-max-tokens the naive figures are a labelled linear extrapolation
    assert rows[256]["naive"]["status"] == "extrapolated" and rows[256]["ratio_kind"] == "extrapolated"
    fit = on_disk["naive_fit"]
    assert fit["points"] == 2
    assert (fit["bytes_intercept"], fit["bytes_per_token"]) == pytest.approx(bench._linear_fit(
        [64.0, 128.0], [float(rows[64]["naive"]["peak_bytes"]), float(rows[128]["naive"]["peak_bytes"])]))
    expected = fit["bytes_intercept"] + fit["bytes_per_token"] * 256
    assert abs(rows[256]["naive"]["peak_bytes"] - expected) <= 1
    assert on_disk["summary"] == bench._summary(on_disk["results"], 32)
    assert "tokens" in bench.format_table(report)


def test_head_op_counts():
    """7 x 20 layers, one chunk, the paper's matching (every pair scored, one pair per student
    layer): 27 head matmuls to score, 24 in the gradient pass (8 student forward + 8 backward,
    8 teacher), the counts the issue's floor estimate uses."""
    import torch

    weights = torch.zeros(7, 20)
    weights[torch.arange(7), torch.tensor([0, 3, 6, 9, 12, 15, 19])] = 1.0
    counts = bench.head_op_counts(weights, torch.ones(7, 20, dtype=torch.bool), [256])
    assert counts["student_matmuls"] + counts["teacher_matmuls"] == 27 + 24
    assert counts == {"student_matmuls": 7 + 16, "teacher_matmuls": 20 + 8,
                      "student_log_softmaxes": 7 + 8, "teacher_log_softmaxes": 20 + 8}
    assert bench.head_op_counts(weights, torch.ones(7, 20, dtype=torch.bool), [64] * 4)["teacher_matmuls"] == 4 * 28


def test_cli_parses_loss_flags():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_cli(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["loss", "--vocab-size", "64", "--tokens", "8", "16", "--t-s", "2",
                              "--t-l", "3", "--dtype", "float32", "--naive-max-tokens", "8", "--out", "x.json"])
    assert args.tokens == [8, 16] and args.t_s == 2 and args.naive_max_tokens == 8 and args.func is bench._cmd_loss
