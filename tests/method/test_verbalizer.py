"""Verbalizers: logit lens at init, architectures, target layers, save/load and fit checks."""

import json

import pytest
import torch

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import (
                                    ARCHITECTURES,
                                    VerbalizerSet,
                                    VerbFFN,
                                    capture_layer_context,
                                    default_target_layers,
                                    validate_target_layers,
                                    )
from vlsi.models.backbones import load_backbone
from vlsi.models.tiny import save_tiny_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tiny"), "qwen2_vl")


@pytest.fixture(scope="module")
def teacher(pair):
    return load_backbone(pair.teacher)


def _forward(bb, ids):
    with capture_layer_context(bb) as ctx:
        out = bb.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       mm_token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
    return out, ctx


def test_default_target_layers_follow_spec():
    assert default_target_layers(28) == [1, 5, 9, 13, 17, 21, 25]  # paper: 2nd, 6th, ..., 26th
    layers80 = default_target_layers(80)
    assert len(layers80) == 20 and layers80[0] == 1 and layers80[-1] == 77
    assert default_target_layers(8) == [1, 5]


@pytest.mark.parametrize("layers, msg", [
    ([7], "last layer"), ([-1], "last layer"), ([8], "out of range"), ([1, 1], "duplicates"),
    ([], "empty"), ([1.5], "integers"),
])
def test_invalid_target_layers(layers, msg):
    with pytest.raises(VlsiError, match=msg):
        validate_target_layers(layers, 8)


def test_explicit_layers_are_sorted():
    assert validate_target_layers([5, 0, 3], 8) == [0, 3, 5]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_untrained_verbalizer_equals_logit_lens(teacher, arch):
    vset = VerbalizerSet(teacher, None, arch)
    ids = torch.randint(20, 300, (2, 9))
    out, ctx = _forward(teacher, ids)
    for logits, layer in zip(vset(out.hidden_states, ctx), vset.layers):
        lens = teacher.lm_head(teacher.final_norm(out.hidden_states[layer + 1]))
        torch.testing.assert_close(logits, lens)


@pytest.mark.parametrize("arch", ["verb-ffn", "mlp", "ffn", "decoder"])
def test_trained_verbalizer_differs_from_logit_lens(teacher, arch):
    vset = VerbalizerSet(teacher, None, arch)
    with torch.no_grad():
        for p in vset.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(20, 300, (1, 6))
    out, ctx = _forward(teacher, ids)
    lens = teacher.lm_head(teacher.final_norm(out.hidden_states[vset.layers[0] + 1]))
    assert not torch.allclose(vset(out.hidden_states, ctx)[0], lens)


def test_parameter_counts_match_the_paper():
    """verb-FFN: 3 d^2 per layer; 7 layers at d=3584 is the paper's 269.7M (Table 4f)."""
    with torch.device("meta"):
        n = sum(p.numel() for _ in range(7) for p in VerbFFN(3584).parameters())
    assert n == 7 * 3 * 3584**2 and round(n / 1e6, 1) == 269.7


def test_architecture_parameter_counts(teacher):
    d = teacher.hidden_size
    inter = teacher.text_config.intermediate_size
    count = lambda a: sum(p.numel() for p in VerbalizerSet(teacher, [1], a).parameters())
    assert count("verb-ffn") == 3 * d * d
    assert count("mlp") == d * d
    assert count("ffn") == 3 * d * inter
    assert count("verb-ffn-x2") == 2 * count("verb-ffn")
    assert count("decoder") == sum(p.numel() for p in teacher.decoder_layers[0].parameters())


def test_head_is_shared_not_copied(teacher):
    vset = VerbalizerSet(teacher)
    assert not any("lm_head" in k or "norm" in k for k in vset.state_dict())
    assert vset.logits(vset.num_targets, torch.zeros(1, teacher.hidden_size)).shape[-1] == teacher.vocab_size


def test_unknown_architecture(teacher):
    with pytest.raises(VlsiError, match="supported: verb-ffn"):
        VerbalizerSet(teacher, None, "transformer")


def test_save_load_roundtrip(teacher, tmp_path):
    vset = VerbalizerSet(teacher, [0, 3], "ffn")
    with torch.no_grad():
        for p in vset.parameters():
            p.uniform_(-0.1, 0.1)
    vset.save(tmp_path)
    cfg = json.loads((tmp_path / "verbalizers.json").read_text())
    assert cfg["architecture"] == "ffn" and cfg["layers"] == [0, 3]
    assert cfg["hidden_size"] == teacher.hidden_size and cfg["vocab_size"] == teacher.vocab_size
    assert cfg["backbone"]["model_type"] == "qwen2_vl"
    loaded = VerbalizerSet.load(tmp_path, teacher)
    for (k, a), (_, b) in zip(vset.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_refuses_a_backbone_it_does_not_fit(pair, teacher, tmp_path):
    VerbalizerSet(teacher, [1, 5]).save(tmp_path)
    student = load_backbone(pair.student)
    with pytest.raises(VlsiError, match=r"do not fit this backbone \(hidden_size: verbalizers 96 vs backbone 64; num_layers: verbalizers 8 vs backbone 4"):
        VerbalizerSet.load(tmp_path, student)


def test_missing_verbalizer_files(teacher, tmp_path):
    with pytest.raises(VlsiError, match="verbalizers not found"):
        VerbalizerSet.load(tmp_path, teacher)


def test_prediction_positions_shift_labels_by_one():
    from vlsi.method.verbalizer import prediction_positions

    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, 9]])
    expected = torch.tensor([[False, True, True, False, False], [True, False, False, True, False]])
    assert torch.equal(prediction_positions(labels), expected)


