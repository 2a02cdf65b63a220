"""Verbalizers: map an intermediate layer's hidden state into the vocabulary.

The decisions behind them: docs/method.md#verbalizer and docs/method.md#target-layers.

``verbalizer_l(h) = lm_head(final_norm(T_l(h)))`` where ``T_l`` is a small trainable transform
and ``final_norm``/``lm_head`` are the backbone's own, frozen and shared (never copied, never
saved with the verbalizers). Transforms (paper Table 4f):

==============  ==========================================================  ==================
architecture    ``T(h)``                                                    params per layer
==============  ==========================================================  ==================
``verb-ffn``    ``h + W_down(SiLU(W_gate h) * W_up h)``, all W d x d         3 d^2 (default)
``mlp``         ``h + W h``                                                  d^2
``ffn``         ``h + MLP(h)`` with the backbone's own MLP class and sizes   3 d I
``decoder``     one decoder block of the backbone's own class               (block)
``*x2``         the transform stacked twice                                  x2
==============  ==========================================================  ==================

Every transform starts as the identity (the last projection is zero-initialised; the residual
is this project's choice), so an untrained verbalizer equals the logit lens.

``mlp``, ``verb-ffn`` and ``ffn`` act on each token alone; ``decoder`` attends over the sequence
and needs the backbone's rotary embeddings and attention mask, which :class:`LayerContext`
captures from the backbone's own forward pass.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from vlsi.errors import VlsiError
from vlsi.models.backbones import Backbone

ARCHITECTURES = ("verb-ffn", "mlp", "ffn", "decoder", "verb-ffn-x2", "mlp-x2", "ffn-x2", "decoder-x2")
WEIGHTS_NAME = "verbalizers.safetensors"
CONFIG_NAME = "verbalizers.json"


def default_target_layers(num_layers: int) -> list[int]:
    """The default rule: every 4th layer from index 1, last layer excluded (28 layers -> 1, 5, ..., 25).

    docs/method.md#target-layers says why.
    """
    return list(range(1, num_layers - 1, 4))


def validate_target_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """An explicit list checked against the backbone, or the default rule when ``None``.

    Errors: empty list, duplicates, non-integers, indices outside ``[0, num_layers - 2]`` (the
    last layer is not a target layer: the model's own LM head verbalizes it).
    """
    if layers is None:
        layers = default_target_layers(num_layers)
        if not layers:
            raise VlsiError(f"a backbone with {num_layers} layers has no default target layer")
        return layers
    if not layers:
        raise VlsiError("target layer list is empty")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
        raise VlsiError(f"target layers must be integers, got {layers}")
    if len(set(layers)) != len(layers):
        raise VlsiError(f"target layers contain duplicates: {layers}")
    last = num_layers - 1
    for i in layers:
        if i == last or i == -1:
            raise VlsiError(
                f"target layer {i} is the last layer of a {num_layers}-layer backbone; "
                "the last layer is handled by the model's own LM head"
            )
        if not 0 <= i < last:
            raise VlsiError(f"target layer {i} out of range for a {num_layers}-layer backbone "
                            f"(valid: 0..{last - 1})")
    return sorted(layers)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


class VerbFFN(nn.Module):
    """``h + W_down(SiLU(W_gate h) * W_up h)``: a gated FFN without expansion (d -> d)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., d]
        return h + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class LinearResidual(nn.Module):
    """``h + W h`` with ``W`` (d x d) starting at zero."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h)


class BackboneFFN(nn.Module):
    """``h + MLP(h)`` with the backbone's own MLP class (its intermediate size)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        nn.init.zeros_(self.mlp.down_proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(h)


