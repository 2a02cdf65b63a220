"""``vlsi cache-teacher``: run the frozen teacher and its verbalizers over the data once.

    vlsi cache-teacher CONFIG [--teacher-verbalizers DIR] [--out DIR] [--top-k K]

Writes a :mod:`vlsi.train.teacher_cache` directory: for every response token of every training
sample, the top-K log-probabilities (and ids, and the tail mass) of each teacher target layer's
verbalized distribution and of the teacher's own last layer, over the shared vocabulary. The
interaction step reads it with ``--teacher-cache DIR`` (``interaction.teacher_cache``) and
loads no teacher. Samples are encoded exactly as the interaction step encodes them (the
student's tokenizer and image processor, ``data`` settings); the teacher runs in the dtype the
interaction step would give it (bf16 where the GPU has it, else the checkpoint's).

Under ``accelerate launch`` / ``torchrun`` each process takes every N-th sample and writes its
own shards and index; the main process writes the manifest and marks the cache complete when
all are done. Rerunning after a kill continues after the last finished shard.

Where the teacher lives (:func:`teacher_placement`): one process holds it whole on its device
(refused, before loading, on a GPU too small for it); several processes shard it with FSDP2
(:func:`vlsi.train.distributed.shard_frozen_model`), whatever the launch's config names (no Trainer
runs here): each GPU holds 1/N of the weights and the verbalizers whole, every process runs the
same number of forwards (the gathers are collectives; a process out of samples repeats one and
writes nothing). Under a DDP or DeepSpeed launch every process reads the whole checkpoint into
CPU memory before sharding; with ``accelerate_configs/fsdp.yaml`` (``cpu_ram_efficient_loading``)
only the first does.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlsi.errors import VlsiError
from vlsi.files import read_json, write_json_atomic
from vlsi.method.verbalizer import capture_hidden_states, capture_layer_context, prediction_positions
from vlsi.models.backbones import load_backbone
from vlsi.train.config import RunConfig
from vlsi.train.distributed import fsdp_whole, load_verbalizers, shard_frozen_model
from vlsi.train.fingerprint import directory_identity
from vlsi.train.plan import USABLE_FRACTION, gb
from vlsi.train.preflight import Preflight, check_run
from vlsi.train.resolved import ResolvedRun, resolve_run
from vlsi.train.stages.arguments import bf16_available
from vlsi.train.stages.training_data import load_training_data
from vlsi.train.teacher_cache import (FORMAT, MANIFEST, STORAGE_DTYPES, CacheError, ShardWriter, check_manifest, id_bits,
                                      item_key, top_k_of)
from vlsi.train.testing_hooks import kill_if_asked

SAMPLES_PER_SHARD = 256


def teacher_placement(processes: int, weight_bytes: int, verbalizer_bytes: int, gpu_bytes: int | None) -> str:
    """``"shard"`` (FSDP2 over several processes) or ``"device"`` (one process, whole teacher).

    ``weight_bytes``: the teacher's weights as loaded; ``verbalizer_bytes``: its verbalizers,
    whole on every process; ``gpu_bytes``: one GPU's memory, ``None`` on a CPU (no budget).

    Raises:
        VlsiError: the weights' share plus the verbalizers exceed ``USABLE_FRACTION`` of a GPU.
    """
    placement = "shard" if processes > 1 else "device"
    per_gpu = weight_bytes // processes + verbalizer_bytes
    if gpu_bytes is None or per_gpu <= USABLE_FRACTION * gpu_bytes:
        return placement
    usable = USABLE_FRACTION * gpu_bytes - verbalizer_bytes
    need = f"at least {-(-weight_bytes // int(usable))} processes" if usable > 0 else "GPUs with more memory"
    raise VlsiError(f"cache-teacher: the teacher takes {gb(per_gpu)} per GPU over {processes} process(es) "
                    f"(weights {gb(weight_bytes)} / {processes} + verbalizers {gb(verbalizer_bytes)}), more than the "
                    f"{gb(USABLE_FRACTION * gpu_bytes)} usable of this GPU's {gb(gpu_bytes)}; it needs {need} "
                    f"(accelerate launch --num_processes N -m vlsi.cli cache-teacher ...)")


def _placement(state: Any, run: ResolvedRun, layers: list[int], bf16: bool) -> str:
    """:func:`teacher_placement` for this launch; the sizes from the teacher's config (CUDA only)."""
    if state.device.type != "cuda":
        return teacher_placement(state.num_processes, 0, 0, None)
    shape = run.plan_shape("teacher", layers)
    per = 2 if bf16 else shape.weight_bytes
    return teacher_placement(state.num_processes, shape.parameters * per,
                             3 * shape.hidden_size**2 * len(layers) * per, torch.cuda.mem_get_info(state.device)[1])


