"""The pieces of on-policy interaction on fabricated batches: draws, prompts, responses, the log."""

import json

import pytest
import torch

from vlsi.method.on_policy import (GenerationLog, cut_at_end, generation_seed, longest_response, on_policy_batch,
                                   on_policy_draw, prompt_batch, prompt_lengths)

I = -100  # IGNORE_INDEX
PAD = 0


def batch():
    """Two right-padded samples; the second has two turns (an earlier answer 7 8 stays context)."""
    return {
        "input_ids": torch.tensor([[11, 12, 13, 21, 22, PAD, PAD, PAD],
                                   [11, 12, 7, 8, 14, 15, 31, 32]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]),
        "labels": torch.tensor([[I, I, I, 21, 22, I, I, I],
                                [I, I, 7, 8, I, I, 31, 32]]),
        "mm_token_type_ids": torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]]),
        "pixel_values": torch.ones(3, 4),
        "image_grid_thw": torch.tensor([[1, 1, 1], [1, 1, 1]]),
    }


def test_prompt_is_everything_before_the_last_response_segment():
    assert prompt_lengths(batch()["labels"]) == [3, 6]
    with pytest.raises(ValueError, match="sample 1 .* no response token"):
        prompt_lengths(torch.tensor([[I, 5], [I, I]]))


def test_prompt_batch_is_left_padded_with_images_kept():
    b = batch()
    prompts = prompt_batch(b, [3, 6], PAD)
    assert prompts["input_ids"].tolist() == [[PAD, PAD, PAD, 11, 12, 13], [11, 12, 7, 8, 14, 15]]
    assert prompts["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    assert prompts["mm_token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0]]
    assert "labels" not in prompts and prompts["pixel_values"] is b["pixel_values"]
    assert prompts["image_grid_thw"] is b["image_grid_thw"]


def test_generated_rows_are_cut_after_their_first_end_token():
    rows, ended = cut_at_end([[5, 6, 99, 0, 0], [5, 6, 7, 8, 9], [98]], end_ids=[98, 99])
    assert rows == [[5, 6, 99], [5, 6, 7, 8, 9], [98]] and ended == [True, False, True]


def test_on_policy_batch_supervises_only_the_generated_tokens():
    b = batch()
    out = on_policy_batch(b, [3, 6], [[41, 42, 99], [51]], PAD)
    assert out["input_ids"].tolist() == [[11, 12, 13, 41, 42, 99, PAD], [11, 12, 7, 8, 14, 15, 51]]
    assert out["labels"].tolist() == [[I, I, I, 41, 42, 99, I], [I, I, I, I, I, I, 51]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]]
    assert out["pixel_values"] is b["pixel_values"]


def test_draws_are_seeded_and_take_their_share():
    assert [on_policy_draw(0, s, d, 0.0) for s in range(5) for d in range(5)] == [False] * 25
    assert [on_policy_draw(0, s, d, 1.0) for s in range(5) for d in range(5)] == [True] * 25
    draws = [on_policy_draw(3, s, d, 0.3) for s in range(200) for d in range(50)]
    assert draws == [on_policy_draw(3, s, d, 0.3) for s in range(200) for d in range(50)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.02  # 10,000 draws: std 0.0046
    assert draws != [on_policy_draw(4, s, d, 0.3) for s in range(200) for d in range(50)]
    assert generation_seed(0, 1, 2) == generation_seed(0, 1, 2) != generation_seed(0, 1, 3)


def test_longest_response_counts_supervised_tokens():
    assert longest_response([torch.tensor([I, 1, 2]), torch.tensor([I, I, 3, 4, 5, I])]) == 3
    assert longest_response([[I, 1, 2], [I, I, 3, 4, 5, I]]) == 3  # encoded samples hold lists


def test_generation_log_writes_once_per_window_and_drops_records_after_a_resumed_step(tmp_path):
    path = tmp_path / "generations.jsonl"
    log = GenerationLog(path, samples=1)
    log.add(1, 0, ["a", "b"], [[1], [1, 2]], [True, False])
    log.add(1, 0, ["c"], [[3]], [True])  # same window: ignored
    log.add(2, 1, ["d"], [[4, 5]], [False])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{"step": 1, "sample": 0, "text": "a", "tokens": 1, "ended": True},
                       {"step": 2, "sample": 0, "text": "d", "tokens": 2, "ended": False}]
    GenerationLog(path, keep_until=1)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


class _RecordingModel(torch.nn.Module):
    """Stands in for a student: records the generation config, answers [41, 99] to each prompt."""

    def generate(self, input_ids, generation_config, synced_gpus, **kwargs):
        self.config_seen = generation_config
        reply = torch.tensor([[41, 99]]).expand(input_ids.shape[0], 2)
        return torch.cat([input_ids, reply], dim=1)


def test_generation_suppresses_the_placeholder_tokens_and_restores_the_mode():
    from types import SimpleNamespace

    from vlsi.method.on_policy import generate_responses
    from vlsi.models.backbones import placeholder_token_ids

    model = _RecordingModel().train()
    config = SimpleNamespace(image_token_id=5, video_token_id=6, vision_start_token_id=3,
                             vision_end_token_id=4, image_token_index=None)
    assert placeholder_token_ids(SimpleNamespace(config=config)) == [3, 4, 5, 6]
    out = generate_responses(model, batch(), lambda b: b, end_ids=[99], pad_token_id=PAD, temperature=1.0,
                             top_p=1.0, max_new_tokens=4, seed=0, suppress_ids=[3, 4, 5, 6])
    assert model.config_seen.suppress_tokens == [3, 4, 5, 6] and model.training
    assert out.responses == [[41, 99], [41, 99]] and out.ended == [True, True]
