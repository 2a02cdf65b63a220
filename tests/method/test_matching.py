"""Layer matching (paper Algorithm 1 and the Table 4e ablations)."""

import math

import pytest
import torch

from vlsi.method.matching import (
                                  STRATEGIES,
                                  algorithm1,
                                  match,
                                  needed_mask,
                                  search_band_mask,
                                  select_pairs,
                                  )

T_S, T_L = 4, 9


def _kld(t_s: int = T_S, t_l: int = T_L, seed: int = 0) -> torch.Tensor:
    return torch.rand(t_s, t_l, generator=torch.Generator().manual_seed(seed)) * 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _picks(weights: torch.Tensor) -> list[int]:
    """Column of the single selected pair in each row."""
    assert ((weights > 0).sum(dim=1) == 1).all()
    return weights.argmax(dim=1).tolist()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_sum_to_one_shape_dtype(strategy):
    for seed in range(5):
        w = select_pairs(_kld(seed=seed), strategy, generator=_gen(seed))
        assert w.shape == (T_S, T_L) and w.dtype == torch.float32
        torch.testing.assert_close(w.sum(dim=1), torch.ones(T_S))
        assert (w >= 0).all()


def test_search_band_mask():
    mask = search_band_mask(3, 5)
    expected = torch.tensor(
        [[1, 1, 1, 0, 0],
         [0, 1, 1, 1, 0],
         [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert search_band_mask(4, 4).equal(torch.eye(4, dtype=torch.bool))


def test_needed_mask_per_strategy():
    assert not needed_mask("random", 3, 7).any()
    uniform = needed_mask("uniform", 3, 7)
    assert uniform.nonzero().tolist() == [[0, 0], [1, 2], [2, 4]]
    for name in ("bottom-k", "multinomial"):
        assert needed_mask(name, 3, 7).all()
    for name in ("multinomial+range", "multinomial+range+order", "vlsi"):
        assert needed_mask(name, 3, 7).equal(search_band_mask(3, 7))


@pytest.mark.parametrize("strategy", ["multinomial+range", "multinomial+range+order", "vlsi"])
def test_range_strategies_read_only_inside_band(strategy):
    band = search_band_mask(T_S, T_L)
    for seed in range(20):
        kld = _kld(seed=seed).masked_fill(~band, float("nan"))
        w = select_pairs(kld, strategy, generator=_gen(seed))
        assert (band | (w == 0)).all(), "picked outside the band"
        assert not torch.isnan(w).any()
    # inf outside the band is fine too
    select_pairs(_kld().masked_fill(~band, float("inf")), strategy, generator=_gen())


def test_nan_inside_read_range_is_rejected():
    kld = _kld()
    kld[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"KLD\[1, 2\]"):
        select_pairs(kld, "vlsi", generator=_gen())
    with pytest.raises(ValueError, match="not finite"):
        select_pairs(kld, "bottom-k")
    # uniform and random choose without reading the scores
    assert _picks(select_pairs(torch.full((T_S, T_L), float("nan")), "uniform")) == [0, 2, 4, 6]
    select_pairs(torch.full((T_S, T_L), float("nan")), "random", generator=_gen())


@pytest.mark.parametrize("strategy", ["multinomial+range+order", "vlsi"])
def test_order_strategies_strictly_increasing(strategy):
    for seed in range(30):
        cols = _picks(select_pairs(_kld(seed=seed), strategy, generator=_gen(seed)))
        assert all(a < b for a, b in zip(cols, cols[1:])), cols


def test_order_is_forced_when_t_s_equals_t_l():
    w = select_pairs(_kld(5, 5), "vlsi", generator=_gen())
    assert torch.equal(w, torch.eye(5))


def test_uniform_exact():
    w = select_pairs(_kld(3, 10), "uniform")
    assert _picks(w) == [0, 3, 6]
    assert _picks(select_pairs(_kld(4, 4), "uniform")) == [0, 1, 2, 3]


def test_bottom_k_exact():
    kld = torch.tensor([[5.0, 1.0, 3.0, 0.5, 4.0], [0.1, 0.2, 9.0, 0.3, 0.05]])
    assert _picks(select_pairs(kld, "bottom-k", k=1)) == [3, 4]
    w3 = select_pairs(kld, "bottom-k", k=3)
    expected = torch.zeros(2, 5)
    expected[0, [1, 2, 3]] = 1 / 3
    expected[1, [0, 1, 4]] = 1 / 3
    torch.testing.assert_close(w3, expected)


def _frequencies(draw, n_draws: int, size: int) -> torch.Tensor:
    counts = torch.zeros(size)
    for _ in range(n_draws):
        counts[draw()] += 1
    return counts


def _assert_matches(counts: torch.Tensor, probs: torch.Tensor, sigmas: float = 5.0) -> None:
    """Each count within ``sigmas`` binomial standard deviations of its expectation."""
    n = counts.sum()
    expected = n * probs
    std = torch.sqrt(n * probs * (1 - probs)).clamp(min=1.0)
    assert ((counts - expected).abs() <= sigmas * std).all(), (counts, expected)


def test_multinomial_frequencies_follow_softmax():
    kld = torch.tensor([[0.2, 1.0, 0.5, 2.0, 0.1]])
    temperature = 0.7
    probs = torch.softmax(-kld[0].double() / temperature, dim=0).float()
    gen = _gen(123)
    counts = _frequencies(
        lambda: _picks(select_pairs(kld, "multinomial", temperature=temperature, generator=gen))[0],
        4000, 5)
    _assert_matches(counts, probs)
    # and it would fail against the wrong temperature
    wrong = torch.softmax(-kld[0].double() / 2.0, dim=0).float()
    with pytest.raises(AssertionError):
        _assert_matches(counts, wrong)


def test_vlsi_first_row_frequencies_follow_adaptive_temperature():
    kld = torch.tensor([
        [0.5, 1.5, 1.0, 4.5, 7.0],   # row 0 reads columns 0..3 (t_l - t_s = 3)
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ])
    s = kld[0, :4].double()
    T = 2.0 / (s.max() - s.min() + 1e-6)
    probs = torch.softmax(-s / T, dim=0).float()
    gen = _gen(7)
    counts = _frequencies(lambda: _picks(select_pairs(kld, "vlsi", generator=gen))[0], 4000, 4)
    _assert_matches(counts, probs)
    # the paper's -s / T (T = 2 / spread = 0.5 here) is sharper than -s * T would be
    misread = torch.softmax(-s * T, dim=0).float()
    with pytest.raises(AssertionError):
        _assert_matches(counts, misread)


def test_algorithm1_fixed_temperature_matches_strategy():
    kld = _kld().double()
    a = algorithm1(kld, temperature=0.5, generator=_gen(3))
    b = select_pairs(kld, "multinomial+range+order", temperature=0.5, generator=_gen(3))
    torch.testing.assert_close(a.float(), b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_with_same_generator(strategy):
    kld = _kld(6, 14)
    runs = [torch.stack([select_pairs(kld, strategy, generator=g) for _ in range(5)])
            for g in (_gen(11), _gen(11))]
    assert torch.equal(runs[0], runs[1])


def test_different_seeds_differ_for_sampling():
    kld = torch.zeros(6, 14)  # flat scores: every band entry is equally likely
    draws = {tuple(_picks(select_pairs(kld, "vlsi", generator=_gen(seed)))) for seed in range(10)}
    assert len(draws) > 1


def test_no_gradient_and_device_kept():
    kld = _kld().requires_grad_()
    w = select_pairs(kld, "vlsi", generator=_gen())
    assert not w.requires_grad and w.device == kld.device


def test_errors():
    with pytest.raises(ValueError, match="2-D"):
        select_pairs(torch.zeros(3), "vlsi")
    with pytest.raises(ValueError, match="t_s <= t_l"):
        select_pairs(torch.zeros(5, 3), "vlsi")
    with pytest.raises(ValueError, match="supported: random, uniform"):
        select_pairs(torch.zeros(2, 3), "greedy")
    with pytest.raises(ValueError, match="k="):
        select_pairs(torch.zeros(2, 3), "bottom-k", k=4)
    with pytest.raises(ValueError, match="k="):
        select_pairs(torch.zeros(2, 3), "bottom-k", k=0)
    with pytest.raises(ValueError, match="temperature"):
        select_pairs(torch.zeros(2, 3), "multinomial", temperature=0.0)
    with pytest.raises(ValueError, match="supported"):
        needed_mask("nope", 2, 3)
    with pytest.raises(ValueError, match="t_s <= t_l"):
        search_band_mask(4, 3)
    # k is only checked where it is used
    select_pairs(torch.zeros(2, 2), "vlsi", k=3, generator=_gen())


def test_sampling_probabilities_sum_to_one_for_large_scores():
    # large, widely spread scores: -s / T is huge; softmax must still give a valid draw
    kld = torch.tensor([[1e4, 0.0, 5e3], [2.0, 1e5, 3.0]])
    w = select_pairs(kld, "vlsi", generator=_gen())
    assert _picks(w)[0] == 1 and math.isclose(float(w.sum()), 2.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_match_draws_what_select_pairs_draws(strategy):
    kld = _kld(5, 11, seed=4)
    m = match(kld, strategy, generator=_gen(9))
    assert torch.equal(m.weights, select_pairs(kld, strategy, generator=_gen(9)))
    torch.testing.assert_close(m.probs.sum(dim=1), torch.ones(5))
    assert ((m.weights > 0) <= (m.probs > 0)).all()  # every pick had positive probability


def test_matching_entropy_of_known_distributions():
    flat = torch.zeros(3, 7)  # vlsi on flat scores: uniform over each band (widths depend on draws)
    m = match(flat, "vlsi", generator=_gen())
    widths = (m.probs > 0).sum(dim=1).double()
    torch.testing.assert_close(m.entropy().double(), widths.log(), atol=1e-6, rtol=0)
    assert torch.equal(match(_kld(), "uniform").entropy(), torch.zeros(T_S))
    torch.testing.assert_close(match(_kld(), "bottom-k", k=3).entropy(), torch.full((T_S,), math.log(3)))
    torch.testing.assert_close(match(_kld(), "random", generator=_gen()).entropy(),
                               torch.full((T_S,), math.log(T_L)))


def test_normalized_temperature_ignores_the_kld_scale_and_paper_does_not():
    base = torch.tensor([[0.0, 0.3, 0.6, 0.9], [0.0, 0.0, 0.0, 0.0]])
    def first_row(scores, rule):
        return match(scores, "vlsi", temperature_rule=rule, generator=_gen()).probs[0, :3]
    narrow, wide = first_row(base * 0.1, "normalized"), first_row(base * 10, "normalized")
    torch.testing.assert_close(narrow, wide)
    # logits always spread by scale = 2 over the band: best / worst = e^2
    torch.testing.assert_close(narrow[0] / narrow[2], torch.tensor(math.exp(2.0)), rtol=1e-4, atol=0)
    paper_narrow, paper_wide = first_row(base * 0.1, "paper"), first_row(base * 10, "paper")
    # paper: spread (max - min)^2 / scale, so 0.06^2 / 2 (near uniform) against 6^2 / 2
    assert float(paper_narrow.max() - paper_narrow.min()) < 0.01
    assert float(paper_wide[0]) > 0.99
    with pytest.raises(ValueError, match="temperature_rule"):
        match(base, "vlsi", temperature_rule="sharp")
