"""MODEL arguments of ``lmdistill eval``: display names, API specs, folders, seeds."""

from __future__ import annotations

import pytest

from lmdistill.errors import ConfigError
from lmdistill.evaluate.predictors import derive_seed, parse_model_spec, parse_model_specs, safe_name, sample_key


def test_names_and_sources(tmp_path):
    folder = tmp_path / "runs" / "student-final"
    folder.mkdir(parents=True)
    plain = parse_model_spec(str(folder))
    assert (plain.name, plain.source) == ("student-final", str(folder))
    named = parse_model_spec(f"mine={folder}")
    assert (named.name, named.source, named.is_api) == ("mine", str(folder), False)
    hub = parse_model_spec("Qwen/Qwen2.5-0.5B")
    assert hub.name == "Qwen/Qwen2.5-0.5B" and hub.dirname == "Qwen_Qwen2.5-0.5B"
    api = parse_model_spec("openai:gpt-4o-mini@https://api.example.com/v1")
    assert (api.name, api.is_api) == ("gpt-4o-mini", True)
    named_api = parse_model_spec("judge=openai:m@http://127.0.0.1:8000/v1")
    assert (named_api.name, named_api.source) == ("judge", "openai:m@http://127.0.0.1:8000/v1")
    odd = tmp_path / "a=b"  # an existing path containing "=" is a path, not NAME=MODEL
    odd.mkdir()
    assert parse_model_spec(str(odd)).source == str(odd)


def test_bad_specs():
    for bad in ("openai:no-at-sign", "openai:@http://x/v1", "openai:m@", "  "):
        with pytest.raises(ConfigError):
            parse_model_spec(bad)
    with pytest.raises(ConfigError, match="two models share the name 'x'"):
        parse_model_specs(["x=a", "x=b"])
    assert safe_name("../..") == "model" and safe_name("a b/c") == "a_b_c"


def test_seed_derivations_are_stable_and_distinct():
    assert derive_seed(10, "dolly-1", "0") == derive_seed(10, "dolly-1", "0")
    assert len({derive_seed(s, i, "0") for s in (10, 20) for i in ("a", "b")}) == 4
    assert 0 <= derive_seed(10, "x") < 2 ** 63
    assert sample_key(10, "a") != sample_key(20, "a") != sample_key(10, "a", 1)
    assert sample_key(10, "a") == sample_key(10, "a", 0) < 2 ** 64
