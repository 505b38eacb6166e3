"""Instruction data: loading and validation, prompt templates, tokenisation, collation, bundled benchmarks."""

from lmdistill.data.collate import IGNORE_INDEX, collate_for_generation, collate_for_training
from lmdistill.data.records import Example, LoadResult, load_examples, load_file
from lmdistill.data.registry import BENCHMARKS, EVAL_BENCHMARKS, resolve
from lmdistill.data.templates import format_prompt
from lmdistill.data.tokenize import (FilterReport, TokenizedExample, filter_empty_outputs, tokenize_example,
                                     tokenize_examples)

__all__ = [
    "BENCHMARKS", "EVAL_BENCHMARKS", "Example", "FilterReport", "IGNORE_INDEX", "LoadResult", "TokenizedExample",
    "collate_for_generation", "collate_for_training", "filter_empty_outputs", "format_prompt", "load_examples",
    "load_file", "resolve", "tokenize_example", "tokenize_examples",
]
