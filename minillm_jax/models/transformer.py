"""One config-driven decoder-only transformer in Flax NNX (GPT-2, OPT, Llama/Mistral/SmolLM2, Qwen2).

Shapes: B batch, T new tokens, S key slots (the whole sequence, or the KV cache), D hidden, E word
embedding (= D except OPT's projected embeddings), H query heads, K kv heads, G = H/K, Dh head dim,
F mlp, V vocab (as stored, padding included), L layers, P learned positions.

Layers are stacked on a leading `layers` axis and applied with `lax.scan`, so compile time does not grow
with depth (`ModelConfig.scan_layers` False unrolls passes without a cache; a decode loop may take per-layer
copies of the weights once, `Transformer.decode_weights`, and unroll its steps over them). Positions count
real tokens only (left padding is free), as HF does with `position_ids = cumsum(mask) - 1`. Attention goes
through `jax.nn.dot_product_attention` with one boolean mask (padding, causality, sliding windows), with
XLA's implementation or cuDNN's (`ModelConfig.attention`), except on CPU, over a KV cache and with attention
dropout (an explicit XLA softmax attention: faster on CPU, and the only one with dropout).
"""

from __future__ import annotations

import functools
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from minillm_jax.models.config import ModelConfig, rope_inverse_frequencies

_MASKED = -1e30  # finite so fully masked rows (left padding) stay NaN-free


