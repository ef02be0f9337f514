"""Data mixing: weights from sizes, and a sampler whose empirical frequencies match the weights."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from mmbridge_ref.data.mixing import FLAMINGO_WEIGHTS, MixtureSampler, mixture_weights, normalise_weights


def _within(freq: dict, weights: dict, draws: int, sigmas: float = 5.0):
    for k, p in weights.items():
        se = math.sqrt(p * (1 - p) / draws)
        assert abs(freq[k] - p) <= sigmas * se + 1e-12, (k, freq[k], p, se)


def test_flamingo_frequencies_match_the_documented_weights():
    mix = MixtureSampler(FLAMINGO_WEIGHTS, seed=0)
    total = sum(FLAMINGO_WEIGHTS.values())
    expected = {k: w / total for k, w in FLAMINGO_WEIGHTS.items()}
    assert mix.weights == pytest.approx(expected)
    _within(mix.frequencies(500, 64), expected, 500 * 64)
    assert mix.frequencies(500, 64)["VTP"] > 0  # the smallest weight is drawn, not rounded away


def test_sqrt_rule_against_hand_values():
    w = mixture_weights({"a": 100, "b": 400, "c": 2500})  # √: 10, 20, 50
    assert w == pytest.approx({"a": 0.125, "b": 0.25, "c": 0.625})
    assert mixture_weights({"a": 100, "b": 400}, "size") == pytest.approx({"a": 0.2, "b": 0.8})
    assert mixture_weights({"a": 100, "b": 400}, "uniform") == pytest.approx({"a": 0.5, "b": 0.5})
    mix = MixtureSampler(w, seed=5)
    _within(mix.frequencies(400, 50), w, 400 * 50)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 10**6), min_size=1, max_size=6), st.integers(0, 10**6))
def test_sqrt_frequencies_property(sizes, seed):
    w = mixture_weights(sizes, "sqrt")
    assert sum(w.values()) == pytest.approx(1.0)
    _within(MixtureSampler(w, seed=seed).frequencies(100, 100), w, 100 * 100)


def test_a_zero_weight_is_never_drawn():
    mix = MixtureSampler({"a": 1.0, "never": 0.0}, seed=1)
    assert mix.frequencies(50, 32)["never"] == 0.0


def test_draws_are_a_pure_function_of_seed_and_step():
    a, b = MixtureSampler(FLAMINGO_WEIGHTS, seed=3), MixtureSampler(FLAMINGO_WEIGHTS, seed=3)
    assert [a.draw(s, 8) for s in (5, 2, 9)] == [b.draw(s, 8) for s in (5, 2, 9)]  # order of calls does not matter
    assert a.draw(5, 8) != a.draw(6, 8)
    drawn = [d for s in range(40) for d in a.draw(s, 8)]
    assert len(set(drawn)) == len(drawn)  # each (source, index) drawn once


@pytest.mark.parametrize("call, needle", [
    (lambda: normalise_weights({}), "empty"),
    (lambda: normalise_weights({"a": -0.5}), "-0.5"),
    (lambda: normalise_weights({"a": float("nan")}), "nan"),
    (lambda: normalise_weights({"a": 0, "b": 0}), "sum to 0"),
    (lambda: mixture_weights({"a": 10}, rule="log"), "rule='log'"),
    (lambda: mixture_weights({"a": 0}), "'a'"),
    (lambda: mixture_weights({"a": 2.5}), "2.5"),
    (lambda: MixtureSampler({"a": 1.0}).draw(0, 0), "n=0"),
])
def test_bad_input_names_the_value(call, needle):
    with pytest.raises(ValueError, match=None) as e:
        call()
    assert needle in str(e.value)
