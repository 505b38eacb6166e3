"""A lean forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) with a preallocated KV cache.

Why: a decode step of a small model spends most of its time in framework overhead, not arithmetic.
Through ``model(...)`` one step of tiny-student costs about 2.4 ms on one CPU thread (module dispatch,
the 4-D mask rebuilt every step, ``DynamicCache`` concatenation); the same arithmetic written out as
functions over the model's own weights costs about 1 ms. Every on-policy method decodes token by token,
so this is the speed of GKD, ImitKD, DistiLLM, SWITCH and SCRG.

What it computes is the model's own forward, layer by layer, from the HF modules' parameters (read at
every call, never copied, so a model that trains between generations is always current):

    x = embed(ids)
    per layer:  h = rms(x) * w_in;  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
                (Qwen3: q, k = rms(q) * w_qn, rms(k) * w_kn per head)
                q, k = rope(q, pos), rope(k, pos);  K, V <- cache columns [start, start + T)
                x = x + softmax(q K^T * scaling + mask) V Wo
                h = rms(x) * w_post;  x = x + (act(h Wg) * (h Wu)) Wd
    logits = f((rms(x) * w_norm) W_head)      f: what the model's forward applies after its head (none for these
                                              families; ``losses.model_logits``)

with rms(x) computed in float32 as the HF modules do, the cos/sin table taken from the model's own
rotary module (all static RoPE types), and the same attention mask semantics: a query attends to the
non-padding columns up to its own. Tests check it against the model's forward (allclose) for every
supported family, with left padding, grouped-query attention, biases and q/k norms.

Anything it does not recognise (another architecture, LoRA-wrapped or quantised linears, hooks from
offloading, sliding windows shorter than the sequence, dynamic RoPE) gets ``None`` from
``unsupported_reason`` and runs through the HF forward instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmdistill.losses.model_logits import logit_transform, require_logit_transform

FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _layers(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None), inner


def _sliding_window(model, attn) -> int | None:
    if model.config.model_type == "mistral":
        return getattr(model.config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def unsupported_reason(model, total_len: int) -> str | None:
    """Why ``model`` cannot run on the fast path for sequences of ``total_len`` tokens (``None``: it can)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not one of {sorted(FAMILIES)}"
    if logit_transform(model) is None:
        return f"model type {model_type!r}: what its forward does to the logits after the LM head is unknown"
    layers, inner = _layers(model)
    if layers is None or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return "not a *ForCausalLM with model.layers and lm_head"
    if type(inner.embed_tokens) is not torch.nn.Embedding:
        return f"embedding is {type(inner.embed_tokens).__name__}"
    rope_type = getattr(inner.rotary_emb, "rope_type", None)
    if rope_type not in STATIC_ROPE:
        return f"RoPE type {rope_type!r} is not a static one ({sorted(STATIC_ROPE)})"
    for module in model.modules():
        if getattr(module, "_hf_hook", None) is not None or module._forward_hooks or module._forward_pre_hooks:
            return f"{type(module).__name__} has forward hooks (offloading or instrumentation)"
    for i, layer in enumerate(layers):
        for part, names in _LINEARS.items():
            for name in names:
                lin = getattr(getattr(layer, part, None), name, None)
                if type(lin) is not torch.nn.Linear:
                    return f"layer {i} {part}.{name} is {type(lin).__name__}, not a plain Linear (LoRA, quantised?)"
        window = _sliding_window(model, layer.self_attn)
        if window is not None and window < total_len:
            return f"layer {i} uses a sliding window of {window} < {total_len} tokens"
    return None


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """``LlamaRMSNorm``: normalise in float32, cast back, scale."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class FastDecoder:
    """The forward pass above for one batch, with its KV cache: ``capacity`` columns per row.

    ``forward(ids [b, T], positions [b, T], start, allowed [b, W])`` writes the new keys and values to
    columns ``start .. start + T - 1`` of the first ``b <= B`` rows and attends over columns
    ``< W = start + T`` where ``allowed`` is true (and causally within the new block). Cropping is free:
    the caller just writes over old columns, and rows it leaves out keep theirs (``reorder`` moves rows).
    """

    def __init__(self, model, batch: int, capacity: int, max_position: int):
        self.model = model
        self.layers, inner = _layers(model)
        self.inner = inner
        cfg = model.config
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.qk_norm = hasattr(attn, "q_norm")
        self.transform = require_logit_transform(model, "the fast decoder")  # the forward's steps after the head
        self.batch, self.capacity = batch, capacity
        device = inner.embed_tokens.weight.device
        positions = torch.arange(max_position + 1, device=device)[None, :]
        probe = inner.embed_tokens.weight[:1]
        cos, sin = inner.rotary_emb(probe, positions)  # [1, L, D] in the model's dtype
        self.cos, self.sin = cos[0], sin[0]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.written = 0  # columns [0, written) have been filled at some point

    def _cache(self, like: torch.Tensor) -> None:
        shape = (self.batch, self.kv_heads, self.capacity, self.head_dim)
        self.keys = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in self.layers]

    def reorder(self, order: torch.Tensor) -> None:
        """Permute the cache's rows (row ``i`` becomes old row ``order[i]``), every column ever written
        (columns past the caller's current length may still be valid for rows it skips)."""
        moved = (order != torch.arange(order.numel(), device=order.device)).nonzero().squeeze(1)
        if moved.numel() == 0:
            return
        src = order[moved]
        for cache in (*self.keys, *self.values):   # only the rows that move (the right side is gathered first)
            cache[moved, :, :self.written] = cache[src, :, :self.written]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, allowed: torch.Tensor,
                keep: int = 0) -> torch.Tensor:
        b, t = ids.shape
        end = start + t
        if b > self.batch:
            raise ValueError(f"the KV cache holds {self.batch} rows, got {b}")
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} columns, asked to fill up to {end}")
        x = F.embedding(ids, self.inner.embed_tokens.weight)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, T, D]
        if t == 1:
            mask = allowed[:, None, None, :end]
        else:  # causal inside the new block; a query always sees itself (padding rows stay finite)
            col = torch.arange(end, device=ids.device)[None, :]
            row = torch.arange(start, end, device=ids.device)[:, None]
            mask = (allowed[:, None, :end] & (col <= row)[None]) | (col == row)[None]
            mask = mask[:, None]
        if not self.keys or self.keys[0].dtype != x.dtype:
            self._cache(x)
        self.written = max(self.written, end)

        def attend(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys[i][:b, :, start:end] = k
            self.values[i][:b, :, start:end] = v
            return self.keys[i][:b, :, :end], self.values[i][:b, :, :end]

        return self._layers(x, cos, sin, mask, attend, keep)

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, attend,
                keep: int) -> torch.Tensor:
        """The decoder layers and the head over ``x [b, T, H]``: ``attend(i, k, v)`` (rotated keys and values
        ``[b, KV, T, D]`` of layer ``i``) writes them to the cache and returns the keys and values to attend to."""
        b, t = x.shape[:2]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms(x, layer.input_layernorm)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(b, t, self.heads, self.head_dim)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(b, t, self.kv_heads, self.head_dim)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(b, t, self.kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
            q = _rotate(q.transpose(1, 2), cos, sin)
            keys, values = attend(i, _rotate(k.transpose(1, 2), cos, sin), v.transpose(1, 2))
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=self.kv_heads != self.heads)
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, -1), attn.o_proj.weight, attn.o_proj.bias)
            h = _rms(x, layer.post_attention_layernorm)
            up = F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + F.linear(mlp.act_fn(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)) * up,
                             mlp.down_proj.weight, mlp.down_proj.bias)
        if keep:
            x = x[:, -keep:]
        head = self.model.lm_head
        return self.transform(F.linear(_rms(x, self.inner.norm), head.weight, head.bias))

    # ---- rows as independent sequences (a serving batch) ------------------------------------------------------
    #
    # Row r holds one sequence of its own length: its tokens at columns (and positions) 0 .. n_r - 1, nothing
    # shared with the other rows. ``forward_rows`` appends tokens to each row at its own column, ``copy_row``
    # moves a sequence to another row (to keep the live rows first), ``grow`` widens every row. Columns a row
    # has not written are masked out; the cache starts zeroed so they never hold NaN (0 weight x NaN = NaN).

    def forward_rows(self, ids: torch.Tensor, starts: torch.Tensor, row0: int = 0, keep: int = 0) -> torch.Tensor:
        """Append ``ids [b, T]`` to cache rows ``row0 .. row0 + b - 1``: row r holds ``starts[r]`` columns of its
        own sequence, and its token t goes to column and position ``starts[r] + t``, attending to the row's
        columns up to its own. Returns the ``[b, keep or T, V]`` logits of the last ``keep`` tokens (0: all)."""
        b, t = ids.shape
        starts = starts.to(ids.device)
        cols = starts[:, None] + torch.arange(t, device=ids.device)[None, :]  # [b, T]
        width = int(cols.max()) + 1
        if row0 + b > self.batch:
            raise ValueError(f"the KV cache holds {self.batch} rows, asked for rows {row0}..{row0 + b - 1}")
        if width > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} columns, asked to fill up to {width}")
        x = F.embedding(ids, self.inner.embed_tokens.weight)
        cos, sin = self.cos[cols][:, None], self.sin[cols][:, None]  # [b, 1, T, D]
        mask = (torch.arange(width, device=ids.device)[None, None, :] <= cols[:, :, None])[:, None]  # [b, 1, T, W]
        rows = torch.arange(row0, row0 + b, device=ids.device)[:, None]  # [b, 1], broadcast against cols
        if not self.keys or self.keys[0].dtype != x.dtype:
            self._cache(x)
            for cache in (*self.keys, *self.values):
                cache.zero_()
        self.written = max(self.written, width)

        def attend(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys[i][rows, :, cols] = k.transpose(1, 2)  # [b, T, H, D] at each row's own columns
            self.values[i][rows, :, cols] = v.transpose(1, 2)
            return self.keys[i][row0:row0 + b, :, :width], self.values[i][row0:row0 + b, :, :width]

        return self._layers(x, cos, sin, mask, attend, keep)

    def copy_row(self, src: int, dst: int, columns: int) -> None:
        """Copy the first ``columns`` columns of cache row ``src`` over row ``dst``."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :columns] = cache[src, :, :columns]

    @property
    def max_position(self) -> int:
        """The largest position the RoPE table covers."""
        return self.cos.shape[0] - 1

    def grow(self, capacity: int) -> None:
        """Make every row ``capacity`` columns wide (never narrower), keeping all the columns written so far."""
        if capacity <= self.capacity:
            return
        self.capacity = capacity
        if not self.keys:
            return
        old = (*self.keys, *self.values)
        self._cache(old[0])
        for new, was in zip((*self.keys, *self.values), old):
            new.zero_()
            new[:, :, :self.written] = was[:, :, :self.written]
