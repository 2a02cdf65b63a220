"""An offline cache of the teacher's verbalized distributions: top-K per layer and token.

Everything on the teacher's side of the interaction step is frozen, so its verbalized
distribution ``P_j`` at every target layer ``j`` (and at its last layer) is fixed by the data.
``vlsi cache-teacher`` (:mod:`vlsi.train.stages.cache_teacher`) stores, for every response token of
every sample, the ``K`` largest log-probabilities of each of the ``t_l + 1`` layers over the
shared vocabulary, their ids, and the probability of all other ids (the tail); the interaction
step then reads them (:class:`vlsi.method.interaction.SparseTeacher`) and loads no teacher.

Layout of a cache directory::

    manifest.json               what the cache was made from
                                (:func:`vlsi.train.stages.cache_teacher.expected_manifest`)
    shard-R-NNNNN.safetensors   samples of process R, in the data's order
    index-R.json                process R's finished shards: samples, tokens, bytes, sha256

Per sample ``key`` a shard holds ``key.ids`` (uint8: the ids of ``[T, t_l + 1, K]`` packed to
:func:`id_bits` bits each), ``key.logp`` (``[T, t_l + 1, K]`` float16, or float32) and
``key.tail`` (``[T, t_l + 1]`` float32). A shard is written to a temporary name and renamed,
then recorded in its index (also written atomically), so a killed run leaves only finished
shards; the rerun starts at its first unfinished one and, the data order being fixed, writes
the same files. Samples are keyed by :func:`sample_key`, a digest of their id and encoded
tokens, so the interaction step finds them whatever its order, batching or epochs.

Checks on opening (:meth:`TeacherCache.open`), each failure one line: the manifest against what
the run would make (data files and their hashes, max length and image bounds, the tokenizer and
preprocessing files, teacher, teacher verbalizers and layers, K, shared vocabulary); every
shard present at its recorded size; every sample of the data present. A shard's sha256 is
checked the first time a process reads it (each data-loader worker checks the shards it reads).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from vlsi.errors import VlsiError
from vlsi.files import read_json, sha256_file, write_json_atomic
from vlsi.method.verbalizer import prediction_positions

FORMAT = "vlsi-teacher-cache/1"
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CacheError(VlsiError):
    """A teacher cache that does not fit the run, or is incomplete or corrupt."""


def id_bits(vocab_size: int) -> int:
    """Bits per stored id: 18 for a 151,936-token vocabulary."""
    return max(1, (vocab_size - 1).bit_length())


def pack_ids(ids: Tensor, bits: int) -> Tensor:
    """Ids in ``[0, 2**bits)`` (any shape) packed little-endian into ``ceil(n bits / 8)`` uint8.

    Raises:
        CacheError: an id outside that range (it would come back as another id).
    """
    flat = ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise CacheError(f"ids must be in [0, {1 << bits}) to be stored in {bits} bits, got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    planes = ((flat.unsqueeze(1) >> torch.arange(bits)) & 1).to(torch.uint8).reshape(-1)
    pad = (-planes.numel()) % 8
    planes = torch.cat([planes, planes.new_zeros(pad)]).reshape(-1, 8)
    return (planes << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_ids(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_ids`: ``count`` int64 ids."""
    planes = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: count * bits]
    return (planes.reshape(count, bits).to(torch.int64) << torch.arange(bits)).sum(dim=1)


def sample_key(sample_id: str, input_ids: Any, labels: Any, num_image_tokens: Any = ()) -> str:
    """A sample's key: digest of its id, compact ``input_ids``, ``labels`` and image-token counts."""
    digest = hashlib.sha256(str(sample_id).encode() + b"\0")
    for name, value in (("input_ids", input_ids), ("labels", labels), ("num_image_tokens", num_image_tokens)):
        digest.update(name.encode() + torch.as_tensor(value, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:32]


def item_key(item: dict[str, Any]) -> str:
    """:func:`sample_key` of a dataset item (:class:`vlsi.data.VisualInstructionDataset`)."""
    return sample_key(item["id"], item["input_ids"], item["labels"], item.get("num_image_tokens", ()))


class KeyedCollator:
    """A collator that also passes each sample's :func:`item_key` (``batch["sample_keys"]``) and,
    given a cache, the micro-batch's teacher read from it (:meth:`TeacherCache.lookup`):
    ``teacher_ids``/``teacher_logp`` ``[t_l + 1, N, K]`` and ``teacher_tail`` ``[t_l + 1, N]``, N
    the batch's response tokens in batch order. It runs where the batch is collated (the
    data-loader workers, if any), so the training loop only copies the tensors to the device.
    A cache error there is passed on as ``batch["teacher_error"]``, raised by the training loop as
    one line (a worker's exception would come back wrapped in its traceback)."""

    def __init__(self, collator: Any, cache: TeacherCache | None = None):
        self.collator, self.cache = collator, cache

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {**self.collator(items), "sample_keys": [item_key(it) for it in items]}
        if self.cache is None:
            return batch

        tokens = prediction_positions(batch["labels"]).sum(dim=1).tolist()
        try:
            ids, logp, tail = self.cache.lookup(batch["sample_keys"], tokens)
        except CacheError as err:
            return {**batch, "teacher_error": str(err)}
        return {**batch, "teacher_ids": ids, "teacher_logp": logp, "teacher_tail": tail}


def bytes_per_token(k: int, layers: int, vocab_size: int, dtype: str = "float16") -> float:
    """Stored bytes per response token: ids, log-probabilities and tails of ``layers`` layers."""
    value = torch.finfo(STORAGE_DTYPES[dtype]).bits // 8
    return layers * (k * id_bits(vocab_size) / 8 + k * value + 4)


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:02d}-{index:05d}.safetensors"


