"""lmdistill: distill large language models and measure how distilled a model is."""

__version__ = "0.1.0"