def _param(value, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter with logical axis names; `sharding.py` maps them onto the mesh."""
    assert value.ndim == len(axes), (value.shape, axes)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(variable.get_metadata().get("out_sharding") or ())


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, written slot by slot; passed in and out explicitly. Heads before
    slots, so attention reads each head's keys and values as contiguous [S, Dh] matrices (no transposed
    copy of the cache per decode step)."""

    k: Float[Array, "L B K S Dh"]
    v: Float[Array, "L B K S Dh"]
    mask: Bool[Array, "B S"]  # the slot holds a real token
    positions: Int[Array, "B S"]  # position of the token in each slot
    lengths: Int[Array, " B"]  # real tokens so far: the next token's position
    index: Int[Array, ""]  # next free slot (shared by all rows)
    # an int8 cache (init_cache(dtype="int8")): each slot's key and value vector of a layer, row and kv head is
    # stored as int8 over its own scale, its largest magnitude / 127; here the scales, float32, the keys' then
    # the values' (one array: one more write per layer and step; slots last: each read contiguous); None in a
    # float cache
    scales: Float[Array, "L B K 2 S"] | None = None

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def arrays(self) -> tuple:
        """What the layers write and read: (k, v), and an int8 cache's scales after them."""
        return (self.k, self.v) if self.scales is None else (self.k, self.v, self.scales)

    def with_arrays(self, arrays: tuple) -> "KVCache":
        return self.replace(**dict(zip(("k", "v", "scales"), arrays)))


def _quantized(x: Float[Array, "... Dh"]) -> tuple[Int[Array, "... Dh"], Float[Array, "..."]]:
    """int8 values and float32 scales of vectors along the last axis: x ~ values * scale, each vector over its
    own largest magnitude / 127 (round to nearest; a zero vector gets scale 0)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    values = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(values, -127, 127).astype(jnp.int8), scale


def _cache_written(arrays: tuple, new: tuple, start: tuple) -> tuple:
    """KVCache.arrays with the new keys and values `new` ([L', B, K, T, Dh] each) written at `start` (layer, 0, 0,
    slot, 0), quantized first for an int8 cache."""
    if len(arrays) == 2:
        return tuple(jax.lax.dynamic_update_slice(whole, part.astype(whole.dtype), start)
                     for whole, part in zip(arrays, new))
    (k, k_scale), (v, v_scale) = (_quantized(x) for x in new)
    layer, _, _, slot, _ = start
    return (jax.lax.dynamic_update_slice(arrays[0], k, start), jax.lax.dynamic_update_slice(arrays[1], v, start),
            jax.lax.dynamic_update_slice(arrays[2], jnp.stack([k_scale, v_scale], axis=-2), (layer, 0, 0, 0, slot)))


DECODE_VOCAB_MULTIPLE = 128  # decode steps' logits: a multiple of this many ids by default (decode_weights)


@flax.struct.dataclass
class DecodeWeights:
    """What a decode loop takes from a model once, before its steps (`Transformer.decode_weights`), and passes
    to every `decode_step`."""

    # the unembedding with its vocabulary padded to `decode_vocab_size` ids (None: that already).
    # XLA pads a matmul operand for cuBLAS's bf16 kernels itself, inside the loop (GPT-2's [50257, 768]
    # embedding copied at every decode step: bench/gpu_hlo.py); whole blocks of ids are also what the
    # sampler's two-level draw (sampling._block_draw) reshapes the logits into, without a copy
    unembedding: Float[Array, "Vd E"] | Float[Array, "E Vd"] | None
    layers: tuple[dict, ...] | None  # Transformer.decode_weights(split_layers=True); None: the layer scan


def mask_padded_vocab(logits: Float[Array, "... V"], num_real_tokens: int) -> Float[Array, "... V"]:
    """Push logits of padded vocabulary ids (at or beyond the tokenizer's size) to a huge negative."""
    if num_real_tokens >= logits.shape[-1]:
        return logits
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < num_real_tokens, logits, _MASKED)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(ids, mask)` -> float32 logits; `prefill`/`decode_step` use a KVCache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        pdtype = jnp.dtype(c.param_dtype)
        L, D, E, F, V = c.num_layers, c.hidden_size, c.word_dim, c.intermediate_size, c.vocab_size
        H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim

        def normal(*shape):
            return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(pdtype)

        def ones(*shape):
            return jnp.ones(shape, pdtype)

        def zeros(*shape):
            return jnp.zeros(shape, pdtype)

        self.embed_tokens = _param(normal(V, E), ("vocab", "embed"))
        if c.positions == "learned":
            self.embed_positions = _param(normal(c.max_position_embeddings + c.position_offset, D), (None, "embed"))
        if c.embed_dim is not None and c.embed_dim != D:
            self.project_in = _param(normal(E, D), ("embed", None))
            self.project_out = _param(normal(D, E), (None, "embed"))
        if not c.tie_word_embeddings:
            self.lm_head = _param(normal(E, V), ("embed", "vocab"))
        if c.final_norm:
            self.final_norm_scale = _param(ones(D), ("embed",))
            if c.norm == "layernorm":
                self.final_norm_bias = _param(zeros(D), ("embed",))

        layer = {
            "attn_norm_scale": (ones(L, D), ("layers", "embed")),
            "q_proj": (normal(L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
            "k_proj": (normal(L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
            "v_proj": (normal(L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
            "o_proj": (normal(L, H, Dh, D), ("layers", "heads", "head_dim", "embed")),
            "mlp_norm_scale": (ones(L, D), ("layers", "embed")),
            "up_proj": (normal(L, D, F), ("layers", "embed", "mlp")),
            "down_proj": (normal(L, F, D), ("layers", "mlp", "embed")),
        }
        if c.norm == "layernorm":
            layer["attn_norm_bias"] = (zeros(L, D), ("layers", "embed"))
            layer["mlp_norm_bias"] = (zeros(L, D), ("layers", "embed"))
        if c.qkv_bias:
            layer["q_bias"] = (zeros(L, H, Dh), ("layers", "heads", "head_dim"))
            layer["k_bias"] = (zeros(L, K, Dh), ("layers", "kv_heads", "head_dim"))
            layer["v_bias"] = (zeros(L, K, Dh), ("layers", "kv_heads", "head_dim"))
        if c.out_bias:
            layer["o_bias"] = (zeros(L, D), ("layers", "embed"))
        if c.gated_mlp:
            layer["gate_proj"] = (normal(L, D, F), ("layers", "embed", "mlp"))
        if c.mlp_bias:
            layer["up_bias"] = (zeros(L, F), ("layers", "mlp"))
            layer["down_bias"] = (zeros(L, D), ("layers", "embed"))
            if c.gated_mlp:
                layer["gate_bias"] = (zeros(L, F), ("layers", "mlp"))
        self.layers = nnx.Dict({name: _param(value, axes) for name, (value, axes) in sorted(layer.items())})

    # ------------------------------------------------------------------ public API

    def __call__(
        self, input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None = None, *,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T V"]:
        return self.unembed(self.hidden_states(input_ids, attention_mask, dropout_rng=dropout_rng))

    def hidden_states(self, input_ids, attention_mask=None, *, dropout_rng: jax.Array | None = None
                      ) -> Float[Array, "B T E"]:
        """Final hidden states before the vocabulary projection (for chunked logits in losses).
        With `dropout_rng`, the config's dropout rates apply (training); without, none (evaluation)."""
        input_ids, mask, positions = _prepare(input_ids, attention_mask, first_position=0)
        hidden, _ = self._run(input_ids, mask, positions, dropout_rng=dropout_rng)
        return hidden

    def unembed(self, hidden: Float[Array, "B T E"], head=None) -> Float[Array, "B T V"]:
        """Vocabulary logits in float32 (padded ids included; see `mask_padded_vocab`); `head`: another
        unembedding of the same layout (DecodeWeights.unembedding)."""
        operands = self.config.matmul_dtype
        if self.config.tie_word_embeddings:
            return _dot("bte,ve->btv", hidden, self.embed_tokens[...] if head is None else head, jnp.float32,
                        operands)
        return _dot("bte,ev->btv", hidden, self.lm_head[...] if head is None else head, jnp.float32, operands)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of keys and values in `dtype` (default: the compute dtype); "int8" stores each slot's
        vectors as int8 with a float32 scale each (KVCache.scales): about half the bytes of bfloat16 for each
        decode step's attention to read, keys and values rounded to 1/254 of their largest element."""
        c = self.config
        shape = (c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim)
        dtype = jnp.dtype(dtype or c.dtype)
        if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.int8):
            raise ValueError(f"init_cache dtype {dtype}: expected a float dtype or int8")
        scales = dict(scales=jnp.zeros((*shape[:3], 2, max_length), jnp.float32)) if dtype == jnp.int8 else {}
        return KVCache(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch_size, max_length), bool),
            positions=jnp.zeros((batch_size, max_length), jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32), **scales,
        )

    def prefill(
        self, input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None, cache: KVCache, *,
        empty_cache: bool = False, last_only: bool = False, visible: int | None = None,
        weights: DecodeWeights | None = None,
    ) -> tuple[Float[Array, "B T V"], KVCache]:
        """Run T tokens against the cache (prompt or chunk); writes slots [index, index + T).

        Each layer writes its new keys and values into the cache (carried through the layer scan, so a
        decode step updates one slot in place rather than copying the cache) and attends over the cache.
        `empty_cache=True` (a fresh cache, the usual prompt prefill) attends over the new tokens alone and
        writes the cache once afterwards. `last_only=True` returns only the last position's logits
        [B, 1, V] (all a sampler needs after the prompt), skipping the [B, T, V] unembedding of the rest.
        `visible` (static): attend over the cache's first `visible` slots only, and read only those; the caller
        promises that the new tokens' slots and every filled one lie below it. `weights` (this model's
        `decode_weights()`, taken before a decode loop; not with `empty_cache`): unembed with its head, whose
        padded ids come out as extra logit columns for the caller to drop, and run the layers unrolled over
        its per-layer arrays if it has them."""
        input_ids, mask, positions = _prepare(input_ids, attention_mask, first_position=cache.lengths[:, None])
        start = cache.index
        slots = dict(mask=jax.lax.dynamic_update_slice(cache.mask, mask, (0, start)),
                     positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, start)),
                     lengths=cache.lengths + mask.sum(axis=1, dtype=jnp.int32), index=start + input_ids.shape[1])
        if empty_cache:
            hidden, new = self._run(input_ids, mask, positions, collect_kv=True)
            new = tuple(jnp.swapaxes(x, 2, 3) for x in new)  # [L B K T Dh]
            cache = cache.replace(**slots).with_arrays(_cache_written(cache.arrays, new, (0, 0, 0, start, 0)))
        else:
            cache = cache.replace(**slots)
            hidden, kv = self._run(input_ids, mask, positions, cache=cache, start=start, visible=visible,
                                   layers=None if weights is None else weights.layers)
            cache = cache.with_arrays(kv)
        head = None if weights is None else weights.unembedding
        return self.unembed(hidden[:, -1:] if last_only else hidden, head), cache

    def decode_step(self, tokens: Int[Array, " B"], cache: KVCache, visible: int | None = None,
                    weights: DecodeWeights | None = None) -> tuple[Float[Array, "B V"], KVCache]:
        """One new token per row; returns next-token logits [B, V] ([B, decode_vocab_size(multiple)] with the
        `weights` of `decode_weights(..., multiple)`) and the advanced cache (`visible`, `weights`: as
        `prefill`'s)."""
        logits, cache = self.prefill(jnp.asarray(tokens)[:, None], None, cache, visible=visible, weights=weights)
        return logits[:, 0], cache

    def decode_vocab_size(self, multiple: int = DECODE_VOCAB_MULTIPLE) -> int:
        """How many logits a decode step over `decode_weights(..., multiple)` gives a row: the vocabulary rounded
        up to a whole multiple of `multiple` ids (the extra ones after the real ones)."""
        return -(-self.config.vocab_size // multiple) * multiple

    def decode_weights(self, split_layers: bool = False, multiple: int = DECODE_VOCAB_MULTIPLE) -> DecodeWeights:
        """What a decode loop takes once before it starts and passes to every `decode_step`: the unembedding
        padded to `decode_vocab_size(multiple)` ids (if it is not that already: a multiple of 8 at least keeps
        XLA from padding it for cuBLAS at every step), and with `split_layers` the layers' weights
        as one dict of arrays per layer (SamplingConfig.split_layers), over which the steps then run the layers
        unrolled."""
        c = self.config
        head = self.embed_tokens[...] if c.tie_word_embeddings else self.lm_head[...]
        pad = self.decode_vocab_size(multiple) - c.vocab_size
        if pad:
            head = jnp.pad(head, ((0, pad), (0, 0)) if c.tie_word_embeddings else ((0, 0), (0, pad)))
        return DecodeWeights(unembedding=head if pad else None, layers=self._split_layers() if split_layers else None)

    def _split_layers(self) -> tuple[dict, ...]:
        """The layer weights as one dict of arrays per layer (DecodeWeights.layers). A layer scan slices each
        layer's weights out of the stacks at every step, and a GPU does that as copies ahead of the matmuls;
        XLA also joins the query, key and value projections (and a gated MLP's gate and up) into one matmul by
        concatenating their weights, again every step. Here both happen once: the dicts hold `qkv_proj`
        [E, G + 2, K, Dh] (the G query blocks of the key/value heads, then the keys, then the values: a
        tensor-parallel K axis stays where it was, and the queries are one block of a row; the biases stay
        apart, added after the split where each fuses into its consumer) and `gate_up_proj` [E, 2, F]
        (`gate_up_bias` [2, F]) in place of the separate weights. Costs a second copy of the layer weights
        while the loop runs."""
        c = self.config
        K, G, Dh = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        stacked = {name: p[...] for name, p in self.layers.items()}
        stacked["qkv_proj"] = jnp.concatenate(  # query head k * G + g at [g, k]
            [jnp.swapaxes(stacked.pop("q_proj").reshape(c.num_layers, -1, K, G, Dh), 2, 3),
             stacked.pop("k_proj")[:, :, None], stacked.pop("v_proj")[:, :, None]], axis=2)
        if c.gated_mlp:
            stacked["gate_up_proj"] = jnp.stack([stacked.pop("gate_proj"), stacked.pop("up_proj")], axis=2)
            if c.mlp_bias:
                stacked["gate_up_bias"] = jnp.stack([stacked.pop("gate_bias"), stacked.pop("up_bias")], axis=1)
        return tuple({name: value[i] for name, value in stacked.items()} for i in range(c.num_layers))

    # ------------------------------------------------------------------ internals

    def _run(self, input_ids, mask, positions, *, cache: KVCache | None = None, start=None,
             collect_kv: bool = False, dropout_rng=None, visible: int | None = None,
             layers: tuple[dict, ...] | None = None):
        """Embeddings, the layer scan and the final norm. Returns (hidden, kv): without a cache, kv is the
        new tokens' keys and values stacked over layers ([L B T K Dh] each) when `collect_kv`, else None;
        with a cache (whose mask/positions already include the new tokens at slot `start`), kv is the
        cache's (k, v) with the new tokens written in."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if dtype == jnp.float16 and jax.default_backend() == "cpu":
            raise ValueError("compute dtype float16: XLA:CPU has no float16 matmul with float32 accumulation; on CPU "
                             "use bfloat16 (fast on CPUs with AMX or AVX512-BF16) or float32 (--config.compute_dtype)")
        dropout = _Dropout.make(c, dropout_rng)
        x = self.embed_tokens[...].astype(dtype)[input_ids]
        if hasattr(self, "project_in"):
            x = _dot("bte,ed->btd", x, self.project_in[...], operands=c.matmul_dtype)
        if c.positions == "learned":
            x = x + self.embed_positions[...].astype(dtype)[positions + c.position_offset]
            rope = None
        else:
            inv_freq = jnp.asarray(rope_inverse_frequencies(c), jnp.float32)
            angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B T Dh/2]
            rope = (jnp.cos(angles), jnp.sin(angles))
        x = dropout.apply(x, c.embed_dropout, "embed")

        T = input_ids.shape[1]
        if cache is None:  # keys are the new tokens themselves: causal over their T slots
            allowed = mask[:, None, :] & jnp.tril(jnp.ones((T, T), bool))[None]
            key_positions = positions
        else:  # keys are the cache's first S slots, the new tokens among them at [start, start + T)
            S = visible or cache.max_length
            allowed = cache.mask[:, None, :S] & (jnp.arange(S)[None, :] <= start + jnp.arange(T)[:, None])[None]
            key_positions = cache.positions[:, :S]
        context = _Context(rope=rope, allowed=allowed, query_positions=positions, key_positions=key_positions,
                           start=start)
        block = functools.partial(_block, config=c, context=context)
        if c.remat != "none" and cache is None:
            policy = None if c.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            block = jax.checkpoint(block, policy=policy, prevent_cse=False)
        params = {name: p[...] for name, p in self.layers.items()}
        windows = c.sliding_windows or (0,) * c.num_layers  # per layer; 0: none
        xs = (params, jnp.asarray(windows, jnp.int32), jnp.arange(c.num_layers), dropout.layer_keys(c.num_layers))
        if cache is None:
            def body(h, layer_xs):
                h, kv = block(h, None, *layer_xs)
                return h, kv if collect_kv else None

            x, kv = jax.lax.scan(body, x, xs, unroll=not c.scan_layers)  # unroll=True: every layer inlined
        elif layers is not None:  # decoding over the per-layer arrays of decode_weights(), layers unrolled
            kv = cache.arrays
            for i, layer_params in enumerate(layers):
                x, kv = block(x, kv, layer_params, windows[i], i, None)
        else:  # decoding (no gradient): 16-bit weights cross the scan as their bit patterns (see _as_bits)
            bits, dtypes = _as_bits(params)

            def step(carry, layer_xs):
                layer_params, *rest = layer_xs
                return block(*carry, _from_bits(layer_params, dtypes), *rest), None

            (x, kv), _ = jax.lax.scan(step, (x, cache.arrays), (bits, *xs[1:]))
        if c.final_norm:
            x = _norm(x, self.final_norm_scale[...], getattr(self, "final_norm_bias", None), c)
        if hasattr(self, "project_out"):
            x = _dot("btd,de->bte", x, self.project_out[...], operands=c.matmul_dtype)
        return x, kv


def _as_bits(params: dict) -> tuple[dict, dict]:
    """The 16-bit float arrays of `params` as uint16 bit patterns, and every array's dtype. XLA:CPU slices a
    bfloat16 array only after widening it to float32 (float normalization), so a layer scan over a decoding
    twin's stacked bfloat16 weights would convert each layer's weights to float32 and back at every step
    (SmolLM2 teacher-mixed sampling: ~2 s of ~10); integer slices are taken as they are."""
    def bits(x):
        return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype in (jnp.bfloat16, jnp.float16) else x

    return jax.tree.map(bits, params), jax.tree.map(lambda x: x.dtype, params)


def _from_bits(params: dict, dtypes: dict) -> dict:
    return jax.tree.map(lambda x, d: jax.lax.bitcast_convert_type(x, d) if x.dtype != d else x, params, dtypes)


def _prepare(input_ids, attention_mask, first_position):
    """int32 ids, a bool mask and per-row positions that count real tokens only (left padding is free)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask) > 0
    positions = first_position + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    return input_ids, mask, positions.astype(jnp.int32)


@flax.struct.dataclass
class _Context:
    """What every layer needs besides its parameters: the rope angles of the new tokens, which key slots
    each may attend to before sliding windows (padding and causality), the positions that windows are
    measured in, and the cache slot of the first new token (None without a cache)."""

    rope: tuple | None
    allowed: Bool[Array, "B T S"]
    query_positions: Int[Array, "B T"]
    key_positions: Int[Array, "B S"]
    start: Int[Array, ""] | None


@flax.struct.dataclass
class _Dropout:
    """Training-time dropout: a key (None in evaluation, prefill and decode) and named sub-keys."""

    key: jax.Array | None

    @classmethod
    def make(cls, c: ModelConfig, key) -> "_Dropout":
        active = key is not None and max(c.embed_dropout, c.residual_dropout, c.attention_dropout) > 0
        return cls(key if active else None)

    def layer_keys(self, num_layers: int):
        return None if self.key is None else jax.random.split(self.sub_key("layers"), num_layers)

    def apply(self, x, rate: float, name: str):
        """Inverted dropout: zero each element with probability `rate`, scale the others by 1 / (1 - rate)."""
        if self.key is None or rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.sub_key(name), 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

    def sub_key(self, name: str):
        return jax.random.fold_in(self.key, _DROPOUT_STREAMS[name])


_DROPOUT_STREAMS = {"embed": 0, "layers": 1, "attention": 2, "attention_out": 3, "mlp_out": 4}


def _norm(x, scale, bias, c: ModelConfig):
    """LayerNorm or RMSNorm in float32, cast back to the compute dtype (bias may be None)."""
    return _normalise(c.norm == "rmsnorm", c.norm_eps, x, scale, bias)


# The norms have a hand-written backward pass for what they keep, not for their math (autodiff's, to float32
# rounding): autodiff keeps the float32 centred input and normalised values, two [tokens, E] float32 arrays a
# norm, two layers' worth of the step's saved activations; here a norm keeps its input as it came (the compute
# dtype) and two float32 numbers a row, and the backward pass normalises again, inside the fusion that reduces
# the gradient. Compiled for an H200, the GPT-2 124M train step (B 16 x 512, bf16, cuDNN attention) reads and
# writes 6.2 GB less, an estimated 10% faster (bench/gpu_hlo.py train --attention cudnn: 27.2 -> 24.5 ms); on
# CPU a MiniLLM round at the demo's shapes is no slower (bench/minillm_round.py).


def _norm_statistics(x32, rms: bool, eps: float):
    """(mean or None, 1 / standard deviation), each [..., 1] float32."""
    mean = None if rms else jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 if rms else x32 - mean
    return mean, jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def _normalised(x, mean, rstd):
    x32 = x.astype(jnp.float32)
    return (x32 if mean is None else x32 - mean) * rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _normalise(rms: bool, eps: float, x, scale, bias):
    return _normalise_fwd(rms, eps, x, scale, bias)[0]


def _normalise_fwd(rms, eps, x, scale, bias):
    mean, rstd = _norm_statistics(x.astype(jnp.float32), rms, eps)
    y = _normalised(x, mean, rstd) * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _normalise_bwd(rms, eps, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    x_hat = _normalised(x, mean, rstd)
    dy = dy.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    d_scale = jnp.sum(dy * x_hat, axis=rows).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(dy, axis=rows).astype(bias.dtype)
    g = dy * scale.astype(jnp.float32)
    d_x = g - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True)
    if not rms:
        d_x = d_x - jnp.mean(g, axis=-1, keepdims=True)
    return (d_x * rstd).astype(x.dtype), d_scale, d_bias


_normalise.defvjp(_normalise_fwd, _normalise_bwd)


def _rotate(x, cos, sin):
    """HF rotate-half RoPE: pairs (i, i + Dh/2). x [B T N Dh], cos/sin [B T Dh/2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _activation(x, name: str):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def _block(x, kv, p, window, layer, dropout_key, *, config: ModelConfig, context: _Context):
    """One transformer layer on per-layer params `p`. Without a cache (`kv` None) returns (x, (k, v) of
    the new tokens); with one, `kv` is the whole stacked cache (k, v) and comes back with this layer's new
    slots written: (x, kv). Pre-norm blocks normalise each sublayer's input; post-norm blocks (OPT-350m)
    its residual sum."""
    c = config
    dropout = _Dropout(dropout_key)

    def norm(h, name):
        return _norm(h, p[f"{name}_scale"], p.get(f"{name}_bias"), c)

    h = norm(x, "attn_norm") if c.pre_norm else x
    out, kv = _attention(h, kv, p, window, layer, dropout, config=c, context=context)
    out = dropout.apply(out, c.residual_dropout, "attention_out")
    x = x + out if c.pre_norm else norm(x + out, "attn_norm")
    h = norm(x, "mlp_norm") if c.pre_norm else x
    out = dropout.apply(_mlp(h, p, c), c.residual_dropout, "mlp_out")
    x = x + out if c.pre_norm else norm(x + out, "mlp_norm")
    return x, kv


def _attention(h, kv, p, window, layer, dropout: _Dropout, *, config: ModelConfig, context: _Context):
    """Grouped-query attention of the T new tokens over themselves (no cache) or over the cache after
    writing their keys and values into it at slot `context.start`."""
    c = config
    dtype = h.dtype

    def w(name):
        return p[name].astype(dtype)

    if "qkv_proj" in p:  # joined (Transformer.decode_weights): [.., G + 2, K, Dh], the G query blocks first
        qkv = _dot("btd,dgkh->btgkh", h, p["qkv_proj"], operands=c.matmul_dtype)
        G = c.num_heads // c.num_kv_heads
        q = jnp.swapaxes(qkv[:, :, :G], 2, 3).reshape(*qkv.shape[:2], c.num_heads, c.head_dim)
        k, v = qkv[:, :, G], qkv[:, :, G + 1]
    else:
        q, k, v = (_dot("btd,dhk->bthk", h, p[name], operands=c.matmul_dtype)
                   for name in ("q_proj", "k_proj", "v_proj"))
    if c.qkv_bias:
        q, k, v = q + w("q_bias"), k + w("k_bias"), v + w("v_bias")
    if context.rope is not None:
        cos, sin = context.rope
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)

    cached = kv is not None
    if not cached:
        keys, values, kv = k, v, (k, v)
    else:  # write this layer's new slots in place, then read the layer's cache ([B K S Dh] each, S visible)
        kv = _cache_written(kv, (jnp.swapaxes(k, 1, 2)[None], jnp.swapaxes(v, 1, 2)[None]),
                            (layer, 0, 0, context.start, 0))
        S = context.allowed.shape[-1]  # the slots attended over: all, or the first `visible`
        keys, values = (jax.lax.dynamic_index_in_dim(whole, layer, keepdims=False)[:, :, :S].astype(dtype)
                        for whole in kv[:2])  # int8 values exactly
        scales = None if len(kv) == 2 else \
            tuple(jax.lax.dynamic_index_in_dim(kv[2], layer, keepdims=False)[:, :, i, :S] for i in range(2))

    allowed = context.allowed
    if c.sliding_windows:  # windows count positions (real tokens), not slots
        distance = context.query_positions[:, :, None] - context.key_positions[:, None, :]
        allowed = allowed & ((window <= 0) | (distance < window))
    if cached:  # the cache in its own layout (faster than XLA's dot_product_attention: compare_checkouts.py)
        out = _softmax_attention(q, keys, values, allowed, _Dropout(None), 0.0, scales=scales)
    elif (dropout.key is not None and c.attention_dropout > 0) or _explicit_attention():  # dropout: dpa has none
        out = _softmax_attention(q, jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2), allowed, dropout,
                                 c.attention_dropout)
    else:
        out = _fused_attention(q, keys, values, allowed, c.attention)
    out = _dot("bthk,hkd->btd", out, p["o_proj"], operands=c.matmul_dtype)
    if c.out_bias:
        out = out + w("o_bias")
    return out, kv


def _fused_attention(q, k, v, allowed, implementation: str):
    """jax.nn.dot_product_attention with the model's one boolean mask: q [B T H Dh], k/v [B S K Dh], allowed
    [B T S]. "cudnn": cuDNN's flash attention, which never holds the [B H T S] scores (on an H200, compiled
    for it from a CPU machine: an estimated 1.7x faster GPT-2 124M train step, bench/gpu_hlo.py; not yet
    timed on a GPU); where cuDNN refuses the shapes or dtype at trace time (float32, an odd training length,
    head dim not a multiple of 8) XLA's, with a warning naming the reason. Rows whose keys are all masked
    (left padding) get finite outputs either way (cuDNN turns the mask into a large negative bias)."""
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="cudnn")
        except NotImplementedError as e:
            warnings.warn(f"model attention 'cudnn': cuDNN refuses q {q.shape} {q.dtype}, k {k.shape} ({e}); "
                          "this attention uses XLA's", stacklevel=2)
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")


def _explicit_attention() -> bool:
    """Whether attention without a cache takes `_softmax_attention` rather than jax.nn.dot_product_attention:
    on CPU, where both are XLA softmax attention and ours lays its dots out in forms XLA:CPU runs faster at
    the lengths CPU runs train (a SmolLM2 layer, B 8, bfloat16, forward / forward and backward: T 191 10 / 47
    against 19 / 56 ms, T 127 4.4 / 14.5 against 5.9 / 22.3; level at T 512: bench/attention_impl.py).
    Elsewhere jax's, so that a fused kernel is used where jax selects one."""
    return jax.default_backend() == "cpu"


def _softmax_attention(q, k, v, allowed, dropout: _Dropout, rate: float, scales=None):
    """Softmax attention in XLA, the G query heads of a kv head as one matrix (the cache is read once),
    with dropout on the probabilities when `dropout` has a key (training), which
    jax.nn.dot_product_attention does not offer: q [B T H Dh], k/v [B K S Dh], allowed [B T S]. `scales`: an
    int8 cache's key and value scales ([B K S] each) for the integer-valued k and v: a slot's scale is a factor
    of its whole key (value) vector, so it multiplies that slot's score (its probability, before the sum over
    the values)."""
    B, T, H, Dh = q.shape
    K = k.shape[1]
    q = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(Dh)
    if scales is not None:
        scores = scores * scales[0][:, :, None, None, :]
    probs = jax.nn.softmax(jnp.where(allowed[:, None, None], scores, _MASKED), axis=-1)
    if scales is not None:
        probs = probs * scales[1][:, :, None, None, :]
    probs = dropout.apply(probs, rate, "attention").astype(v.dtype)
    # [B K G T Dh], then heads after positions: XLA:CPU's batched dot straight into btkgd runs 10x slower
    # (a decode step's probs x values: 1.46 ms against 0.10 ms with the transpose after the dot)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return jnp.moveaxis(out, 3, 1).reshape(B, T, H, Dh)


def _mlp(h, p, c: ModelConfig):
    if c.matmul_dtype and jnp.dtype(c.matmul_dtype) != h.dtype:  # operands in matmul_dtype, result in h's
        return _mlp(h.astype(c.matmul_dtype), p, c.replace(matmul_dtype="")).astype(h.dtype)

    def bias(name):
        return None if name not in p else p[name].astype(h.dtype)

    if "gate_up_proj" in p:  # joined (Transformer.decode_weights: decoding, no gradient)
        gate_up = _linear(h, p["gate_up_proj"], bias("gate_up_bias"), "btd,dcf->btcf")
        hidden = _activation(gate_up[:, :, 0], c.activation) * gate_up[:, :, 1]
        return _linear(hidden, p["down_proj"], bias("down_bias"), "btf,fd->btd")
    # weights go in as stored (cast inside, so their gradients come back in their own dtype), biases cast
    if not c.gated_mlp:
        return _plain_mlp(c.activation, h, p["up_proj"], p["down_proj"], bias("up_bias"), bias("down_bias"))
    return _gated_mlp(c.activation, h, p["gate_proj"], p["up_proj"], p["down_proj"], bias("gate_bias"),
                      bias("up_bias"), bias("down_bias"))


# Matmuls by a weight, cast to the activations' dtype (the compute dtype). On XLA:CPU a bfloat16 x bfloat16 ->
# bfloat16 dot is converted to float32 (110-170 GFLOP/s on the development machine), while bfloat16 operands
# with a float32 result run on the CPU's bfloat16 kernels (AMX there: 1.7 TFLOP/s, float32 ~200); autodiff
# of such a dot would transpose it in float32, so in low precision on CPU `_dot` has its own backward pass,
# with bfloat16 operands and float32 accumulation throughout and the weight gradient returned in the weight's
# own dtype (float32 master weights get an unrounded gradient). Elsewhere it is the plain einsum. The MLPs'
# hand-written backward passes below use the same `_mm`.


def _cpu_low_precision(dtype) -> bool:
    return jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu"


def _mm(spec, a, b, out_dtype):
    """einsum of two operands of the compute dtype, accumulated in float32 where that is the fast path."""
    if _cpu_low_precision(a.dtype):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32 if out_dtype == jnp.float32 else None)
    return out.astype(out_dtype)


def _dot(spec: str, x, w, out_dtype=None, operands: str = ""):
    """x (activations) times w (a weight, any dtype) by an einsum spec without batch dimensions in which every
    index of an operand also appears in the other operand or the result; the result in `out_dtype` (default
    x's); `operands` casts x first (ModelConfig.matmul_dtype). (Attention's batched dots stay XLA's: its CPU
    runtime has no bf16 x bf16 -> f32 batched dot.)"""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if operands:
        x = x.astype(operands)
    low = jnp.dtype(x.dtype).itemsize < 4
    if low and (_cpu_low_precision(x.dtype) or out_dtype.itemsize > x.dtype.itemsize):
        return _low_precision_dot(spec, out_dtype, x, w)
    return _mm(spec, x, w.astype(x.dtype), out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_dot(spec, out_dtype, x, w):
    """bf16/f16 operands whose backward products take the cotangent in the operands' dtype too (accumulated
    in float32), wherever the result is wider: the unembedding's float32 logits would otherwise give their
    float32 cotangent to both backward products, which then run in float32 (on a GPU: TF32 at best, with the
    [rows, V] cotangent written in float32 first; bench/gpu_hlo.py). On CPU every low-precision dot takes it
    (XLA:CPU's own transposes of a bf16 dot are slower)."""
    return _mm(spec, x, w.astype(x.dtype), out_dtype)


def _low_precision_dot_fwd(spec, out_dtype, x, w):
    return _low_precision_dot(spec, out_dtype, x, w), (x, w)


def _low_precision_dot_bwd(spec, out_dtype, residuals, d_out):
    x, w = residuals
    x_spec, rest = spec.split(",")
    w_spec, out_spec = rest.split("->")
    d_out = d_out.astype(x.dtype)
    return (_mm(f"{out_spec},{w_spec}->{x_spec}", d_out, w.astype(x.dtype), x.dtype),
            _mm(f"{x_spec},{out_spec}->{w_spec}", x, d_out, w.dtype))


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


# The MLPs with hand-written backward passes. The math is autodiff's; what differs is the program XLA:CPU
# gets: autodiff fuses the activation's derivative into a transposed copy of [tokens, F] per weight gradient
# (the slowest kernels of a CPU train step), while here each derivative is computed once, in place, and the
# weight gradients contract over tokens explicitly (a 10-layer SmolLM2 train step: 6.8 -> 6.0 s). Biases
# may be None.


def _linear(x, w, b, spec):
    y = _mm(spec, x, w.astype(x.dtype), x.dtype)
    return y if b is None else y + b


def _bias_grad(b, dy):
    return None if b is None else jnp.sum(dy, axis=(0, 1)).astype(b.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_mlp(activation, h, wg, wu, wd, bg, bu, bd):
    return _gated_mlp_fwd(activation, h, wg, wu, wd, bg, bu, bd)[0]


def _gated_mlp_fwd(activation, h, wg, wu, wd, bg, bu, bd):
    gate, up = _linear(h, wg, bg, "btd,df->btf"), _linear(h, wu, bu, "btd,df->btf")
    out = _linear(_activation(gate, activation) * up, wd, bd, "btf,fd->btd")
    return out, (h, wg, wu, wd, bg, bu, bd, gate, up)


def _gated_mlp_bwd(activation, residuals, d_out):
    h, wg, wu, wd, bg, bu, bd, gate, up = residuals
    dtype = h.dtype
    act, act_vjp = jax.vjp(functools.partial(_activation, name=activation), gate)
    d_hidden = _mm("btd,fd->btf", d_out, wd.astype(dtype), dtype)
    d_up = d_hidden * act
    (d_gate,) = act_vjp(d_hidden * up)
    d_h = _mm("btf,df->btd", d_gate, wg.astype(dtype), dtype) + _mm("btf,df->btd", d_up, wu.astype(dtype), dtype)
    return (d_h, _mm("btd,btf->df", h, d_gate, wg.dtype), _mm("btd,btf->df", h, d_up, wu.dtype),
            _mm("btf,btd->fd", act * up, d_out, wd.dtype), _bias_grad(bg, d_gate), _bias_grad(bu, d_up),
            _bias_grad(bd, d_out))


_gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _plain_mlp(activation, h, wu, wd, bu, bd):
    return _plain_mlp_fwd(activation, h, wu, wd, bu, bd)[0]


def _plain_mlp_fwd(activation, h, wu, wd, bu, bd):
    up = _linear(h, wu, bu, "btd,df->btf")
    return _linear(_activation(up, activation), wd, bd, "btf,fd->btd"), (h, wu, wd, bu, bd, up)


def _plain_mlp_bwd(activation, residuals, d_out):
    h, wu, wd, bu, bd, up = residuals
    dtype = h.dtype
    act, act_vjp = jax.vjp(functools.partial(_activation, name=activation), up)
    (d_up,) = act_vjp(_mm("btd,fd->btf", d_out, wd.astype(dtype), dtype))
    return (_mm("btf,df->btd", d_up, wu.astype(dtype), dtype), _mm("btd,btf->df", h, d_up, wu.dtype),
            _mm("btf,btd->fd", act, d_out, wd.dtype), _bias_grad(bu, d_up), _bias_grad(bd, d_out))


_plain_mlp.defvjp(_plain_mlp_fwd, _plain_mlp_bwd)


# The weights that only ever meet activations in a matmul (the embedding too: its rows are looked up, then cast
# to the compute dtype, which gives the same values from a bfloat16 copy).
_MATMUL_WEIGHTS = ("embed_tokens", "lm_head", "project_in", "project_out")
_LAYER_MATMUL_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoding_twin(model: Transformer) -> Transformer:
    """The module a sampler decodes with. On CPU, a low-precision compute dtype decodes with float32 activations
    and KV cache over low-precision copies of the matmul weights (ModelConfig.matmul_dtype: each weight
    matmul takes bfloat16 operands and accumulates in float32, on the CPU's bfloat16 units, as in training;
    norms, biases and other parameters stay shared). A decode step is a few rows, on which XLA:CPU's emulated
    bfloat16 elementwise work costs more than it saves (SmolLM2 teacher-mixed sampling, 32 rows: all bf16 18.4
    s, float32 12.6-13.3 s, this 11.5-12.1 s). Prompts still prefill in the compute dtype, into the twin's
    float32 cache. Elsewhere, and in float32, the model itself."""
    if not _cpu_low_precision(model.config.dtype):
        return model
    graphdef, state = nnx.split(model)
    twin = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables over the same arrays
    low = model.config.dtype
    weights = [getattr(twin, name) for name in _MATMUL_WEIGHTS if hasattr(twin, name)]
    weights += [twin.layers[name] for name in _LAYER_MATMUL_WEIGHTS if name in twin.layers]
    for weight in weights:  # the twin's own Variables: the model keeps its arrays
        weight.set_value(weight.get_value().astype(low))
    twin.config = model.config.replace(dtype="float32", matmul_dtype=low)
    return twin


def select_layers(model: Transformer, indices) -> Transformer:
    """A new model that keeps only the given layers of `model` (in that order), sharing embeddings,
    final norm and head: a student initialised from a subset of the teacher's layers."""
    indices = [int(i) for i in indices]
    L = model.config.num_layers
    if not indices or any(not 0 <= i < L for i in indices):
        raise ValueError(f"layer indices {indices}: expected a non-empty list within [0, {L})")
    config = model.config
    windows = tuple(config.sliding_windows[i] for i in indices) if config.sliding_windows else ()
    student_config = config.replace(num_layers=len(indices), sliding_windows=windows)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(student_config, rngs=nnx.Rngs(0))))
    source = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    take = jnp.asarray(indices)
    for path, variable in nnx.to_flat_state(state):
        value = source[path].get_value()
        # copies, never aliases: training donates the student's buffers, the teacher keeps its own
        variable.set_value(value[take] if logical_axes(variable)[:1] == ("layers",) else jnp.array(value, copy=True))
    return nnx.merge(graphdef, state)
