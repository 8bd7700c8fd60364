"""The one-kernel temperature / nucleus sampler (interpreter) against the distribution it names:
softmax(logits / T), restricted to the smallest most-probable set whose mass reaches top_p (the
token crossing it kept), renormalised. Each case draws n rows with distinct seeds: nothing may be
drawn outside the nucleus, and every token's frequency must lie within 4.5 binomial standard
deviations (+ 2e-3) of its probability (a false failure about once in 10^5 runs per token)."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.sample import nucleus_probs, nucleus_sample


@pytest.mark.parametrize("temperature,top_p,V,block,n", [
    (2.0, 0.8, 8, None, 1000),  # the nucleus cuts 2 of 8 tokens
    (0.7, 1.0, 8, None, 600),  # plain temperature sampling (no nucleus pass)
    (1.0, 0.9, 40, 16, 300),  # three blocks, the last one masked
])
def test_nucleus_sample_draws_its_distribution(temperature, top_p, V, block, n):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(V, generator=g) * 1.5
    if V == 8:
        logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9, 0.0])
    want = nucleus_probs(logits, temperature, top_p)
    seeds = torch.randint(0, 2**31 - 1, (n,), generator=g)
    draws = nucleus_sample(logits.expand(n, V), temperature, top_p, seeds, block=block)
    freq = torch.bincount(draws, minlength=V).float() / n
    assert freq.shape == (V,)
    assert (freq[want == 0] == 0).all(), "drew a token outside the nucleus"
    bound = 4.5 * (want * (1 - want) / n).sqrt() + 2e-3
    assert ((freq - want).abs() <= bound).all(), (freq, want)


def test_nucleus_sample_seeds_repeat_and_the_top_token_wins_a_small_nucleus():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9, 0.5]] * 6, dtype=torch.float16)
    seeds = torch.arange(6)
    a = nucleus_sample(logits, 1.0, 0.95, seeds)
    assert torch.equal(a, nucleus_sample(logits, 1.0, 0.95, seeds))  # same seeds, same draws
    assert set(a.tolist()) <= {1, 3, 4}  # mass 0.486 + 0.439 < 0.95, + 0.040 crosses it
    assert nucleus_sample(logits, 1.0, 0.3, seeds).tolist() == [1] * 6  # token 1 alone has mass >= 0.3


def test_nucleus_sample_rejects_greedy_settings():
    with pytest.raises(ValueError, match="temperature > 0"):
        nucleus_sample(torch.zeros(1, 4), 0.0, 0.9, torch.zeros(1, dtype=torch.long))


def test_nucleus_sample_keeps_every_token_tied_with_the_one_crossing_top_p():
    """Ties at the boundary are all kept (the mass strictly above each is 0 < top_p): a one-token
    nucleus of two equal top logits draws both, about half each."""
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]] * 200)
    draws = nucleus_sample(logits, 1.0, 1e-6, torch.arange(200))
    assert set(draws.tolist()) == {1, 2}
    assert 60 <= (draws == 1).sum().item() <= 140


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy: -inf - -inf
def test_nucleus_sample_ends_on_rows_without_a_distribution():
    """NaN or all -inf logits must not loop forever on the device: such rows return token 0."""
    logits = torch.tensor([[float("nan")] * 5, [float("-inf")] * 5, [0.0, 1.0, float("nan"), 2.0, 0.5]])
    out = nucleus_sample(logits, 1.0, 0.9, torch.arange(3))
    assert out.shape == (3,) and out[:2].tolist() == [0, 0] and 0 <= out[2].item() < 5


def test_nucleus_probs_reference_by_hand():
    """softmax([2, 1.5, 1.4, 0.3, ...]) = 0.337, 0.204, 0.185, ...: at top-p 0.7 the first two hold 0.541
    and the third crosses 0.7, so the nucleus is tokens 0-2, renormalised."""
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9, 0.0])
    p = logits.softmax(-1)
    want = torch.zeros(8)
    want[:3] = p[:3] / p[:3].sum()
    assert torch.allclose(nucleus_probs(logits, 1.0, 0.7), want)
    assert torch.allclose(nucleus_probs(logits, 1.0, 1.0), p)

