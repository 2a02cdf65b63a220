"""The shipped loss benchmark, at a tiny size."""

import json

from vlsi import bench


def test_linear_fit():
    intercept, slope = bench._linear_fit([1.0, 2.0, 4.0], [3.0, 5.0, 9.0])
    assert abs(intercept - 1.0) < 1e-12 and abs(slope - 2.0) < 1e-12
    assert bench._linear_fit([4.0], [8.0]) == (0.0, 2.0)


def test_tiny_benchmark_writes_report(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.run_loss_benchmark(
        vocab_size=2048, hidden_size=32, t_s=3, t_l=6, tokens=[64, 128, 256], chunk_size=32,
        dtype="float32", naive_max_tokens=128, out_json=out, threads=1, verbose=False,
    )
    on_disk = json.loads(out.read_text())
    assert on_disk["config"] == report["config"] and on_disk["config"]["vocab_size"] == 2048
    assert "clear_refs" in on_disk["method"]
    rows = {row["tokens"]: row for row in on_disk["results"]}
    assert sorted(rows) == [64, 128, 256]
    for n, row in rows.items():
        chunked = row["chunked"]
        assert chunked["status"] == "measured", chunked
        assert chunked["peak_bytes"] > 0 and chunked["seconds"] > 0 and chunked["loss"] > 0
        assert row["memory_ratio"] > 0 and row["time_ratio"] > 0
        # the floor is measured in the same worker: head matmuls and log-softmaxes only
        assert 0 < chunked["floor_seconds"] < chunked["seconds"] and chunked["floor_counts"]["teacher_matmuls"] > 0
    for n in (64, 128):
        naive = rows[n]["naive"]
        assert naive["status"] == "measured" and naive["peak_bytes"] > 0 and naive["seconds"] > 0
        assert rows[n]["ratio_kind"] == "measured"
        assert rows[n]["memory_ratio"] > 2  # chunks of 32 tokens: far below the naive peak
        # same seed, same matching: both compute the same loss
        assert abs(naive["loss"] - rows[n]["chunked"]["loss"]) < 1e-4 * naive["loss"]
    # past --naive-max-tokens the naive figures are a labelled linear extrapolation
    assert rows[256]["naive"]["status"] == "extrapolated" and rows[256]["ratio_kind"] == "extrapolated"
    fit = on_disk["naive_fit"]
    assert fit["points"] == 2 and fit["bytes_per_token"] > 0
    expected = fit["bytes_intercept"] + fit["bytes_per_token"] * 256
    assert abs(rows[256]["naive"]["peak_bytes"] - expected) <= 1
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
