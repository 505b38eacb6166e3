"""A byte-level BPE tokenizer trained locally on the bundled Dolly train text.

Saved as a Hugging Face folder (``tokenizer.json`` + config) that ``AutoTokenizer.from_pretrained``
loads; it has pad, eos and bos tokens and a chat template, like a hub tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmdistill.data.registry import resolve

PAD, EOS, BOS = "<|pad|>", "<|endoftext|>", "<|startoftext|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = [PAD, EOS, BOS, USER, ASSISTANT, SYSTEM, END]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def training_texts(limit: int | None = None) -> list[str]:
    texts = []
    with open(resolve("dolly", "train"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            texts.append("\n".join(row[k] for k in ("instruction", "input", "output") if row.get(k)))
    return texts


def train_tokenizer(vocab_size: int = 4096, *, limit: int | None = None):
    """Train the byte-level BPE on Dolly train and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_texts(limit), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=None, additional_special_tokens=[USER, ASSISTANT, SYSTEM, END],
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.model_max_length = 1024
    return fast


_CACHE: dict[tuple, object] = {}


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 4096):
    """The shared tokenizer (trained once per process), optionally saved to ``out_dir``."""
    key = (vocab_size,)
    if key not in _CACHE:
        _CACHE[key] = train_tokenizer(vocab_size)
    tok = _CACHE[key]
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def train_sp_tokenizer(vocab_size: int = 600, *, limit: int | None = 2000):
    """A tokenizer of another family than :func:`train_tokenizer`'s, for a teacher whose tokenizer differs from the
    student's (``teacher=xtok:...``): SentencePiece-style BPE as Gemma's (``▁`` for spaces, ``<0xNN>`` byte fallback,
    Gemma's decoder, ``<bos>`` before every text, no chat template) with its own special tokens (``<pad>``, ``<eos>``,
    ``<bos>``, ``<unk>``), trained on the first ``limit`` Dolly train texts with an alphabet of 80 characters, so CJK,
    emoji and accents fall back to bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  limit_alphabet=80, show_progress=False)
    tok.train_from_iterator(training_texts(limit), trainer=trainer)
    spec = json.loads(tok.to_str())
    for b in range(256):   # the byte-fallback pieces, as SentencePiece models have them
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.model_max_length = 1024
    return fast
