"""vlsi.teacher_cache: id packing, sizes, manifest checks (no model)."""

import pytest
import torch

from vlsi.teacher_cache import (CacheError, bytes_per_token, check_manifest, id_bits, pack_ids, sample_key,
                                top_k_of, unpack_ids)


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
    from vlsi.stages.cache_teacher import refuse_nan

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
    from vlsi.stages.cache_teacher import refuse_nan

    logp = torch.log_softmax(torch.randn(2, 1, 10), dim=-1)
    logp[1, 0, 3] = float("nan")
    ids, values, tails = top_k_of(logp, 4)
    with pytest.raises(CacheError, match="sample 's1'"):
        refuse_nan(values, tails, [1, 1], ["s0", "s1"])
