"""SamplingParams: validation of every field, normalization, clone, generation-config defaults."""

from __future__ import annotations

import math

import pytest

from kestrel.sampling_params import SamplingParams

# (field, bad value): each must raise ValueError naming the field and the value.
INVALID = [
    ("n", 0),
    ("n", -3),
    ("n", 1.5),
    ("n", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", True),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("seed", 1.0),
    ("seed", "7"),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 3.0),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > default max_tokens = 16
    ("min_tokens", 1.0),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 5),
    ("stop_token_ids", [1, -1]),
    ("stop_token_ids", [1, 2.0]),
    ("stop_token_ids", 3),
    ("include_stop_str_in_output", 1),
    ("ignore_eos", "yes"),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", math.nan),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", 21),
    ("logit_bias", {5: 100.5}),
    ("logit_bias", {5: -101}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {5: "1"}),
    ("logit_bias", {5: 1.0, "5": 2.0}),
    ("logit_bias", [(5, 1.0)]),
    ("skip_special_tokens", None),
    ("spaces_between_special_tokens", 0),
    ("detokenize", "false"),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_raises_value_error_naming_field_and_value(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} = ") as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert repr(value) in message
    assert "allowed" in message


def test_min_tokens_above_explicit_max_tokens_names_the_limit():
    with pytest.raises(ValueError, match=r"min_tokens = 6 .*max_tokens \(5\)"):
        SamplingParams(max_tokens=5, min_tokens=6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 0, "top_p": 1.0, "top_k": -1, "min_p": 1.0},
        {"top_p": 1e-9, "top_k": 1, "min_p": 0.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"max_tokens": 5, "min_tokens": 5},
        {"max_tokens": None, "min_tokens": 10_000},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"logit_bias": {0: -100, 7: 100.0}},
        {"repetition_penalty": 1e-3},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        if key != "logit_bias":
            assert getattr(params, key) == value


def test_defaults_and_normalization():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k) == (1, 1.0, 1.0, 0)
    assert (params.max_tokens, params.min_tokens, params.seed) == (16, 0, None)
    assert params.stop == [] and params.stop_token_ids == [] and params.logit_bias == {}
    assert params.logprobs is None and params.prompt_logprobs is None
    assert params.skip_special_tokens and params.spaces_between_special_tokens
    assert params.detokenize and not params.ignore_eos and not params.include_stop_str_in_output

    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    bias = SamplingParams(logit_bias={"12": 1, 3: -2.5}).logit_bias
    assert bias == {12: 1.0, 3: -2.5}
    assert all(type(k) is int and type(v) is float for k, v in bias.items())


def test_containers_are_copied_not_shared():
    stop, ids, bias = ["x"], [1], {2: 1.0}
    params = SamplingParams(stop=stop, stop_token_ids=ids, logit_bias=bias)
    stop.append("y")
    ids.append(9)
    bias[3] = 2.0
    assert params.stop == ["x"] and params.stop_token_ids == [1] and params.logit_bias == {2: 1.0}


def test_is_greedy():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=5e-6).is_greedy  # below the sampler's 1e-5 cutoff
    assert not SamplingParams(temperature=1e-5).is_greedy
    assert not SamplingParams().is_greedy


def test_clone_applies_overrides_revalidates_and_does_not_share():
    base = SamplingParams(temperature=0.7, stop=["a"], logit_bias={1: 2.0}, seed=3)
    copy = base.clone(top_k=5)
    assert copy.top_k == 5 and copy.temperature == 0.7 and copy.seed == 3
    assert base.top_k == 0
    copy.stop.append("b")
    copy.logit_bias[4] = 1.0
    assert base.stop == ["a"] and base.logit_bias == {1: 2.0}
    with pytest.raises(ValueError, match="top_p"):
        base.clone(top_p=0.0)
    with pytest.raises(TypeError):
        base.clone(not_a_field=1)


def test_from_generation_config_takes_sampling_defaults():
    gen_cfg = {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "eos_token_id": [1, 2],
        "max_new_tokens": 99,
        "bos_token_id": 0,
    }
    params = SamplingParams.from_generation_config(gen_cfg)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    assert (params.min_p, params.repetition_penalty) == (0.05, 1.1)
    assert params.max_tokens == 16  # only the five sampling keys are taken
    assert not params.is_greedy


def test_from_generation_config_do_sample_false_means_greedy():
    gen_cfg = {"do_sample": False, "temperature": 0.6, "top_p": 0.9}
    params = SamplingParams.from_generation_config(gen_cfg)
    assert params.is_greedy and params.temperature == 0.0 and params.top_p == 0.9
    # do_sample true or missing keeps the config's temperature.
    for gen_cfg in ({"do_sample": True, "temperature": 0.6}, {"temperature": 0.6}):
        assert SamplingParams.from_generation_config(gen_cfg).temperature == 0.6


def test_from_generation_config_overrides_win_and_none_is_skipped():
    gen_cfg = {"do_sample": False, "temperature": 0.6, "top_k": 20, "top_p": None}
    params = SamplingParams.from_generation_config(gen_cfg, temperature=0.9, top_k=0, max_tokens=4)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.9, 0, 1.0, 4)
    assert SamplingParams.from_generation_config({}) == SamplingParams()


def test_from_generation_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"SamplingParams\.top_p = 1\.5"):
        SamplingParams.from_generation_config({"top_p": 1.5})
    with pytest.raises(TypeError, match="gen_cfg"):
        SamplingParams.from_generation_config(["temperature"])