@pytest.mark.parametrize("arch", ["verb-ffn", "decoder"])
def test_response_inputs_gather_layers_and_give_the_same_logits(teacher, arch):
    vset = VerbalizerSet(teacher, [1, 5], arch)
    with torch.no_grad():
        for p in vset.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(20, 300, (2, 8))
    out, ctx = _forward(teacher, ids)
    positions = torch.zeros(2, 8, dtype=torch.bool)
    positions[0, 3:6] = True
    positions[1, 7] = True
    stack, fn = vset.response_inputs(out.hidden_states, positions, ctx)
    assert stack.shape == (3, 4, teacher.hidden_size)
    full = vset(out.hidden_states, ctx)
    for k in range(2):
        torch.testing.assert_close(fn(k, stack[k]), full[k][positions])
    torch.testing.assert_close(fn(2, stack[2]), out.logits[positions])


@pytest.mark.parametrize("arch", ["verb-ffn", "decoder"])
def test_response_inputs_of_float32_hidden_states_on_a_bf16_backbone(pair, arch):
    """Under bf16 autocast accelerate hands back a bf16 model's hidden states in float32: the
    stack is the bf16 one, bit for bit, and the logits function takes it."""
    backbone = load_backbone(pair.teacher, dtype=torch.bfloat16)
    vset = VerbalizerSet(backbone, [1, 5], arch)
    ids = torch.randint(20, 300, (2, 8))
    with torch.no_grad():
        out, ctx = _forward(backbone, ids)
        positions = torch.ones(2, 8, dtype=torch.bool)
        upcast = tuple(h.float() for h in out.hidden_states)
        stack, fn = vset.response_inputs(upcast, positions, ctx)
        expected, _ = vset.response_inputs(out.hidden_states, positions, ctx)
        assert stack.dtype == torch.bfloat16 and torch.equal(stack, expected)
        assert fn(0, stack[0]).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["verb-ffn", "decoder"])
def test_response_inputs_gather_with_one_nonzero_for_all_layers(pair, arch):
    """The positions are turned into indices once (one host sync on a GPU), not once per layer,
    and the gather equals boolean-mask indexing."""
    from torch.overrides import TorchFunctionMode

    class CountNonzero(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.nonzero, torch.nonzero) or (
                    func is torch.Tensor.__getitem__ and torch.is_tensor(args[1]) and args[1].dtype == torch.bool):
                CountNonzero.calls += 1
            return func(*args, **(kwargs or {}))

    backbone = load_backbone(pair.teacher)
    vset = VerbalizerSet(backbone, [1, 3, 5], arch)
    ids = torch.randint(20, 300, (2, 8))
    positions = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) > 0.4
    with torch.no_grad():
        out, ctx = _forward(backbone, ids)
        with CountNonzero():
            stack, _ = vset.response_inputs(out.hidden_states, positions, ctx)
    assert CountNonzero.calls == 1
    torch.testing.assert_close(stack[-1], out.hidden_states[-1][positions], rtol=0, atol=0)
    if arch == "verb-ffn":
        torch.testing.assert_close(stack[0], out.hidden_states[2][positions], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_captured_states_are_the_output_hidden_states_of_the_target_layers(tiny_pair, family):
    """capture_hidden_states keeps only the target layers and the last, bit for bit what
    ``output_hidden_states`` gives there, with and without grad."""
    from vlsi.method.verbalizer import capture_hidden_states

    backbone = load_backbone(tiny_pair(family).teacher)
    ids = torch.randint(20, 300, (2, 8))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = torch.zeros_like(ids)
    layers = [1, 3]
    full = backbone.model(**inputs, output_hidden_states=True).hidden_states
    with capture_hidden_states(backbone, layers) as states:
        backbone.model(**inputs)
    assert sorted(states) == [-1, 2, 4]
    for key in (2, 4, -1):
        assert torch.equal(states[key], full[key]), key
    assert states[-1].requires_grad  # the graph is kept for the student's backward
    states.clear()
    backbone.model(**inputs)  # hooks are gone after the context
    assert states == {}


def test_transformed_response_inputs_give_the_same_logits(pair):
    """Transforms applied once in response_inputs (the teacher's frozen verbalizers) or per
    call of the logits function: the same logits."""
    backbone = load_backbone(pair.teacher)
    vset = VerbalizerSet(backbone, [1, 3, 5], "verb-ffn")
    with torch.no_grad():
        for p in vset.parameters():
            p.normal_(0, 0.05)
        ids = torch.randint(20, 300, (2, 8), generator=torch.Generator().manual_seed(1))
        out, ctx = _forward(backbone, ids)
        positions = torch.rand(2, 8, generator=torch.Generator().manual_seed(2)) > 0.3
        stack, fn = vset.response_inputs(out.hidden_states, positions, ctx)
        done, head_fn = vset.response_inputs(out.hidden_states, positions, ctx, transformed=True)
        for k in range(4):
            torch.testing.assert_close(head_fn(k, done[k]), fn(k, stack[k]), rtol=1e-6, atol=1e-6)
        assert torch.equal(done[3], stack[3])  # the last layer goes to the model's own head as it is
