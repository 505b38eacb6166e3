"""The KV-cache keyword: each transformers release gets the name its ``forward`` takes."""

from __future__ import annotations

import warnings

import torch

from lmdistill.generation import SamplingConfig, generate
from lmdistill.models import load_model
from lmdistill.models.kv_cache import cache_kwargs
from lmdistill.decoding import ChatEngine


class NewStyle(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return cache


class OldStyle(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return past_key_values


class PeftLike(torch.nn.Module):  # PEFT's wrapper takes **kwargs; the base model's signature decides
    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


def test_keyword_follows_the_forward_signature():
    marker = object()
    for model in (NewStyle(), OldStyle(), PeftLike(NewStyle()), PeftLike(OldStyle())):
        assert model(**cache_kwargs(model, marker)) is marker
    assert list(cache_kwargs(PeftLike(OldStyle()), None)) == ["past_key_values"]


def test_hf_decoder_and_server_use_the_current_keyword(model_dirs, tokenizer):
    """No deprecation warning for the cache argument from the HF decoder or the chat server's decode loop."""
    model = load_model(model_dirs["student"])
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("Hi")["input_ids"]]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        generate(model, prompts, "student", config=SamplingConfig(max_new_tokens=4, seed=0, decoder="hf"),
                 pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
        list(ChatEngine(model, tokenizer).stream([{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0))
    cache_warnings = [w for w in seen if "past_key_values" in str(w.message) or "cache" in str(w.message).lower()]
    assert not cache_warnings, [str(w.message) for w in cache_warnings]
