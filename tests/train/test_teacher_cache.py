"""vlsi.train.teacher_cache: id packing, sizes, manifest checks (no model)."""

import pytest
import torch

from vlsi.train.teacher_cache import (FORMAT, MANIFEST, CacheError, KeyedCollator, ShardWriter, TeacherCache,
                                      bytes_per_token, check_manifest, id_bits, item_key, pack_ids, sample_key, top_k_of,
                                      unpack_ids)


@pytest.mark.parametrize("vocab", [2, 536, 151936, 152064])
def test_ids_round_trip_at_the_bits_the_vocabulary_needs(vocab):
    bits = id_bits(vocab)
    assert 2 ** bits >= vocab > 2 ** (bits - 1) or vocab == 2
    ids = torch.randint(0, vocab, (7, 3, 5), generator=torch.Generator().manual_seed(vocab))
    ids[0, 0, 0] = vocab - 1
    packed = pack_ids(ids, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-ids.numel() * bits // 8)
    assert torch.equal(unpack_ids(packed, bits, ids.numel()).reshape(ids.shape), ids)


def test_bytes_per_token_at_the_real_vocabulary():
    assert id_bits(151936) == 18
    # 21 layers x (32 ids x 18 bits + 32 float16 + a float32 tail)
    assert bytes_per_token(32, 21, 151936) == 21 * (32 * 18 / 8 + 32 * 2 + 4) < 6000


def test_top_k_tail_is_the_rest_of_the_mass():
    logp = torch.log_softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    ids, values, tail = top_k_of(logp, 8)
    assert torch.equal(values, logp.gather(1, ids))
    torch.testing.assert_close(tail + values.exp().sum(-1), torch.ones(4))
    assert torch.all(top_k_of(logp, 50)[2] < 1e-6)


def test_sample_key_depends_on_id_tokens_and_labels():
    base = sample_key("a", [1, 2, 3], [-100, 2, 3], [4])
    assert base == sample_key("a", torch.tensor([1, 2, 3]), [-100, 2, 3], [4])
    assert len({base, sample_key("b", [1, 2, 3], [-100, 2, 3], [4]), sample_key("a", [1, 2, 4], [-100, 2, 3], [4]),
                sample_key("a", [1, 2, 3], [-100, -100, 3], [4]), sample_key("a", [1, 2, 3], [-100, 2, 3], [5])}) == 5


@pytest.mark.parametrize("field, words", [("data", "other data"), ("preprocessing", "another tokenizer"),
                                          ("teacher", "another teacher"), ("teacher_verbalizers", "other teacher verbalizers"),
                                          ("layers", "other teacher target layers"), ("top_k", "another K"),
                                          ("vocab_size", "another shared vocabulary")])
def test_each_manifest_field_is_checked(tmp_path, field, words):
    manifest = {"data": {"train": {"a": "1"}}, "preprocessing": "p", "teacher": {"config": "c"},
                "teacher_verbalizers": "step:x", "layers": [1, 5], "top_k": 32, "vocab_size": 536}
    check_manifest(manifest, dict(manifest), tmp_path)
    other = {**manifest, field: "something else"}
    with pytest.raises(CacheError, match=words) as err:
        check_manifest(manifest, other, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [262144, 300000, -1])
def test_pack_ids_refuses_ids_outside_its_bits(bad):
    with pytest.raises(CacheError, match=r"must be in \[0, 262144\)"):
        pack_ids(torch.tensor([5, bad, 7]), 18)


def test_nan_teacher_log_probs_are_refused_naming_the_sample():
    from vlsi.train.stages.cache_teacher import refuse_nan

    values, tails = torch.randn(7, 3, 4), torch.rand(7, 3)  # samples of 2, 3 and 2 tokens
    refuse_nan(values, tails, [2, 3, 2], ["a", "b", "c"])  # finite: nothing to refuse
    values[3, 1, 0] = float("nan")
    with pytest.raises(CacheError, match=r"sample 'b'.*NaN at response token 1"):
        refuse_nan(values, tails, [2, 3, 2], ["a", "b", "c"])
    values[3, 1, 0], tails[6, 2] = 0.0, float("nan")
    with pytest.raises(CacheError, match=r"sample 'c'.*token 1"):
        refuse_nan(values, tails, [2, 3, 2], ["a", "b", "c"])


def test_top_k_of_nan_logits_is_refused_before_storage():
    """``topk`` ranks NaN first: the NaN reaches the stored values, where refuse_nan sees it."""
    from vlsi.train.stages.cache_teacher import refuse_nan

    logp = torch.log_softmax(torch.randn(2, 1, 10), dim=-1)
    logp[1, 0, 3] = float("nan")
    ids, values, tails = top_k_of(logp, 4)
    with pytest.raises(CacheError, match="sample 's1'"):
        refuse_nan(values, tails, [1, 1], ["s0", "s1"])


def _cache_of(root, tokens: list[int], k: int = 4, vocab: int = 50):
    """A cache of one sample per entry of ``tokens`` (response tokens), written with
    :class:`ShardWriter` (2 samples a shard); returns the items and their stored tensors."""
    from vlsi.files import write_json_atomic

    root.mkdir()
    bits = id_bits(vocab)
    write_json_atomic(root / MANIFEST, {"format": FORMAT, "layers": [1, 5], "top_k": k, "id_bits": bits,
                                        "processes": 1, "complete": True})
    writer, g = ShardWriter(root, 0, bits, "float16", samples_per_shard=2), torch.Generator().manual_seed(0)
    items, stored = [], {}
    for n, count in enumerate(tokens):
        item = {"id": f"s{n}", "input_ids": list(range(count + 3)), "labels": [-100, -100] + [7] * count + [-100]}
        ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(count * 3)]).reshape(count, 3, k)
        logp, tail = torch.randn(count, 3, k, generator=g), torch.rand(count, 3, generator=g)
        writer.add(item_key(item), ids, logp, tail)
        items.append(item)
        stored[item_key(item)] = (ids, logp.half(), tail)
    writer.flush()
    return items, stored


