"""`generation_config.json` sampling defaults: loaded, validated, and applied where requests'
`SamplingParams` are built (the HTTP body parser and `esp-run generate`) only to fields left out."""
from __future__ import annotations

import argparse

import pytest

from esp.cli.main import generate_params
from esp.engine.generation_defaults import GenerationDefaults, defaults_of
from esp.engine.sampling_params import SamplingParams
from esp.engine.server.errors import ApiError
from esp.engine.server.parsing import parse_job

QWEN = GenerationDefaults(temperature=0.7, top_p=0.8, top_k=20)


def sampling(params: SamplingParams) -> tuple:
    return params.temperature, params.top_p, params.top_k


def test_from_config_reads_the_three_fields_and_ignores_the_rest():
    config = {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
              "eos_token_id": [1, 2], "max_new_tokens": 9}
    assert GenerationDefaults.from_config(config) == QWEN  # do_sample is not read, as in vLLM
    assert GenerationDefaults.from_config({"temperature": None}) == GenerationDefaults()


@pytest.mark.parametrize("config, match", [
    ({"temperature": "hot"}, "temperature must be"), ({"top_p": 0}, "top_p must be in"),
    ({"top_k": 2.5}, "top_k must be an integer"), ({"temperature": 1e-9}, "temperature must be"),
])
def test_values_sampling_params_refuses_name_the_file(config, match):
    with pytest.raises(ValueError, match=f"^/m/generation_config.json: {match}"):
        GenerationDefaults.from_config(config, "/m/generation_config.json")


def test_sampling_params_fills_only_what_is_left_out():
    assert sampling(QWEN.sampling_params()) == (0.7, 0.8, 20)
    assert sampling(QWEN.sampling_params(temperature=0, top_p=None, top_k=0)) == (0, 0.8, 0)
    assert sampling(GenerationDefaults(top_p=0.5).sampling_params(temperature=None)) == (1.0, 0.5, 0)
    assert GenerationDefaults().sampling_params(max_tokens=3, seed=1) == SamplingParams(max_tokens=3, seed=1)


def test_defaults_of_a_tokenizer_without_any():
    assert defaults_of(object()) == GenerationDefaults()
    assert defaults_of(argparse.Namespace(generation_defaults=QWEN)) is QWEN


@pytest.mark.parametrize("chat", [False, True])
def test_request_bodies_take_the_models_defaults_for_fields_they_leave_out(chat):
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    job = parse_job(base, chat, {"m"}, QWEN)
    assert sampling(job.params) == (0.7, 0.8, 20)
    job = parse_job({**base, "temperature": 0, "top_k": 0, "top_p": None}, chat, {"m"}, QWEN)
    assert sampling(job.params) == (0, 0.8, 0)
    assert sampling(parse_job(base, chat, {"m"}).params) == (1.0, 1.0, 0)
    with pytest.raises(ApiError, match="top_p must be"):
        parse_job({**base, "top_p": 0}, chat, {"m"}, QWEN)


def test_cli_generate_is_greedy_unless_the_model_or_a_flag_says_otherwise():
    flags = dict(max_tokens=4, temperature=None, top_p=None, top_k=None, seed=None, ignore_eos=False, stop=[])
    assert sampling(generate_params(argparse.Namespace(**flags), GenerationDefaults())) == (0.0, 1.0, 0)
    assert sampling(generate_params(argparse.Namespace(**flags), QWEN)) == (0.7, 0.8, 20)
    given = argparse.Namespace(**{**flags, "temperature": 0.0, "top_k": 5})
    assert sampling(generate_params(given, QWEN)) == (0.0, 0.8, 5)