class BackboneDecoderBlock(nn.Module):
    """One decoder block of the backbone's own class; identity at init.

    The block is residual already; its attention output and MLP down projections start at zero.
    Needs ``position_embeddings`` and ``attention_mask`` as the backbone computed them.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        nn.init.zeros_(self.block.self_attn.o_proj.weight)
        if self.block.self_attn.o_proj.bias is not None:
            nn.init.zeros_(self.block.self_attn.o_proj.bias)
        nn.init.zeros_(self.block.mlp.down_proj.weight)

    def forward(self, h: torch.Tensor, **context: Any) -> torch.Tensor:  # [B, T, d]
        out = self.block(h, **context)
        return out[0] if isinstance(out, tuple) else out


def _make_unit(kind: str, backbone: Backbone, layer_idx: int) -> nn.Module:
    d = backbone.hidden_size
    if kind == "verb-ffn":
        return VerbFFN(d)
    if kind == "mlp":
        return LinearResidual(d)
    if kind == "ffn":
        return BackboneFFN(type(backbone.decoder_layers[0].mlp)(backbone.text_config))
    if kind == "decoder":
        return BackboneDecoderBlock(backbone.decoder_layer_class(backbone.text_config, layer_idx))
    raise VlsiError(f"unknown verbalizer architecture {kind!r}; supported: {', '.join(ARCHITECTURES)}")


class Verbalizer(nn.Module):
    """The trainable transform of one target layer (one unit, or two stacked for ``*-x2``)."""

    def __init__(self, architecture: str, backbone: Backbone, layer_idx: int):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise VlsiError(
                f"unknown verbalizer architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        kind, _, times = architecture.partition("-x")
        self.architecture = architecture
        self.token_wise = kind != "decoder"
        self.units = nn.ModuleList(_make_unit(kind, backbone, layer_idx) for _ in range(int(times or 1)))

    def forward(self, h: torch.Tensor, **context: Any) -> torch.Tensor:
        """[..., d] -> [..., d]; ``decoder`` needs [B, T, d] and the captured context."""
        for unit in self.units:
            h = unit(h, **context) if not self.token_wise else unit(h)
        return h


# ---------------------------------------------------------------------------------------------
# The set of verbalizers of one backbone
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerContext:
    """Rotary embeddings and attention mask a decoder block received in the backbone's forward."""

    kwargs: dict[str, Any]


def position_index(positions: Tensor) -> Tensor:
    """Flat indices ``[N]`` of the true entries of a bool ``[B, T]`` mask (row-major order, as
    ``x[positions]`` takes them); computed once, it gathers any number of ``[B, T, d]`` tensors
    with :func:`gather_positions` without a ``nonzero`` sync each."""
    return positions.reshape(-1).nonzero().squeeze(1)


