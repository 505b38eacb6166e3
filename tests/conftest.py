"""Shared fixtures: real HF-format tiny models built once per test session (per xdist worker)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lmdistill.models import build_model, build_tokenizer  # noqa: E402

torch.set_num_threads(1)  # tiny models: more threads only contend (two xdist workers on two cores)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """Folders of HF models: ``teacher`` (micro, seed 1), ``student`` (micro, seed 2),
    ``padded_student`` (micro with the embedding padded to 4160 rows)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {"teacher": root / "teacher", "student": root / "student", "padded_student": root / "padded"}
    build_model("micro", dirs["teacher"], tokenizer=tokenizer, seed=1)
    build_model("micro", dirs["student"], tokenizer=tokenizer, seed=2)
    build_model("micro", dirs["padded_student"], tokenizer=tokenizer, seed=3, pad_vocab_to=len(tokenizer) + 64)
    return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(scope="module")
def models(model_dirs):
    """The tiny models loaded (``student``, ``teacher``, ...), once per module (tests may put them in eval mode)."""
    from lmdistill.models import load_model

    return {k: load_model(v) for k, v in model_dirs.items()}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Four prompts of different lengths (so a batch has left padding)."""
    texts = ["Give three tips for staying healthy.", "Hi", "What is the capital of France? Answer briefly please.",
             "Write a poem"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def teacher_server(model_dirs):
    """``lmdistill serve``'s app for the micro teacher on a local port (model name ``teacher``, logprobs up to the
    whole vocabulary): a served teacher (``teacher=openai:teacher@URL``) for the tests."""
    from lmdistill.models import load_model_and_tokenizer
    from lmdistill.serve import ServerThread, create_app

    model, tok = load_model_and_tokenizer(model_dirs["teacher"])
    app = create_app(model, tok, model_name="teacher", max_logprobs=len(tok))
    with ServerThread(app) as srv:
        yield srv