def _rounds(batches: int, state: Any) -> int:
    """The most batches any process has left: every process runs that many sharded forwards."""
    count = torch.tensor([batches], device=state.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def expected_manifest(run: RunConfig | ResolvedRun, teacher_verbalizers: str | Path, top_k: int | None, vocab: int,
                      layers: list[int]) -> dict[str, Any]:
    """What a cache made for ``run`` records; ``top_k=None`` leaves K unchecked."""
    run = resolve_run(run)
    expected = {"data": run.data_identity, "preprocessing": run.preprocessing, "teacher": run.teacher_identity,
                "teacher_verbalizers": directory_identity(teacher_verbalizers), "layers": list(layers),
                "vocab_size": vocab}
    if top_k is not None:
        expected["top_k"] = top_k
    return expected


def _prepare(root: Path, expected: dict[str, Any], storage: str, processes: int, is_main: bool,
             teacher_parameters: int) -> dict[str, Any]:
    """The manifest of ``root``: an existing one must match this run; else (main) it is written,
    with the teacher's size (pre-flight reads it where the teacher's weights are absent)."""
    path = root / MANIFEST
    if path.is_file():
        manifest = read_json(path)
        check_manifest(manifest, expected, root)
        if manifest["storage"] != storage or manifest["processes"] != processes:
            raise CacheError(f"{root} holds a cache written as {manifest['storage']} by {manifest['processes']} "
                             f"process(es); rerun it the same way or use another --out")
        return manifest
    manifest = {"format": FORMAT, **expected, "teacher_parameters": teacher_parameters, "storage": storage,
                "id_bits": id_bits(expected["vocab_size"]), "processes": processes, "complete": False}
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, manifest)
    return manifest


@torch.no_grad()
def _layer_top_k(t_stack: torch.Tensor, t_fn: Any, vocab: int, k: int, chunk: int):
    """Top-K of every layer's log-probabilities: ids/values ``[N, L, K]``, tail ``[N, L]``."""
    ids, values, tails = [], [], []
    for j in range(t_stack.shape[0]):
        parts = [top_k_of(torch.log_softmax(t_fn(j, t_stack[j, a:a + chunk])[:, :vocab].float(), dim=-1), k)
                 for a in range(0, t_stack.shape[1], chunk)]
        ids.append(torch.cat([p[0] for p in parts]))
        values.append(torch.cat([p[1] for p in parts]))
        tails.append(torch.cat([p[2] for p in parts]))
    return torch.stack(ids, 1).cpu(), torch.stack(values, 1).cpu(), torch.stack(tails, 1).cpu()


def refuse_nan(values: torch.Tensor, tails: torch.Tensor, counts: list[int], sample_ids: list[str]) -> None:
    """Refuse a batch whose teacher log-probabilities are NaN, naming the first such sample.

    Args:
        values: ``[N, L, K]`` top-K log-probabilities of the batch's response tokens, sample
            after sample (``counts[s]`` tokens each); tails: ``[N, L]``.
    """
    bad = torch.isnan(values).flatten(1).any(dim=1) | torch.isnan(tails).any(dim=1)
    if not bool(bad.any()):
        return
    token = int(bad.nonzero()[0])
    offset = 0
    for sample_id, count in zip(sample_ids, counts):
        if token < offset + count:
            raise CacheError(f"sample {sample_id!r}: the teacher's verbalized log-probabilities are NaN at "
                             f"response token {token - offset}; nothing was cached for it (check the teacher "
                             "and its verbalizers)")
        offset += count