def gather_positions(x: Tensor, index: Tensor) -> Tensor:
    """``x[positions]`` for ``x`` ``[B, T, d]`` and ``index = position_index(positions)``: ``[N, d]``."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def response_labels(labels: Tensor, positions: Tensor) -> Tensor:
    """Ground-truth next token of each compared position: long ``[N]`` in the order of
    :meth:`VerbalizerSet.response_inputs`, ``labels[b, p + 1]`` for each true ``positions[b, p]``
    (labels ``[B, T]``, positions bool ``[B, T]`` from :func:`prediction_positions`)."""
    shifted = torch.roll(labels, -1, dims=1)  # the wrapped last column is never a compared position
    return gather_positions(shifted.unsqueeze(-1), position_index(positions)).squeeze(-1)


class VerbalizerSet(nn.Module):
    """Verbalizers for the target layers of one backbone.

    Only the transforms are parameters of this module (and of its state dict); the backbone's
    final norm and LM head are reached through the backbone and stay frozen.

    Index convention shared with :mod:`vlsi.method.interaction`: ``k`` in ``0..t-1`` is the verbalizer
    of target layer ``layers[k]``; ``k == t`` is the model's own head on the last, already
    final-normed hidden state.
    """

    def __init__(self, backbone: Backbone, layers: list[int] | None = None, architecture: str = "verb-ffn"):
        super().__init__()
        self.layers = validate_target_layers(layers, backbone.num_layers)
        self.architecture = architecture
        self.verbalizers = nn.ModuleList(Verbalizer(architecture, backbone, i) for i in self.layers)
        # a Backbone is not an nn.Module: held, not registered (its weights stay the backbone's)
        self.backbone = backbone
        self.backbone_identity = backbone.identity()
        ref = backbone.lm_head.weight
        self.to(device=ref.device, dtype=ref.dtype)

    @property
    def num_targets(self) -> int:
        return len(self.layers)

    @property
    def token_wise(self) -> bool:
        return all(v.token_wise for v in self.verbalizers)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Backbone's final norm + LM head: [..., d] -> [..., V_rows]."""
        bb = self.backbone
        return bb.lm_head(bb.final_norm(h))

    def transform(self, k: int, h: torch.Tensor, context: LayerContext | None = None) -> torch.Tensor:
        v = self.verbalizers[k]
        if v.token_wise:
            return v(h)
        if context is None:
            raise VlsiError("a decoder verbalizer needs the backbone's layer context")
        return v(h, **context.kwargs)

    def logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Token-wise verbalized logits: ``k < t`` target layer k, ``k == t`` the model's head.

        [n, d] -> [n, V_rows]. For ``k == t``, ``h`` is the already-normed last hidden state.
        """
        if k == self.num_targets:
            return self.backbone.lm_head(h)
        return self.head(self.transform(k, h))

    def forward(self, hidden_states: tuple[torch.Tensor, ...], context: LayerContext | None = None) -> list[torch.Tensor]:
        """Logits of every target layer from ``output_hidden_states``: list of [B, T, V_rows]."""
        return [
            self.head(self.transform(k, hidden_states[layer + 1], context))
            for k, layer in enumerate(self.layers)
        ]

    def response_inputs(
        self,
        hidden_states: tuple[torch.Tensor, ...],
        positions: torch.Tensor,
        context: LayerContext | None = None,
        transformed: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Gather what :func:`vlsi.method.interaction.interaction_loss` takes from one forward pass.

        Args:
            hidden_states: the backbone's ``output_hidden_states``, L + 1 tensors [B, T, d].
            positions: bool [B, T], the positions whose distribution is compared
                (see :func:`prediction_positions`).
            context: captured layer context (only ``decoder`` verbalizers need it).
            transformed: apply token-wise transforms here too, once per layer in layer order,
                and hand over the head alone: for frozen verbalizers (the teacher's), whose
                transforms then run once per micro-batch instead of in every pass of the
                chunked loss, and which sharded engines then gather one layer at a time in the
                same order on every process.

        Returns:
            ``stack`` [t + 1, N, d] in the LM head's dtype: the N selected positions at each
            target layer, then the final-normed last hidden state; and
            ``logits_fn(k, h[n, d]) -> [n, V_rows]``. Token-wise verbalizers are applied inside
            ``logits_fn`` (so the chunked loss recomputes them chunk by chunk); a ``decoder``
            verbalizer mixes the sequence, so its transform runs here on whole sequences and
            ``logits_fn`` is the head alone.

        Hidden states of another dtype are cast to the head's: under bf16 mixed precision
        accelerate returns a prepared model's outputs in float32 (``convert_outputs_to_fp32``)
        although a bf16 model computed them in bf16, so the cast back is exact.
        """
        dtype = self.backbone.lm_head.weight.dtype
        index = position_index(positions)  # one host sync for all layers, not one per mask
        if self.token_wise and transformed:
            rows = [self.transform(k, gather_positions(hidden_states[layer + 1], index).to(dtype))
                    for k, layer in enumerate(self.layers)]
            t = self.num_targets
            fn = lambda k, h: self.backbone.lm_head(h) if k == t else self.head(h)  # noqa: E731
        elif self.token_wise:
            rows = [gather_positions(hidden_states[layer + 1], index).to(dtype) for layer in self.layers]
            fn = self.logits
        else:
            rows = [gather_positions(self.transform(k, hidden_states[layer + 1].to(dtype), context), index)
                    for k, layer in enumerate(self.layers)]
            t = self.num_targets
            fn = lambda k, h: self.backbone.lm_head(h) if k == t else self.head(h)  # noqa: E731
        rows.append(gather_positions(hidden_states[-1], index).to(dtype))
        return torch.stack(rows), fn

    # -- persistence ------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "layers": self.layers,
            "hidden_size": self.backbone_identity["hidden_size"],
            "vocab_size": self.backbone_identity["vocab_size"],
            "backbone": self.backbone_identity,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``verbalizers.safetensors`` and ``verbalizers.json`` into ``out_dir``."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone) -> VerbalizerSet:
        """Load verbalizers and attach them to ``backbone``; refuse if they do not fit it."""
        from safetensors.torch import load_file

        d = Path(path)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise VlsiError(f"{d}: no {CONFIG_NAME} + {WEIGHTS_NAME} (verbalizers not found)")
        cfg = json.loads((d / CONFIG_NAME).read_text())
        check_fits(cfg, backbone, source=str(d))
        vset = cls(backbone, cfg["layers"], cfg["architecture"])
        state = load_file(str(d / WEIGHTS_NAME))
        missing, unexpected = vset.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise VlsiError(f"{d}: verbalizer weights do not match {cfg['architecture']} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return vset


def check_fits(cfg: dict[str, Any], backbone: Backbone, source: str = "verbalizers") -> None:
    """Raise a one-line error listing every field where saved verbalizers and backbone differ."""
    have = backbone.identity()
    want = cfg.get("backbone", {})
    diffs = [f"{k}: verbalizers {want.get(k)!r} vs backbone {have[k]!r}"
             for k in have if k in want and want[k] != have[k]]
    if cfg.get("hidden_size") not in (None, have["hidden_size"]) and not any(d.startswith("hidden_size") for d in diffs):
        diffs.append(f"hidden_size: verbalizers {cfg['hidden_size']} vs backbone {have['hidden_size']}")
    if diffs:
        raise VlsiError(f"{source} do not fit this backbone ({'; '.join(diffs)})")
    last = have["num_layers"] - 1
    bad = [i for i in cfg.get("layers", []) if not 0 <= i < last]
    if bad:
        raise VlsiError(f"{source}: target layers {bad} do not exist below the last layer of a "
                        f"{have['num_layers']}-layer backbone")


def prediction_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Bool [B, T]: positions whose next-token distribution predicts a response token.

    The logits at position p predict token p + 1, so with next-token labels [B, T] the compared
    positions are those where ``labels[:, p + 1]`` is supervised (the same shift as the
    next-token loss). The last position predicts nothing.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


@contextmanager
def capture_hidden_states(backbone: Backbone, layers: list[int]) -> Iterator[dict[int, Tensor]]:
    """The hidden states a step reads, recorded by forward hooks during the backbone's forward.

    Stands in for ``output_hidden_states=True`` in no-grad forwards (a frozen teacher or
    backbone), where that tuple keeps all ``L + 1`` states alive (81 at 72B) when only the
    target layers and the last are read. A forward with grad keeps its states for the backward
    anyway and uses the tuple (docs/engines.md says why). The dict is
    keyed as that tuple is indexed: ``states[l + 1]`` is the output of decoder layer ``l`` (for
    ``l`` in ``layers``) and ``states[-1]`` the final-normed last hidden state, each ``[B, T, d]``.
    Hooks are removed on exit, before any backward (gradient checkpointing recomputes layers
    then)::

        with capture_hidden_states(bb, vset.layers) as states:
            bb.model(**inputs, use_cache=False)
        stack, fn = vset.response_inputs(states, positions, ctx)
    """
    states: dict[int, Tensor] = {}

    def keep(key: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            states[key] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [backbone.decoder_layers[layer].register_forward_hook(keep(layer + 1)) for layer in sorted(set(layers))]
    handles.append(backbone.final_norm.register_forward_hook(keep(-1)))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_layer_context(backbone: Backbone) -> Iterator[LayerContext]:
    """Record the keyword arguments (rotary embeddings, mask, positions) of decoder layer 0.

    ``decoder`` verbalizers call a block of the backbone's class and must see the same
    positions and mask as the backbone's own layers. Use around the backbone's forward::

        with capture_layer_context(bb) as ctx:
            out = bb.model(**inputs, output_hidden_states=True)
        logits = vset(out.hidden_states, ctx)
    """
    ctx = LayerContext({})
    keep = ("attention_mask", "position_ids", "position_embeddings", "cache_position")

    def hook(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        ctx.kwargs = {k: kwargs[k] for k in keep if k in kwargs}

    handle = backbone.decoder_layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield ctx
    finally:
        handle.remove()
