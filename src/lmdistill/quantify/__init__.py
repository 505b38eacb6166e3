"""Distillation quantification (arXiv 2501.12619): ICE, RSE and the white-box degree.

- ``ice``: identity consistency evaluation (GPTFuzz search with MCTS-Explore, loose/strict/hard scores).
- ``identity`` / ``judges``: the rule-based and LLM identity judges, agreement with the labelled set.
- ``rse`` / ``similarity``: response similarity, LLM-judged and judge-free.
- ``whitebox``: teacher-student KL and top-1 agreement for local pairs.
- ``report``: markdown tables and PNG charts.

The model clients and the response cache they use live in ``lmdistill.clients`` (evaluation uses them too).
"""