def _pad_labels(items):
    width = max(len(it["labels"]) for it in items)
    return {"labels": torch.tensor([it["labels"] + [-100] * (width - len(it["labels"])) for it in items])}


def test_the_collator_reads_the_batch_teacher_from_the_cache(tmp_path):
    """KeyedCollator returns the cached top-K of its samples, in batch order, concatenated over
    their response tokens; the same in data-loader workers."""
    from torch.utils.data import DataLoader

    items, stored = _cache_of(tmp_path / "cache", [3, 1, 4, 2, 5])
    cache = TeacherCache.open(tmp_path / "cache")
    collator = KeyedCollator(_pad_labels, cache)
    batch = collator([items[2], items[0]])
    for n, name in enumerate(("ids", "logp", "tail")):
        # what TeacherCache.batch gave the loss before: the samples' [L, T, ...] joined on T
        want = torch.cat([stored[item_key(items[i])][n].transpose(0, 1) for i in (2, 0)], dim=1)
        assert batch[f"teacher_{name}"].dtype == want.dtype and torch.equal(batch[f"teacher_{name}"], want), name
    assert batch["teacher_ids"].shape == (3, 7, 4) and batch["teacher_tail"].shape == (3, 7)

    def load(workers: int) -> list[dict]:
        collator = KeyedCollator(_pad_labels, TeacherCache.open(tmp_path / "cache"))
        return list(DataLoader(items, batch_size=2, collate_fn=collator, num_workers=workers))

    in_process, in_workers = load(0), load(2)
    assert len(in_workers) == 3
    for a, b in zip(in_process, in_workers):
        assert a["sample_keys"] == b["sample_keys"]
        assert all(torch.equal(a[f"teacher_{n}"], b[f"teacher_{n}"]) for n in ("ids", "logp", "tail"))


def test_a_corrupt_shard_is_caught_in_a_worker_as_one_line(tmp_path):
    from torch.utils.data import DataLoader

    items, _ = _cache_of(tmp_path / "cache", [2, 2, 2])
    shard = tmp_path / "cache" / "shard-00-00001.safetensors"  # the third sample
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    collator = KeyedCollator(_pad_labels, TeacherCache.open(tmp_path / "cache"))
    batches = list(DataLoader(items, batch_size=1, collate_fn=collator, num_workers=2))
    assert [("teacher_error" in b) for b in batches] == [False, False, True]
    assert "shard-00-00001.safetensors is corrupt" in batches[2]["teacher_error"]
    assert "\n" not in batches[2]["teacher_error"]


def test_cache_complete_is_false_for_a_missing_or_malformed_manifest(tmp_path):
    from vlsi.train.teacher_cache import MANIFEST, cache_complete

    assert not cache_complete(tmp_path / "no-cache-here")
    (tmp_path / MANIFEST).write_text("[1, 2]")
    assert not cache_complete(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    assert not cache_complete(tmp_path)
    (tmp_path / MANIFEST).write_text('{"complete": true}')
    assert cache_complete(tmp_path)
