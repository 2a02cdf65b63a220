"""Shared vocabulary and the tokenizer agreement check."""

import pytest

from vlsi.errors import VlsiError
from vlsi.method.vocab import check_tokenizers, shared_vocab_size
from vlsi.models.tiny import build_tiny_tokenizer


def test_shared_vocab_is_the_smaller_head():
    assert shared_vocab_size(152064, 151936) == 151936
    with pytest.raises(VlsiError):
        shared_vocab_size(0, 10)


def test_identical_tokenizers_pass_including_padding_ids():
    tok = build_tiny_tokenizer()
    check_tokenizers(tok, build_tiny_tokenizer(), len(tok) + 8)


def test_mismatch_names_first_ids_and_tokens():
    teacher = build_tiny_tokenizer(512)
    student = build_tiny_tokenizer(400)  # fewer merges: ids past 399 are missing
    with pytest.raises(VlsiError, match=r"differ on \d+ of the 512 shared ids \(first: id 400: teacher '.+' vs student None"):
        check_tokenizers(teacher, student, 512)
    check_tokenizers(teacher, student, 400)  # the common prefix agrees


def test_swapped_tokens_are_found():
    teacher, student = build_tiny_tokenizer(), build_tiny_tokenizer()
    a, b = student.convert_ids_to_tokens([300, 301])

    class Swapped:
        def __len__(self):
            return len(student)

        def convert_ids_to_tokens(self, ids):
            m = {300: b, 301: a}
            return [m.get(i, t) for i, t in zip(ids, student.convert_ids_to_tokens(ids))]

    with pytest.raises(VlsiError, match=r"differ on 2 of .* id 300"):
        check_tokenizers(teacher, Swapped(), len(teacher))
