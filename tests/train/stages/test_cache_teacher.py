"""``vlsi cache-teacher`` and the interaction step reading it: end to end, kill and rerun,
exactness at K = V, refusals."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from helpers import REPO, TINY_CONFIG, free_port, one_line
from vlsi.errors import VlsiError
from vlsi.train.teacher_cache import MANIFEST, CacheError, TeacherCache

STEPS = {"training.max_steps": 2, "training.per_device_train_batch_size": 2, "training.gradient_accumulation_steps": 1}


@pytest.fixture(scope="module")
def verbalized(tmp_path_factory, tiny_overrides, set_args, run_cli) -> Path:
    """A run directory whose teacher verbalizers are trained (2 steps)."""
    run = tmp_path_factory.mktemp("cached_run")
    done = run_cli("verbalize", str(TINY_CONFIG), "--role", "teacher", *set_args(tiny_overrides(run, **STEPS)))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _cache(run_cli, set_args, overrides, out: Path, *extra: str):
    return run_cli("cache-teacher", str(TINY_CONFIG), *set_args(overrides), "--out", str(out), *extra)


@pytest.fixture(scope="module")
def cache8(tmp_path_factory, verbalized, tiny_overrides, set_args, run_cli) -> Path:
    """The teacher cache of ``verbalized`` at K = 8, 4 samples per shard (read it; copy to change it)."""
    out = tmp_path_factory.mktemp("cache8") / "cache"
    done = _cache(run_cli, set_args, tiny_overrides(verbalized, **STEPS), out, "--top-k", "8", "--samples-per-shard", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def student_verbalizers(tmp_path_factory, verbalized, tiny_overrides, set_args, run_cli) -> Path:
    out = tmp_path_factory.mktemp("student_verbalizers") / "student-verbalizers"
    made = run_cli("verbalize", str(TINY_CONFIG), "--role", "student", *set_args(tiny_overrides(verbalized, **STEPS)),
                   "--out", str(out))
    assert made.returncode == 0, made.stderr[-3000:]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_killed_mid_shard_then_rerun_writes_the_same_cache(tmp_path, verbalized, cache8, tiny_overrides, set_args,
                                                           run_cli):
    overrides = tiny_overrides(verbalized, **STEPS)
    whole, killed = cache8, tmp_path / "killed"
    # killed with shard 0 written and shard 1 half full
    proc = run_cli("cache-teacher", str(TINY_CONFIG), *set_args(overrides), "--out", str(killed), "--top-k", "8",
                   "--samples-per-shard", "4", env={"VLSI_KILL_AT": "cache-teacher:samples:6"})
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in killed.glob("shard-*")) == ["shard-00-00000.safetensors"]
    assert not json.loads((killed / MANIFEST).read_text())["complete"]
    again = _cache(run_cli, set_args, overrides, killed, "--top-k", "8", "--samples-per-shard", "4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _files(killed) == _files(whole)  # 4 shards of 4 samples, index and manifest, byte for byte
    cache = TeacherCache.open(whole)
    assert len(cache.entries) == 16 and cache.k == 8 and cache.layers == 3  # teacher layers 1, 5 and the last


def test_distill_with_the_cache_and_k_equal_v_reproduces_the_online_step(tmp_path, verbalized, tiny_overrides,
                                                                        set_args, run_cli):
    """The whole distill with interaction.teacher_cache (K = V, float32 storage) logs the online
    run's interaction loss and KLD to float tolerance; no teacher is loaded in its interaction."""
    vocab = 520  # the tiny pair's shared vocabulary (K = V: an empty tail)
    # one sample per micro-batch: the online teacher then sees each sample unpadded, as the cache did
    steps = {**STEPS, "training.per_device_train_batch_size": 1, "training.gradient_accumulation_steps": 2}
    online_dir, cached_dir = tmp_path / "online", tmp_path / "cached"
    online = run_cli("distill", str(TINY_CONFIG), *set_args(tiny_overrides(online_dir, **steps)), timeout=300)
    assert online.returncode == 0, online.stderr[-3000:]
    cache = tmp_path / "cache"
    # the cache is made from the online run's teacher verbalizers, then distill reuses every step but the interaction
    shutil.copytree(online_dir / "1-teacher-verbalize", cached_dir / "1-teacher-verbalize")
    shutil.copytree(online_dir / "2-student-verbalize", cached_dir / "2-student-verbalize")
    made = _cache(run_cli, set_args, tiny_overrides(cached_dir, **steps), cache, "--top-k", str(vocab),
                  "--storage", "float32")
    assert made.returncode == 0, made.stderr[-3000:]
    overrides = tiny_overrides(cached_dir, **steps, **{"interaction.teacher_cache": str(cache),
                                                      "interaction.teacher_cache_top_k": vocab})
    cached = run_cli("distill", str(TINY_CONFIG), *set_args(overrides), timeout=300)
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "teacher cache: done, skipped" in cached.stdout and "teacher: none loaded" in cached.stdout

    def logged(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "3-interact" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "interaction_loss" in r]

    want, got = logged(online_dir), logged(cached_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    # The online loss computes each KL as P.log P - P.log Q, two float32 sums of size ~log V = 6.3
    # whose difference is ~0.03: it is exact to their rounding (~1e-6 absolute), not to 1e-6 of
    # the difference; the cached loss sums P (log P - log Q) directly.
    for a, b in zip(want, got):
        for key in ("interaction_loss", "last_layer_loss", "mean_kld"):
            assert b[key] == pytest.approx(a[key], rel=0, abs=1e-5), key
    assert (cached_dir / "4-sft" / "model" / "model.safetensors").is_file()


def test_refusals_are_one_line(tmp_path, verbalized, cache8, student_verbalizers, tiny_overrides, tiny_config,
                               synth_dir):
    from vlsi.train.stages.interact import run_interact
    from vlsi.train.stages.verbalize import run_verbalize

    cache, student = cache8, student_verbalizers

    def refusal(cache_dir: Path, teacher: Path | None = None, **more) -> str:
        cfg = tiny_config(verbalized, **STEPS, **{"interaction.teacher_cache": str(cache_dir),
                                                  "interaction.teacher_cache_top_k": 8, **more})
        with pytest.raises(CacheError) as err:  # raised before any model is loaded
            run_interact(cfg, tmp_path / "interact", teacher_verbalizers=teacher or verbalized / "1-teacher-verbalize",
                         student_verbalizers=student)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "other data" in refusal(cache, **{"data.train": [str(synth_dir / "eval.json")]})
    assert "other data" in refusal(cache, **{"data.max_pixels": 56 * 56})  # image bounds
    assert "another K than this run (8 vs 4 asked)" in refusal(cache, **{"interaction.teacher_cache_top_k": 4})
    other = tmp_path / "other-teacher-verbalizers"  # one step: other verbalizers
    assert run_verbalize(tiny_config(verbalized, **{**STEPS, "training.max_steps": 1}), "teacher", other) == other
    assert "other teacher verbalizers" in refusal(cache, teacher=other)

    lacking = tmp_path / "lacking"
    shutil.copytree(cache, lacking)
    index = json.loads((lacking / "index-00.json").read_text())
    index["shards"][1]["samples"].pop()  # one sample of the data no longer in the cache
    (lacking / "index-00.json").write_text(json.dumps(index))
    assert "lacks 1 sample(s)" in refusal(lacking)

    missing = tmp_path / "missing"
    shutil.copytree(cache, missing)
    (missing / "shard-00-00002.safetensors").unlink()
    assert "shard-00-00002.safetensors is missing" in refusal(missing)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(cache, corrupt)
    shard = corrupt / "shard-00-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    opened = TeacherCache.open(corrupt)
    with pytest.raises(CacheError, match="corrupt"):
        opened.sample(next(k for k, (s, _) in opened.entries.items() if s["file"] == shard.name))
    with pytest.raises(VlsiError, match="not a teacher cache"):
        TeacherCache.open(tmp_path)


def _losses(step_dir: Path) -> list[list[float]]:
    """Step, loss and interaction-loss terms of each logged step of an interaction's metrics."""
    rows = [json.loads(line) for line in (step_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "interaction_loss", "last_layer_loss", "mean_kld", "matched_kld")
    return [[r[key] for key in keys] for r in rows if "interaction_loss" in r]


def test_with_a_complete_cache_interact_and_distill_need_no_teacher_weights(tmp_path, tiny_pair, tiny_overrides,
                                                                            set_args, run_cli, cli):
    """The teacher's *.safetensors removed after caching: `vlsi interact --teacher-cache` and
    `vlsi distill` run on its config.json and tokenizer, with the teacher's identity of before.
    (The verbalizers are trained and the refusals checked in this process.)"""
    from vlsi.train.identity import model_identity

    teacher, run, cache = tmp_path / "teacher", tmp_path / "run", tmp_path / "cache"
    shutil.copytree(tiny_pair("qwen2_vl").teacher, teacher)
    k = {"interaction.teacher_cache_top_k": 8}
    overrides = tiny_overrides(run, **STEPS, **k, teacher=str(teacher), **{"interaction.teacher_cache": str(cache)})
    for role in ("teacher", "student"):
        done = cli("verbalize", TINY_CONFIG, "--role", role, *set_args(overrides))
        assert done.returncode == 0, done.stderr[-3000:]
    made = run_cli("cache-teacher", str(TINY_CONFIG), *set_args(overrides), "--top-k", "8")
    assert made.returncode == 0, made.stderr[-3000:]
    identity = model_identity(teacher)
    for weights in teacher.glob("*.safetensors"):
        weights.unlink()

    alone = run_cli("interact", str(TINY_CONFIG), *set_args(tiny_overrides(run, **STEPS, **k, teacher=str(teacher))),
                    "--teacher-cache", str(cache), "--out", str(tmp_path / "interact"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "teacher: none loaded" in alone.stdout
    distill = run_cli("distill", str(TINY_CONFIG), *set_args(overrides), timeout=300)
    assert distill.returncode == 0, distill.stderr[-3000:]
    for step in ("teacher verbalization", "student verbalization", "teacher cache"):
        assert f"{step}: done, skipped" in distill.stdout, step
    assert (run / "4-sft" / "model" / "model.safetensors").is_file()
    for step_dir in (tmp_path / "interact", run / "3-interact"):
        assert json.loads((step_dir / "fingerprint.json").read_text())["inputs"]["teacher"] == identity
    assert _losses(run / "3-interact") == _losses(tmp_path / "interact")

    cache_manifest = json.loads((cache / MANIFEST).read_text())
    (cache / MANIFEST).write_text(json.dumps({**cache_manifest, "complete": False}))
    refused = cli("interact", TINY_CONFIG, *set_args(overrides), "--out", tmp_path / "again")
    assert refused.returncode == 2 and "no *.safetensors weights, and the teacher cache" in one_line(refused.stderr)

    (cache / MANIFEST).write_text(json.dumps(cache_manifest))
    shutil.rmtree(run / "1-teacher-verbalize")  # a step that runs the teacher: refused before anything runs
    refused = cli("distill", TINY_CONFIG, *set_args(overrides))
    assert refused.returncode == 2 and "which the unfinished teacher verbalization step needs" in one_line(refused.stderr)


def test_data_loader_workers_log_the_losses_of_the_training_process(tmp_path, verbalized, cache8, student_verbalizers,
                                                                     tiny_overrides, set_args, run_cli):
    """The cache read in 2 data-loader workers: the same logged losses as read by the training process."""
    cache, student = cache8, student_verbalizers
    overrides = tiny_overrides(verbalized, **STEPS, **{"interaction.teacher_cache_top_k": 8})
    logged = {}
    for workers in (0, 2):
        out = tmp_path / f"interact-{workers}"
        settings = {**overrides, "training.dataloader_num_workers": workers}
        done = run_cli("interact", str(TINY_CONFIG), *set_args(settings), "--teacher-cache", str(cache),
                       "--student-verbalizers", str(student), "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        logged[workers] = _losses(out)
    assert [row[0] for row in logged[2]] == [1, 2] and logged[2] == logged[0]


def _config_dir(root: Path, size: str) -> Path:
    """A checkpoint directory holding only the ``config.json`` of a published Qwen2-VL shape."""
    from vlsi.models.real_shapes import QWEN2_VL_TEXT, real_shape_config

    class _Ids:
        def convert_tokens_to_ids(self, token: str) -> int:
            return 0

    config = real_shape_config(size, _Ids(), num_layers=QWEN2_VL_TEXT[size]["num_hidden_layers"])
    config.dtype = "bfloat16"
    config.save_pretrained(root / size)
    return root / size


def test_a_multi_process_launch_shards_the_teacher_and_one_gpu_too_small_is_refused(tmp_path, monkeypatch):
    """The placement decision on a (faked) 80 GB GPU, sizes from the 72B config built on the meta device."""
    from types import SimpleNamespace

    import torch

    from vlsi.train.stages.cache_teacher import _placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 80 * 10**9))
    from vlsi.train.config import RunConfig
    from vlsi.train.resolved import resolve_run

    t72, t7 = (resolve_run(RunConfig(teacher=str(_config_dir(tmp_path, size)))) for size in ("72b", "7b"))
    layers = list(range(1, 79, 4))

    def launch(processes: int) -> SimpleNamespace:
        return SimpleNamespace(device=torch.device("cuda", 0), num_processes=processes)

    assert _placement(launch(8), t72, layers, bf16=True) == "shard"  # not .to(device) on every GPU
    assert _placement(launch(1), t7, list(range(1, 27, 4)), bf16=True) == "device"
    with pytest.raises(VlsiError, match=r"^cache-teacher: the teacher takes .* per GPU over 1 process\(es\) .* "
                                        r"this GPU's 80\.0 GB; it needs at least 3 processes") as err:
        _placement(launch(1), t72, layers, bf16=True)
    assert "\n" not in str(err.value)
    # on a CPU launch there is no per-GPU budget: several processes still shard
    cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=2)
    assert _placement(cpu, t72, layers, bf16=False) == "shard"


@pytest.mark.slow
def test_two_processes_shard_the_teacher_and_write_what_one_process_writes(tmp_path, verbalized, tiny_overrides,
                                                                          set_args, run_cli, cli_env):
    """``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo): the FSDP2-sharded teacher
    gives every sample the same top-K as the whole teacher in one process."""
    import subprocess
    import sys

    import torch

    overrides = set_args(tiny_overrides(verbalized, **STEPS))
    one, two = tmp_path / "one", tmp_path / "two"
    done = _cache(run_cli, set_args, tiny_overrides(verbalized, **STEPS), one, "--top-k", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "vlsi.cli", "cache-teacher", str(TINY_CONFIG),
               *overrides, "--out", str(two), "--top-k", "8"]
    proc = subprocess.run(command, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = TeacherCache.open(one), TeacherCache.open(two)
    assert json.loads((two / MANIFEST).read_text())["processes"] == 2 and set(a.entries) == set(b.entries)
    for key in a.entries:
        (ids_a, values_a, tail_a), (ids_b, values_b, tail_b) = a.sample(key), b.sample(key)
        assert torch.equal(ids_a, ids_b)
        torch.testing.assert_close(values_b, values_a, atol=1e-3, rtol=0)
        torch.testing.assert_close(tail_b, tail_a, atol=1e-3, rtol=0)