def index_name(rank: int) -> str:
    return f"index-{rank:02d}.json"


@dataclass
class SampleEntry:
    key: str
    tokens: int


def top_k_of(logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` of log-probabilities ``[..., V]``: ids, values and tail mass ``[...]`` (float32).

    The tail is summed from the other ids themselves (a log-sum-exp with the top ``k`` masked),
    not as ``1 - sum(top k)``, which cancels: it is exactly 0 when ``k = V``."""
    logp = logp.float()
    values, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1).exp()
    return ids, values, tail


class ShardWriter:
    """Writes one process's shards in order; resumes after its last finished shard.

    Args:
        root: the cache directory (manifest already written).
        rank: this process's number (its shards and index are its own).
        bits, dtype: id bits and the storage dtype of the log-probabilities.
        samples_per_shard: samples in a shard before it is closed.
    """

    def __init__(self, root: Path, rank: int, bits: int, dtype: str, samples_per_shard: int):
        self.root, self.rank, self.bits = root, rank, bits
        self.dtype = STORAGE_DTYPES[dtype]
        self.samples_per_shard = samples_per_shard
        path = root / index_name(rank)
        self.shards: list[dict[str, Any]] = read_json(path)["shards"] if path.is_file() else []
        self.done = sum(len(s["samples"]) for s in self.shards)  # samples already cached
        self._pending: dict[str, Tensor] = {}
        self._samples: list[list[Any]] = []
        self.bytes_written = sum(s["bytes"] for s in self.shards)

    def add(self, key: str, ids: Tensor, logp: Tensor, tail: Tensor) -> None:
        """One sample: ``ids``/``logp`` ``[T, L, K]``, ``tail`` ``[T, L]``."""
        self._pending[f"{key}.ids"] = pack_ids(ids, self.bits)
        self._pending[f"{key}.logp"] = logp.to(self.dtype).contiguous()
        self._pending[f"{key}.tail"] = tail.float().contiguous()
        self._samples.append([key, int(ids.shape[0])])
        if len(self._samples) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        """Close the current shard: write it atomically, then record it in the index."""
        from safetensors.torch import save_file

        if not self._samples:
            return
        name = shard_name(self.rank, len(self.shards))
        final, partial = self.root / name, self.root / (name + ".partial")
        save_file(self._pending, str(partial))
        partial.replace(final)
        self.shards.append({"file": name, "samples": self._samples, "bytes": final.stat().st_size,
                            "sha256": sha256_file(final)})
        write_json_atomic(self.root / index_name(self.rank), {"format": FORMAT, "shards": self.shards})
        self.done += len(self._samples)
        self.bytes_written += final.stat().st_size
        self._pending, self._samples = {}, []


def cache_complete(root: Path) -> bool:
    """Whether ``root`` holds a teacher cache marked complete."""
    try:
        return bool(read_json(Path(root) / MANIFEST).get("complete"))
    except (VlsiError, AttributeError):  # missing or unreadable manifest, or not an object
        return False


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root}: not a teacher cache (no {MANIFEST}; make one with `vlsi cache-teacher CONFIG`)")
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, OSError) as err:
        raise CacheError(f"{path}: unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    return manifest


# Manifest fields checked against the run, with the words of their refusal.
_CHECKED = (("data", "other data (files, their hashes, max_length, image bounds)"),
            ("preprocessing", "another tokenizer or image processor"),
            ("teacher", "another teacher"),
            ("teacher_verbalizers", "other teacher verbalizers"),
            ("layers", "other teacher target layers"),
            ("vocab_size", "another shared vocabulary"),
            ("top_k", "another K"))


def check_manifest(manifest: dict[str, Any], expected: dict[str, Any], root: Path) -> None:
    """One line for the first field where the cache was made from something else than the run."""
    for field_name, words in _CHECKED:
        if field_name in expected and manifest.get(field_name) != expected[field_name]:
            have, want = manifest.get(field_name), expected[field_name]
            detail = f" ({have} vs {want} asked)" if field_name in ("top_k", "layers", "vocab_size") else ""
            raise CacheError(f"teacher cache {root} was made from {words} than this run{detail}; "
                             "rebuild it with `vlsi cache-teacher`")


class TeacherCache:
    """Read side: sample lookup across shards, loaded lazily, each shard checked once."""

    def __init__(self, root: Path, manifest: dict[str, Any], entries: dict[str, tuple[dict, int]]):
        self.root, self.manifest = root, manifest
        self.entries = entries  # key -> (shard record, tokens)
        self.bits = int(manifest["id_bits"])
        self.layers = len(manifest["layers"]) + 1
        self.k = int(manifest["top_k"])
        self._verified: set[str] = set()

    @classmethod
    def open(cls, root: str | Path, expected: dict[str, Any] | None = None) -> TeacherCache:
        """Open and check a finished cache (see the module docstring for the checks)."""
        root = Path(root)
        manifest = read_manifest(root)
        if expected is not None:
            check_manifest(manifest, expected, root)
        if not manifest.get("complete"):
            raise CacheError(f"teacher cache {root} is unfinished (rerun `vlsi cache-teacher` to complete it)")
        entries: dict[str, tuple[dict, int]] = {}
        for rank in range(int(manifest["processes"])):
            path = root / index_name(rank)
            if not path.is_file():
                raise CacheError(f"teacher cache {root}: {path.name} is missing")
            for shard in read_json(path)["shards"]:
                file = root / shard["file"]
                if not file.is_file() or file.stat().st_size != shard["bytes"]:
                    state = "missing" if not file.is_file() else f"{file.stat().st_size} bytes, not {shard['bytes']}"
                    raise CacheError(f"teacher cache {root}: shard {shard['file']} is {state}")
                for key, tokens in shard["samples"]:
                    entries[key] = (shard, int(tokens))
        return cls(root, manifest, entries)

    def check_samples(self, keys: Iterable[str], ids: Iterable[str]) -> None:
        """Every sample of the run's data is in the cache (one line naming the first missing)."""
        missing = [sample_id for key, sample_id in zip(keys, ids) if key not in self.entries]
        if missing:
            raise CacheError(f"teacher cache {self.root} lacks {len(missing)} sample(s) of this run's data, "
                             f"e.g. {missing[0]!r}; rebuild it with `vlsi cache-teacher`")

    def _verify(self, shard: dict[str, Any]) -> None:
        if shard["file"] in self._verified:
            return
        if sha256_file(self.root / shard["file"]) != shard["sha256"]:
            raise CacheError(f"teacher cache {self.root}: shard {shard['file']} is corrupt (sha256 mismatch)")
        self._verified.add(shard["file"])

    def sample(self, key: str) -> tuple[Tensor, Tensor, Tensor]:
        """One sample's ids ``[L, T, K]`` (int64), log-probabilities ``[L, T, K]`` and tail ``[L, T]``.

        The shard is opened here, in the calling process (a data-loader worker has its own
        handles), and its sha256 checked the first time this process reads it."""
        from safetensors import safe_open

        if key not in self.entries:
            raise CacheError(f"teacher cache {self.root} has no sample {key}")
        shard, tokens = self.entries[key]
        self._verify(shard)
        with safe_open(str(self.root / shard["file"]), framework="pt") as f:
            packed, logp, tail = f.get_tensor(f"{key}.ids"), f.get_tensor(f"{key}.logp"), f.get_tensor(f"{key}.tail")
        ids = unpack_ids(packed, self.bits, tokens * self.layers * self.k).reshape(tokens, self.layers, self.k)
        return ids.transpose(0, 1), logp.transpose(0, 1), tail.transpose(0, 1)

    def lookup(self, keys: list[str], tokens: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """A micro-batch's samples in batch order, each with ``tokens[b]`` response tokens
        (checked against the cache), concatenated: ids ``[L, N, K]`` (int64), log-probabilities
        ``[L, N, K]`` and tail ``[L, N]``, N = ``sum(tokens)``, in CPU memory."""
        parts = []
        for key, count in zip(keys, tokens):
            ids, logp, tail = self.sample(key)
            if ids.shape[1] != count:
                raise CacheError(f"teacher cache {self.root}: sample {key} has {ids.shape[1]} response tokens "
                                 f"cached but {count} in this batch (other data or tokenizer)")
            parts.append((ids, logp, tail))
        return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))