def run_cache_teacher(run: RunConfig | ResolvedRun, out_dir: str | Path, *, teacher_verbalizers: str | Path,
                      top_k: int | None = None, storage: str = "float16",
                      samples_per_shard: int = SAMPLES_PER_SHARD, preflight: Preflight | None = None) -> Path:
    """Write (or finish) the teacher cache of the run's training data into ``out_dir``; ``run``:
    a :class:`~vlsi.train.config.RunConfig` is resolved here (:func:`vlsi.train.resolved.resolve_run`);
    ``top_k``: default ``interaction.teacher_cache_top_k``."""
    from accelerate import PartialState

    if storage not in STORAGE_DTYPES:
        raise CacheError(f"unknown cache storage {storage!r}; supported: {', '.join(STORAGE_DTYPES)}")
    run = resolve_run(run)
    cfg = run.cfg
    top_k = cfg.interaction.teacher_cache_top_k if top_k is None else top_k
    root = Path(out_dir)
    pre = preflight or check_run(run, ("interact",), teacher_verbalizers=Path(teacher_verbalizers), memory=False)
    if top_k < 1 or top_k > pre.vocab:
        raise CacheError(f"--top-k must be in [1, {pre.vocab}] (the shared vocabulary), got {top_k}")
    state = PartialState()
    teacher_dir, student_dir = run.teacher_dir, run.student_dir
    layers = pre.teacher.target_layers
    expected = expected_manifest(run, teacher_verbalizers, top_k, pre.vocab, layers)
    manifest = _prepare(root, expected, storage, state.num_processes, state.is_main_process,
                        pre.teacher.parameters)
    if manifest.get("complete"):
        if state.is_main_process:
            print(f"cache-teacher: {root} is complete", flush=True)
        return root
    if not any(teacher_dir.glob("*.safetensors")):
        raise CacheError(f"{teacher_dir}: no *.safetensors weights; the teacher must run to make the cache {root}")
    state.wait_for_everyone()

    tcfg = cfg.stage("interact")
    bf16 = bf16_available() if tcfg.bf16 == "auto" else bool(tcfg.bf16)
    placement = _placement(state, run, layers, bf16)
    if placement == "shard":
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # a ZeRO-3 launch would partition the teacher as it loads
    teacher = load_backbone(teacher_dir, dtype=torch.bfloat16 if bf16 else None,
                            attn_implementation=cfg.attn_implementation)
    teacher.model.requires_grad_(False).eval()
    verbalizers = load_verbalizers(teacher_verbalizers, teacher).requires_grad_(False).eval()
    if placement == "shard":
        teacher_model = shard_frozen_model(teacher.model, state.device)
    else:
        teacher_model = teacher.model.to(state.device)
    verbalizers.to(state.device)

    def whole_heads():  # the final norm and LM head the verbalized logits use, gathered if sharded
        if placement == "shard":
            return fsdp_whole((teacher_model,), [teacher.final_norm, teacher.lm_head])
        return contextlib.nullcontext()

    dataset, collator, _ = load_training_data(cfg.data, student_dir)
    mine = list(range(state.process_index, len(dataset), state.num_processes))
    writer = ShardWriter(root, state.process_index, manifest["id_bits"], storage, samples_per_shard)
    todo = mine[writer.done:]
    batch_size = tcfg.per_device_train_batch_size
    batches = [todo[first:first + batch_size] for first in range(0, len(todo), batch_size)]
    rounds = _rounds(len(batches), state) if placement == "shard" else len(batches)
    progress = tqdm(total=len(mine), initial=writer.done, desc=f"cache-teacher [{state.process_index}]",
                    unit="sample", disable=not state.is_local_main_process)
    start, tokens, added = time.perf_counter(), 0, 0
    for round_ in range(rounds):
        repeat = round_ >= len(batches)  # this process is done: keep the collectives in step
        items = [dataset[i] for i in ((mine[:1] or [0]) if repeat else batches[round_])]
        batch = {k: v.to(state.device) if torch.is_tensor(v) else v for k, v in collator(items).items()}
        positions = prediction_positions(batch["labels"])
        with torch.no_grad(), capture_layer_context(teacher) as context, \
                capture_hidden_states(teacher, verbalizers.layers) as states:
            teacher_model(**teacher.model_inputs(batch), use_cache=False, logits_to_keep=1)
            t_stack, t_fn = verbalizers.response_inputs(states, positions, context, transformed=True)
        with whole_heads():
            ids, values, tails = _layer_top_k(t_stack, t_fn, pre.vocab, top_k, cfg.interaction.chunk_size)
        if repeat:
            continue
        counts = positions.sum(dim=1).tolist()
        refuse_nan(values, tails, counts, [item["id"] for item in items])
        offset = 0
        for item, count in zip(items, counts):
            writer.add(item_key(item), ids[offset:offset + count], values[offset:offset + count],
                       tails[offset:offset + count])
            offset += count
            added += 1
            kill_if_asked(f"cache-teacher:samples:{added}")
        tokens += sum(counts)
        progress.update(len(items))
        progress.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.1f}",
                             written=f"{writer.bytes_written / 2**20:.1f} MiB")
    writer.flush()
    progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_json_atomic(root / MANIFEST, {**manifest, "complete": True, "samples": len(dataset)})
        print(f"cache-teacher: {len(dataset)} samples, K={top_k}, {len(layers) + 1} layers -> {root}", flush=True)
    state.wait_for_everyone()
    return root
