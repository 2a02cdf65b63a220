"""Layer matching: which teacher target layer each student target layer learns from.

The interaction step scores every (student layer i, teacher layer j) pair by
``KLD[i, j]`` (mean over response tokens of the KL between their verbalized distributions) and
picks pairs from that matrix. :func:`algorithm1` is the paper's Algorithm 1 (docs/method.md#matching);
:func:`select_pairs` is the single entry point for it and for the ablation strategies of the
paper's Table 4e:

===========================  ==========================================================
strategy                     rule for student layer ``i``
===========================  ==========================================================
``random``                   one teacher layer uniformly at random among all ``t_l``
``uniform``                  ``j = i * floor(t_l / t_s)``
``bottom-k``                 weight ``1/k`` on each of the ``k`` smallest ``KLD[i, :]``
``multinomial``              sample from ``softmax(-KLD[i, :] / temperature)``
``multinomial+range``        same, restricted to ``[i, t_l - t_s + i]``, no order
``multinomial+range+order``  Algorithm 1 with the fixed ``temperature``
``vlsi`` (default)           Algorithm 1 with the adaptive temperature
===========================  ==========================================================

Selection is not differentiable and is computed on a detached CPU float64 copy of the (tiny)
``[t_s, t_l]`` matrix, so a CPU ``torch.Generator`` makes it reproducible on every device.
:func:`match` returns the chosen weights together with the distribution each row was drawn
from, whose entropy (:meth:`Matching.entropy`) tells how sharp the matching is: ``log`` of the
band width when sampling is uniform, 0 when it is deterministic.

The adaptive temperature has two rules (``temperature_rule``, docs/method.md#temperature):
``paper``, the formula as the paper prints it, ``T = scale / (max - min + eps)``, under which
the logits ``-s / T`` spread by ``(max - min)^2 / scale`` over a band (near-uniform when a
band's KLDs differ by less than about 1 nat); and ``normalized``, ``T = (max - min + eps) /
scale``, under which they always spread by ``scale``.
Strategies with a range read only entries inside it; :func:`needed_mask` says which entries a
strategy reads, so that the scoring pass of :mod:`vlsi.method.interaction` computes only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STRATEGIES = (
    "random",
    "uniform",
    "bottom-k",
    "multinomial",
    "multinomial+range",
    "multinomial+range+order",
    "vlsi",
)
BANDED_STRATEGIES = ("multinomial+range", "multinomial+range+order", "vlsi")
TEMPERATURE_RULES = ("paper", "normalized")


@dataclass(frozen=True)
class Matching:
    """A selection and the distributions it was drawn from.

    Attributes:
        weights: ``[t_s, t_l]``, rows summing to 1 (the weight of each pair in the loss).
        probs: ``[t_s, t_l]``, row ``i`` the distribution student layer ``i``'s pick was drawn
            from (zero outside its band); equal to ``weights`` for deterministic strategies.
    """

    weights: Tensor
    probs: Tensor

    def entropy(self) -> Tensor:
        """Entropy in nats of each row's distribution, ``[t_s]`` float32."""
        p = self.probs.to(torch.float64)
        terms = torch.where(p > 0, -p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
        return terms.sum(dim=1).float()


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown matching strategy {strategy!r}; supported: {', '.join(STRATEGIES)}")


def _check_sizes(t_s: int, t_l: int) -> None:
    if t_s < 1 or t_l < 1:
        raise ValueError(f"need at least one target layer on each side, got t_s={t_s}, t_l={t_l}")
    if t_s > t_l:
        raise ValueError(
            f"the student has more target layers than the teacher (t_s={t_s} > t_l={t_l}); "
            "matching needs t_s <= t_l"
        )


def search_band_mask(t_s: int, t_l: int) -> Tensor:
    """Entries any banded strategy may read: row ``i`` covers columns ``i .. t_l - t_s + i``.

    With order preservation row ``i``'s band is ``[start, t_l - t_s + i]`` with ``start >= i``
    (each earlier row consumed at least one column), so this mask covers it.

    Returns:
        BoolTensor ``[t_s, t_l]``.
    """
    _check_sizes(t_s, t_l)
    rows = torch.arange(t_s).unsqueeze(1)
    cols = torch.arange(t_l).unsqueeze(0)
    return (cols >= rows) & (cols <= rows + (t_l - t_s))


def _uniform_columns(t_s: int, t_l: int) -> Tensor:
    """``j = i * floor(t_l / t_s)`` for every student layer ``i``; LongTensor ``[t_s]``."""
    return torch.arange(t_s) * (t_l // t_s)


def needed_mask(strategy: str, t_s: int, t_l: int) -> Tensor:
    """Which ``KLD`` entries ``strategy`` reads; BoolTensor ``[t_s, t_l]``.

    ``random`` reads none. ``uniform`` needs none to choose, but its chosen entries are fixed in
    advance, so the scoring pass computes exactly those and their KLD is logged like the other
    strategies'. Banded strategies read :func:`search_band_mask`; the others read all entries.
    """
    _check_strategy(strategy)
    _check_sizes(t_s, t_l)
    if strategy == "random":
        return torch.zeros(t_s, t_l, dtype=torch.bool)
    if strategy == "uniform":
        mask = torch.zeros(t_s, t_l, dtype=torch.bool)
        mask[torch.arange(t_s), _uniform_columns(t_s, t_l)] = True
        return mask
    if strategy in BANDED_STRATEGIES:
        return search_band_mask(t_s, t_l)
    return torch.ones(t_s, t_l, dtype=torch.bool)


def adaptive_temperature(s: Tensor, scale: float, eps: float, rule: str = "paper") -> Tensor:
    """Algorithm 1's temperature for the band scores ``s`` (see the module docstring)."""
    spread = s.max() - s.min() + eps
    return scale / spread if rule == "paper" else spread / scale


def algorithm1(
    kld: Tensor,
    *,
    scale: float = 2.0,
    eps: float = 1e-6,
    temperature: float | None = None,
    temperature_rule: str = "paper",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Paper Algorithm 1: ordered, banded, multinomial matching.

    Args:
        kld: ``[t_s, t_l]`` scores on CPU; only entries inside each row's band are read.
        temperature: ``None`` for the adaptive temperature (:func:`adaptive_temperature` with
            ``temperature_rule``); a number for the fixed-temperature ablation.

    Returns:
        ``[t_s, t_l]`` with one 1 per row at strictly increasing columns.
    """
    return _algorithm1(kld, scale, eps, temperature, temperature_rule, generator).weights


def _algorithm1(kld: Tensor, scale: float, eps: float, temperature: float | None, rule: str,
                generator: torch.Generator | None) -> Matching:
    t_s, t_l = kld.shape
    W = torch.zeros(t_s, t_l, dtype=kld.dtype)
    probs = torch.zeros(t_s, t_l, dtype=kld.dtype)
    start = 0
    for i in range(t_s):
        band = torch.arange(start, t_l - t_s + i + 1)  # search range: leaves room for later layers
        s = kld[i, band]
        T = adaptive_temperature(s, scale, eps, rule) if temperature is None else temperature
        p = torch.softmax(-s / T, dim=0)
        j = int(band[torch.multinomial(p, 1, generator=generator)])
        W[i, j] = 1.0
        probs[i, band] = p
        start = j + 1  # order preservation: the next student layer matches a deeper layer
    return Matching(W, probs)


def _sample_rows(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One-hot ``[t_s, t_l]`` with one column per row drawn from ``probs`` (rows sum to 1)."""
    picks = torch.multinomial(probs, 1, generator=generator)
    return torch.zeros_like(probs).scatter_(1, picks, 1.0)


def _range_multinomial(kld: Tensor, temperature: float, generator: torch.Generator | None) -> Matching:
    """``multinomial+range``: row ``i`` samples inside ``[i, t_l - t_s + i]``, rows independent."""
    t_s, t_l = kld.shape
    W = torch.zeros(t_s, t_l, dtype=kld.dtype)
    probs = torch.zeros(t_s, t_l, dtype=kld.dtype)
    for i in range(t_s):
        band = torch.arange(i, t_l - t_s + i + 1)
        p = torch.softmax(-kld[i, band] / temperature, dim=0)
        W[i, int(band[torch.multinomial(p, 1, generator=generator)])] = 1.0
        probs[i, band] = p
    return Matching(W, probs)


def _bottom_k(kld: Tensor, k: int) -> Tensor:
    """Weight ``1/k`` on the ``k`` smallest entries of each row."""
    picks = torch.topk(kld, k, dim=1, largest=False).indices
    return torch.zeros_like(kld).scatter_(1, picks, 1.0 / k)


def _check_scores(scores: Tensor, strategy: str) -> None:
    """The entries a strategy reads must be finite: a NaN there is a bug upstream.

    ``uniform`` and ``random`` choose without looking at the scores, so they accept anything.
    """
    if strategy in ("uniform", "random"):
        return
    t_s, t_l = scores.shape
    bad = needed_mask(strategy, t_s, t_l) & ~torch.isfinite(scores)
    if bad.any():
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"KLD[{i}, {j}] = {scores[i, j].item()} is not finite but {strategy!r} reads it")


def _check_arguments(strategy: str, t_l: int, scale: float, k: int, temperature: float,
                     temperature_rule: str) -> None:
    if temperature_rule not in TEMPERATURE_RULES:
        raise ValueError(f"unknown temperature_rule {temperature_rule!r}; supported: "
                         f"{', '.join(TEMPERATURE_RULES)}")
    if strategy == "bottom-k" and not 1 <= k <= t_l:
        raise ValueError(f"bottom-k needs 1 <= k <= t_l={t_l}, got k={k}")
    if strategy in ("multinomial", "multinomial+range", "multinomial+range+order") and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if strategy == "vlsi" and scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")


def select_pairs(
    kld: Tensor,
    strategy: str = "vlsi",
    *,
    scale: float = 2.0,
    eps: float = 1e-6,
    k: int = 3,
    temperature: float = 1.0,
    temperature_rule: str = "paper",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose teacher layers for every student layer from the KLD score matrix.

    Args:
        kld: ``[t_s, t_l]`` mean KL scores, ``t_s <= t_l``. Entries the strategy does not read
            (see :func:`needed_mask`) may hold anything, NaN and inf included.
        strategy: one of :data:`STRATEGIES`.
        scale, eps: adaptive temperature of ``vlsi``.
        k: number of pairs per row for ``bottom-k``.
        temperature: fixed temperature of the ``multinomial*`` strategies.
        temperature_rule: ``paper`` or ``normalized`` adaptive temperature of ``vlsi``.
        generator: CPU generator for the random strategies; same seed, same pairs.

    Returns:
        float32 ``[t_s, t_l]`` on ``kld``'s device, rows summing to 1 (weight of each pair).
    """
    return match(kld, strategy, scale=scale, eps=eps, k=k, temperature=temperature,
                 temperature_rule=temperature_rule, generator=generator).weights


def match(kld: Tensor, strategy: str = "vlsi", *, scale: float = 2.0, eps: float = 1e-6, k: int = 3,
          temperature: float = 1.0, temperature_rule: str = "paper",
          generator: torch.Generator | None = None) -> Matching:
    """:func:`select_pairs` (same arguments, same draws), with the sampling distributions.

    Returns:
        :class:`Matching`, both tensors float32 ``[t_s, t_l]`` on ``kld``'s device.
    """
    _check_strategy(strategy)
    if kld.dim() != 2:
        raise ValueError(f"kld must be 2-D [t_s, t_l], got shape {tuple(kld.shape)}")
    t_s, t_l = kld.shape
    _check_sizes(t_s, t_l)
    _check_arguments(strategy, t_l, scale, k, temperature, temperature_rule)
    scores = kld.detach().to("cpu", torch.float64)
    _check_scores(scores, strategy)

    if strategy == "random":
        probs = torch.full((t_s, t_l), 1.0 / t_l, dtype=torch.float64)
        result = Matching(_sample_rows(probs, generator), probs)
    elif strategy == "uniform":
        weights = torch.zeros(t_s, t_l, dtype=torch.float64)
        weights[torch.arange(t_s), _uniform_columns(t_s, t_l)] = 1.0
        result = Matching(weights, weights)
    elif strategy == "bottom-k":
        weights = _bottom_k(scores, k)
        result = Matching(weights, weights)
    elif strategy == "multinomial":
        probs = torch.softmax(-scores / temperature, dim=1)
        result = Matching(_sample_rows(probs, generator), probs)
    elif strategy == "multinomial+range":
        result = _range_multinomial(scores, temperature, generator)
    elif strategy == "multinomial+range+order":
        result = _algorithm1(scores, scale, eps, temperature, temperature_rule, generator)
    else:
        result = _algorithm1(scores, scale, eps, None, temperature_rule, generator)
    return Matching(result.weights.to(device=kld.device, dtype=torch.float32),
                    result.probs.to(device=kld.device, dtype=torch.float32))
