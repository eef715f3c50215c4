"""Compiled sampling: one prefill, then KV-cache decode steps in chunks of `decode_chunk` under
`lax.scan`, inside a `lax.while_loop` over chunks that stops when every row is done (or `cache_segments` such
loops one after another, each attending over the cache slots filled by its end); with a teacher,
MiniLLM's teacher-mixed sampling steps both models' caches in the same loop and draws each token from
(1 - alpha) * q + alpha * p. `sample` is the pure, traceable sampler (for use inside another jitted
function, e.g. a whole training round); `generate` compiles it for host-side callers.

Shapes: B batch, P prompt (left-padded to a bucket), R max new tokens, V the real vocabulary (ids of a
padded checkpoint vocabulary beyond the tokenizer's size are never sampled). The loop carries each step's logits
as the decode head gives them, `Transformer.decode_vocab_size` wide (whole blocks of 128 ids on every shard of a
vocabulary split over the mesh's `tensor` axis).

Distributions, all in float32: q = softmax(student_logits / T) and p = softmax(teacher_logits / T);
tokens are drawn from the mixture after no-repeat-n-gram, top-k and top-p filtering (in that order, as
transformers does). Sampling without top-k, top-p or greedy (MiniLLM's rollouts; evaluation's n-gram blocking
is fine) draws in two levels
(`_block_draw`): a block of 128 ids from the blocks' masses, then an id within the block, by the same inverse
CDF of one uniform per row as the filtered path's over the whole vocabulary, so it reads each step's logits
once (a teacher's once more, for the KL) rather than once per softmax, cumulative sum and gather. `logprobs`
is log q(y) and `teacher_logprobs` log p(y) of the drawn token, `weights` is q(y) / ((1 - alpha) q(y) +
alpha p(y)), the unfiltered mixture's importance weight, and `reverse_kl` is KL(q || p) of the step's whole
distributions: summed over an answer it has the expectation of the Monte-Carlo sum of log q(y) - log p(y) over
its tokens (both estimate the answer's reverse KL) without the variance of each drawn token.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from minillm_jax import losses, sharding
from minillm_jax.models.transformer import Transformer, decoding_twin

# Incremented at trace time: tests use it to check that shapes within a bucket compile once.
TRACE_COUNTS: collections.Counter = collections.Counter()

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
KV_CACHE_DTYPES = ("auto", "int8")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decode settings; frozen and hashable (a static argument of the compiled loop)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_token_id: int | tuple[int, ...] | None = None
    no_repeat_ngram_size: int = 0
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    pad_token_id: int = 0
    decode_chunk: int = 8  # decode steps per lax.scan chunk; the loop can stop only between chunks
    # > 1: the decode steps in this many consecutive loops, each attending over the cache slots filled by its
    # end only (the prompt and the tokens up to there) rather than all P + W slots: about (S + 1) / 2S of the
    # cache reads of the new tokens' part, for S compiled copies of the decode step
    cache_segments: int = 1
    # True: the decode steps run the layers unrolled over per-layer copies of the weights taken once before
    # the loop (Transformer.decode_weights) instead of a scan that slices them out of the stacks every step;
    # one more copy of the layer weights while sampling, a larger program to compile
    split_layers: bool = False
    # "int8": the KV caches hold each slot's key and value vectors as int8 with a float32 scale each (largest
    # magnitude / 127) instead of the compute dtype: about half the bytes that every decode step's attention
    # reads, for keys and values rounded to 1/254 of their largest element; "auto": the compute dtype
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}: expected >= 1")
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature}: expected > 0 (use greedy=True)")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k}: expected >= 0 (0 disables)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p}: expected in (0, 1]")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"SamplingConfig.no_repeat_ngram_size={self.no_repeat_ngram_size}: expected >= 0")
        if self.decode_chunk < 1:
            raise ValueError(f"SamplingConfig.decode_chunk={self.decode_chunk}: expected >= 1")
        if self.cache_segments < 1:
            raise ValueError(f"SamplingConfig.cache_segments={self.cache_segments}: expected >= 1")
        if not isinstance(self.split_layers, bool):
            raise ValueError(f"SamplingConfig.split_layers={self.split_layers!r}: expected True or False")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"SamplingConfig.kv_cache_dtype={self.kv_cache_dtype!r}: expected one of "
                             f"{KV_CACHE_DTYPES}")
        buckets = tuple(int(b) for b in self.prompt_buckets)
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"SamplingConfig.prompt_buckets={self.prompt_buckets}: expected increasing positive "
                             "lengths")
        object.__setattr__(self, "prompt_buckets", buckets)
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id",
                           () if eos is None else (int(eos),) if np.ndim(eos) == 0 else tuple(int(e) for e in eos))


@flax.struct.dataclass
class SampleOutput:
    tokens: Int[Array, "B R"]  # generated ids; pad_token_id after EOS
    mask: Bool[Array, "B R"]  # True on generated tokens up to and including EOS
    lengths: Int[Array, " B"]
    logprobs: Float[Array, "B R"]  # log q(y_t), the student's
    prompt_tokens: Int[Array, "B P"]  # the left-padded, bucketed prompts the loop ran on
    prompt_mask: Bool[Array, "B P"]
    teacher_logprobs: Float[Array, "B R"] | None = None  # log p(y_t)
    weights: Float[Array, "B R"] | None = None  # q / ((1 - alpha) q + alpha p)
    reverse_kl: Float[Array, "B R"] | None = None  # KL(q(.|y<t) || p(.|y<t)) over the vocabulary


@flax.struct.dataclass
class _LoopState:
    """The decode loop's carry. Buffers are W = R rounded up to whole chunks wide; columns from R on
    (steps of the last chunk past max_new_tokens) are sliced off at the end."""

    step: Int[Array, ""]
    done: Bool[Array, " B"]
    tokens: Int[Array, "B W"]
    mask: Bool[Array, "B W"]
    logprobs: Float[Array, "B W"]
    teacher_logprobs: Float[Array, "B W"]
    weights: Float[Array, "B W"]
    reverse_kl: Float[Array, "B W"]
    history: Int[Array, "B P+W"]  # prompt and generated ids, for n-gram blocking
    history_mask: Bool[Array, "B P+W"]
    logits: Float[Array, "B Vd"]  # student's next-token logits, its decode_vocab_size(multiple) wide
    teacher_logits: Float[Array, "B Vt"] | None
    cache: object
    teacher_cache: object


def generate(model: Transformer, prompts, config: SamplingConfig, rng: jax.Array, *,
             teacher: Transformer | None = None, mix_alpha: float = 0.0) -> SampleOutput:
    """Sample up to `config.max_new_tokens` for each prompt.

    `prompts` is a list of token-id lists, or a pair (ids [B, T], mask [B, T]) already left-padded.
    With a `teacher`, tokens come from (1 - mix_alpha) * q + mix_alpha * p and the teacher's log-probs
    and importance weights are returned too. The same prompts and key give the same tokens.
    """
    ids, mask = pad_prompts(prompts, config.prompt_buckets, config.pad_token_id)
    num_real = model.config.num_real_tokens
    if teacher is not None:
        if teacher.config.num_real_tokens != num_real:
            raise ValueError(
                f"teacher and student must share a tokenizer: real vocabulary sizes differ (student "
                f"{num_real}, teacher {teacher.config.num_real_tokens}; checkpoint sizes "
                f"{model.config.vocab_size} / {teacher.config.vocab_size})")
        if not 0.0 <= mix_alpha <= 1.0:
            raise ValueError(f"mix_alpha={mix_alpha}: expected in [0, 1]")
    elif mix_alpha:
        raise ValueError(f"mix_alpha={mix_alpha} needs a teacher")
    for m, role in ((model, "student"), (teacher, "teacher")):
        if m is not None and m.config.positions == "learned":
            longest = int(mask.sum(1).max()) + config.max_new_tokens
            if longest > m.config.max_position_embeddings:
                raise ValueError(f"{role}: prompt + max_new_tokens reaches position {longest}, beyond its "
                                 f"max_position_embeddings={m.config.max_position_embeddings}")

    student_def, student_state = nnx.split(model)
    teacher_def, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)
    mesh = sharding.mesh_of(student_state)
    if mesh is not None:  # rows over (data, fsdp): each data-parallel group samples its own share
        ids, mask = sharding.place_batch((ids, mask), mesh, sharding.SAMPLE_RULES)
    step = _compiled_generate(student_def, teacher_def, config, num_real, mesh, ids.shape[0])
    return step(student_state, teacher_state, jnp.asarray(ids), jnp.asarray(mask), rng, jnp.float32(mix_alpha))


def pad_prompts(prompts, buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to the smallest bucket that holds the longest one: ids int32, mask bool [B, P]."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        ids, mask = np.asarray(prompts[0], np.int32), np.asarray(prompts[1]) > 0
        if ids.shape != mask.shape:
            raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} differ in shape")
        if not mask[:, -1].all():
            raise ValueError("prompts must be left-padded: the last column of the mask must be 1 in every row")
        rows = [row[m].tolist() for row, m in zip(ids, mask)]
    else:
        rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
    longest = max(map(len, rows))
    fitting = [b for b in buckets if b >= longest]
    if not fitting:
        raise ValueError(f"prompt of {longest} tokens exceeds the largest bucket {buckets[-1]} "
                         "(truncate prompts or add a bucket)")
    width = fitting[0]
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    return ids, mask


def _row_constraint(mesh, batch_size: int):
    """`lay_out(x, row_axis=0)`: pin a per-row array's rows to the batch mesh axes (data, fsdp) when they
    divide the batch, leaving its other dimensions to the compiler (e.g. the vocabulary on `tensor`)."""
    if mesh is None:
        return lambda x, row_axis=0: x
    rows = sharding.rows_sharding(mesh, (batch_size,), sharding.SAMPLE_RULES).spec
    rows = rows[0] if len(rows) else None
    free = jax.sharding.PartitionSpec.UNCONSTRAINED

    def lay_out(x, row_axis=0):
        if x is None:
            return None
        spec = [free] * x.ndim
        spec[row_axis] = rows
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    return lay_out


def _lay_out_loop(s: "_LoopState", lay_out) -> "_LoopState":
    rows = {name: lay_out(getattr(s, name)) for name in ("done", "tokens", "mask", "logprobs", "teacher_logprobs",
                                                           "weights", "reverse_kl", "history", "history_mask",
                                                           "logits", "teacher_logits")}
    return s.replace(**rows, cache=_lay_out_cache(s.cache, lay_out),
                     teacher_cache=_lay_out_cache(s.teacher_cache, lay_out))


def _lay_out_cache(cache, lay_out):
    if cache is None:
        return None
    return cache.replace(k=lay_out(cache.k, 1), v=lay_out(cache.v, 1), mask=lay_out(cache.mask),
                         positions=lay_out(cache.positions), lengths=lay_out(cache.lengths),
                         scales=lay_out(cache.scales, 1))


@functools.lru_cache(maxsize=None)
def _compiled_generate(student_def, teacher_def, config: SamplingConfig, num_real: int, mesh, batch_size: int):
    """The jitted sampler for one model pair, config and batch size. On a mesh it has explicit shardings:
    prompt ids/mask in and every result out with rows over (data, fsdp) (replicated when those axes do not
    divide the batch); the models' states keep the shardings they were placed with (None)."""
    def run(student_state, teacher_state, ids, mask, rng, alpha):
        TRACE_COUNTS["generate"] += 1
        student = nnx.merge(student_def, student_state)
        teacher = nnx.merge(teacher_def, teacher_state) if teacher_def is not None else None
        return sample(student, teacher, ids, mask, rng, alpha, config=config, num_real=num_real, mesh=mesh)

    if mesh is None:
        return jax.jit(run)
    rows = sharding.rows_sharding(mesh, (batch_size,), sharding.SAMPLE_RULES)
    return sharding.StartedTogether(jax.jit(run, in_shardings=(None, None, rows, rows, None, None),
                                            out_shardings=rows), "generate")


def sample(student: Transformer, teacher: Transformer | None, ids: Int[Array, "B P"], mask: Bool[Array, "B P"],
           rng: jax.Array, alpha: Float[Array, ""] | float, *, config: SamplingConfig, num_real: int,
           mesh: jax.sharding.Mesh | None = None) -> SampleOutput:
    """Sample up to `config.max_new_tokens` for left-padded prompts: pure and traceable (no jit inside), for
    use within another jitted function, on merged modules. `num_real` is the real vocabulary size; `alpha`
    the teacher's share of the sampling mixture (ignored without a teacher). On a `mesh`, per-row state is
    pinned to the (data, fsdp) axes. Step t draws with `fold_in(rng, t)`, so the same key gives the same
    tokens whatever `config.decode_chunk` is."""
    TRACE_COUNTS["sample"] += 1
    lay_out = _row_constraint(mesh, ids.shape[0])
    B, P = ids.shape
    R = config.max_new_tokens
    chunk = min(config.decode_chunk, R)
    W = -(-R // chunk) * chunk

    # decode heads (and the logits the loop carries) whole blocks of _block_draw's on each vocabulary shard: a
    # block across two shards makes XLA gather every step's whole logits
    multiple = BLOCK * (mesh.shape.get("tensor", 1) if mesh is not None else 1)

    def start(model, twin):  # the prompt in the model's compute dtype, into the cache its decoding twin reads
        cache_dtype = twin.config.dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype
        cache = _lay_out_cache(model.init_cache(B, P + W, dtype=cache_dtype), lay_out)
        logits, cache = model.prefill(ids, mask, cache, empty_cache=True, last_only=True)
        logits = logits[:, -1]  # as wide as the decode steps' (the extra ids are masked where drawn)
        return jnp.pad(logits, ((0, 0), (0, model.decode_vocab_size(multiple) - logits.shape[-1]))), cache

    student_twin = decoding_twin(student)
    teacher_twin = decoding_twin(teacher) if teacher is not None else None
    logits, cache = start(student, student_twin)
    teacher_logits, teacher_cache = start(teacher, teacher_twin) if teacher is not None else (None, None)
    student, teacher = student_twin, teacher_twin
    # taken once, outside the decode loops: the heads padded to `multiple` ids (the extra ids are masked where
    # drawn), per-layer weights with config.split_layers
    student_weights = student.decode_weights(config.split_layers, multiple)
    teacher_weights = teacher.decode_weights(config.split_layers, multiple) if teacher is not None else None
    zeros = jnp.zeros((B, W), jnp.float32)
    state = _LoopState(
        step=jnp.int32(0), done=jnp.zeros((B,), bool), tokens=jnp.full((B, W), config.pad_token_id, jnp.int32),
        mask=jnp.zeros((B, W), bool), logprobs=zeros, teacher_logprobs=zeros, weights=jnp.ones((B, W), jnp.float32),
        reverse_kl=zeros,
        history=jnp.concatenate([ids, jnp.zeros((B, W), jnp.int32)], axis=1),
        history_mask=jnp.concatenate([mask, jnp.zeros((B, W), bool)], axis=1),
        logits=logits, teacher_logits=teacher_logits, cache=cache, teacher_cache=teacher_cache)
    state = _lay_out_loop(state, lay_out)

    def step(s: _LoopState, visible: int) -> _LoopState:
        key = jax.random.fold_in(rng, s.step)
        token, logq, logp, weight, kl = _choose(s, P + s.step, key, alpha, config, num_real)
        live = ~s.done
        token = jnp.where(live, token, config.pad_token_id)
        is_eos = jnp.isin(token, jnp.asarray(config.eos_token_id or (-1,), jnp.int32)) & live

        def put(buffer, values):
            return jax.lax.dynamic_update_slice(buffer, values[:, None].astype(buffer.dtype), (0, s.step))

        logits, cache = student.decode_step(token, s.cache, visible, student_weights)
        if teacher is not None:
            teacher_logits, teacher_cache = teacher.decode_step(token, s.teacher_cache, visible, teacher_weights)
        else:
            teacher_logits, teacher_cache = None, None
        return _lay_out_loop(_LoopState(
            step=s.step + 1, done=s.done | is_eos, tokens=put(s.tokens, token), mask=put(s.mask, live),
            logprobs=put(s.logprobs, jnp.where(live, logq, 0.0)),
            teacher_logprobs=put(s.teacher_logprobs, jnp.where(live, logp, 0.0)),
            weights=put(s.weights, jnp.where(live, weight, 1.0)),
            reverse_kl=put(s.reverse_kl, jnp.where(live, kl, 0.0)),
            history=jax.lax.dynamic_update_slice(s.history, token[:, None], (0, P + s.step)),
            history_mask=jax.lax.dynamic_update_slice(s.history_mask, live[:, None], (0, P + s.step)),
            logits=logits, teacher_logits=teacher_logits, cache=cache, teacher_cache=teacher_cache),
            lay_out)

    def decode_chunk(visible: int):
        def run(s: _LoopState) -> _LoopState:
            TRACE_COUNTS["decode_chunk"] += 1
            return jax.lax.scan(lambda s, _: (step(s, visible), None), s, length=chunk)[0]
        return run

    # segment j runs the steps up to ends[j] (whole chunks), attending over the slots filled by then (one
    # segment: all P + W, the whole cache)
    chunks = W // chunk
    segments = min(config.cache_segments, chunks)
    ends = [-(-chunks * (j + 1) // segments) * chunk for j in range(segments)]
    s = state
    for end in ends:
        s = jax.lax.while_loop(lambda s, end=end: (s.step < min(end, R)) & ~jnp.all(s.done),
                               decode_chunk(P + end), s)
    with_teacher = teacher is not None
    mask_out = s.mask[:, :R]
    return SampleOutput(  # laid out by _compiled_generate's out_shardings, or by the caller's
        tokens=s.tokens[:, :R], mask=mask_out, lengths=mask_out.sum(axis=1, dtype=jnp.int32),
        logprobs=s.logprobs[:, :R], prompt_tokens=ids, prompt_mask=mask,
        teacher_logprobs=s.teacher_logprobs[:, :R] if with_teacher else None,
        weights=s.weights[:, :R] if with_teacher else None, reverse_kl=s.reverse_kl[:, :R] if with_teacher else None)


def _choose(s: _LoopState, filled, key, alpha, config: SamplingConfig, num_real: int):
    """Pick one token per row; returns (token, log q(token), log p(token), importance weight, KL(q || p))."""
    if not (config.greedy or config.top_k or config.top_p < 1.0):
        banned = (_banned_ngrams(s.history, s.history_mask, filled, config.no_repeat_ngram_size, s.logits.shape[-1])
                  if config.no_repeat_ngram_size else None)
        u = jax.random.uniform(key, (s.logits.shape[0],), jnp.float32)
        return _block_draw(s.logits, s.teacher_logits, u, alpha, config.temperature, num_real, banned)
    temperature = 1.0 if config.greedy else config.temperature
    log_q = jax.nn.log_softmax(s.logits[:, :num_real].astype(jnp.float32) / temperature, axis=-1)
    if s.teacher_logits is not None:
        log_p = jax.nn.log_softmax(s.teacher_logits[:, :num_real].astype(jnp.float32) / temperature, axis=-1)
        log_mix = jnp.logaddexp(jnp.log1p(-alpha) + log_q, jnp.log(alpha) + log_p)
    else:
        log_p, log_mix = log_q, log_q
    scores = log_mix
    if config.no_repeat_ngram_size:
        scores = jnp.where(_banned_ngrams(s.history, s.history_mask, filled, config.no_repeat_ngram_size,
                                          scores.shape[-1]), -jnp.inf, scores)
    if config.top_k:
        scores = top_k_filter(scores, config.top_k)
    if config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    token = jnp.argmax(scores, axis=-1) if config.greedy else sample_categorical(key, scores)
    token = token.astype(jnp.int32)

    def at(table):
        return jnp.take_along_axis(table, token[:, None], axis=-1)[:, 0]

    logq = at(log_q)
    kl = losses.reverse_kl(log_q, log_p) if s.teacher_logits is not None else jnp.zeros_like(logq)
    return token, logq, at(log_p), jnp.exp(logq - at(log_mix)), kl


BLOCK = 128  # ids in a block of _block_draw (the sampler's decode heads are a whole number of them)


def _block_draw(logits: Float[Array, "B Vd"], teacher_logits: Float[Array, "B Vt"] | None, u: Float[Array, " B"],
                alpha, temperature: float, num_real: int, banned: Bool[Array, "B Vb"] | None = None):
    """`_choose` without top-k, top-p or greedy: one draw per row from (1 - alpha) q + alpha p (q alone without a
    teacher), over the ids not `banned` (n-gram blocking; renormalised over the rest, as the filtered path's -inf
    scores), by inverting its CDF at `u` (uniform in [0, 1)) in two levels: the block of BLOCK ids whose
    cumulative mass passes u, then the id within it, from that block's logits alone. The logits are read once for
    each block's log-normaliser (`losses.log_normalisers`: one running pass off CPU; with `banned`, the allowed
    ids' too in the same pass), and with a teacher once more for KL(q || p); the rest is [B, V / BLOCK] or
    [B, BLOCK] in size. Ids from `num_real` on have no mass. Returns what `_choose` does: log q, log p, the
    weight and the KL of the unfiltered distributions."""
    B = logits.shape[0]
    n = -(-num_real // BLOCK)  # blocks holding real ids

    def blocked(x, fill=0):  # [B, blocks, BLOCK]: all of the array's blocks, so none spans two vocabulary shards
        if x.shape[-1] % BLOCK or x.shape[-1] < n * BLOCK:  # (the sampler's arrays are whole blocks wide)
            x = jnp.pad(x, ((0, 0), (0, max(-(-x.shape[-1] // BLOCK), n) * BLOCK - x.shape[-1])),
                        constant_values=fill)
        return x.reshape(B, -1, BLOCK)

    def scaled(x, at):  # logits / temperature in float32, -inf at ids from num_real on
        return jnp.where(at < num_real, x.astype(jnp.float32) / temperature, -jnp.inf)

    def bans(blocks):  # `banned` laid out as an array of `blocks` blocks (unbanned past its width), or None
        if banned is None:
            return None
        ban = banned[:, :blocks * BLOCK]
        return jnp.pad(ban, ((0, 0), (0, blocks * BLOCK - ban.shape[-1]))).reshape(B, blocks, BLOCK)

    def distribution(x):
        """Scaled blocks; the first n blocks' masses and cumulative sums for the draw (allowed ids only), both
        relative to the whole distribution's total `z`; the log-normaliser."""
        z = scaled(x, jnp.arange(x.shape[1] * BLOCK).reshape(-1, BLOCK))
        ban = bans(z.shape[1])
        if ban is None:
            block_lse = allowed_lse = losses.log_normalisers(z)[0][:, :n]  # the blocks past n hold no real id
        else:
            block_lse, allowed_lse = (x[:, :n] for x in losses.log_normalisers(z, jnp.where(ban, -jnp.inf, z)))
        top = jnp.max(block_lse, axis=-1, keepdims=True)
        mass = jnp.exp(block_lse - top)
        cdf = jnp.cumsum(mass, axis=-1)
        total = cdf[:, -1:]
        if ban is not None:
            mass = jnp.exp(allowed_lse - top)
            cdf = jnp.cumsum(mass, axis=-1)
        return z, ban, mass, cdf, total, top[:, 0] + jnp.log(total[:, 0])

    raw_q = blocked(logits)
    zq, ban, mass, cdf, total_q, lse_q = distribution(raw_q)
    if teacher_logits is not None:
        raw_p = blocked(teacher_logits)
        zp, _, mass_p, cdf_p, total_p, lse_p = distribution(raw_p)
        # the mixture's block masses and cumulative sums, from each side's normalised ones
        mass, cdf = ((1 - alpha) * mass / total_q + alpha * mass_p / total_p,
                     (1 - alpha) * cdf / total_q + alpha * cdf_p / total_p)
        if zq.shape[1] != zp.shape[1]:  # vocabularies of two sizes: their first n blocks, the real ids
            zq, zp = zq[:, :n], zp[:, :n]
        lq, lp = zq - lse_q[:, None, None], zp - lse_p[:, None, None]
        kl = jnp.sum(jnp.where(lq > -jnp.inf, jnp.exp(lq) * (lq - lp), 0.0), axis=(1, 2))

    at = u * cdf[:, -1]
    block = _inverse_cdf(cdf, mass, at)

    def pick(table):  # [B, ...] at each row's block
        return jnp.take_along_axis(table, block.reshape((B,) + (1,) * (table.ndim - 1)), axis=1)[:, 0]

    share = jnp.clip((at - (pick(cdf) - pick(mass))) / pick(mass), 0.0, 1.0)  # how far into its block
    block_ids = block[:, None] * BLOCK + jnp.arange(BLOCK)
    lq_block = scaled(pick(raw_q), block_ids) - lse_q[:, None]  # [B, BLOCK], from that block's logits alone
    inside = jnp.exp(lq_block)
    if teacher_logits is not None:
        lp_block = scaled(pick(raw_p), block_ids) - lse_p[:, None]
        inside = (1 - alpha) * inside + alpha * jnp.exp(lp_block)
    if ban is not None:
        inside = jnp.where(pick(ban), 0.0, inside)
    inside_cdf = jnp.cumsum(inside, axis=-1)
    offset = _inverse_cdf(inside_cdf, inside, share * inside_cdf[:, -1])
    token = (block * BLOCK + offset).astype(jnp.int32)

    def at_token(table):
        return jnp.take_along_axis(table, offset[:, None], axis=-1)[:, 0]

    logq = at_token(lq_block)
    if teacher_logits is None:
        return token, logq, logq, jnp.ones_like(logq), jnp.zeros_like(logq)
    logp = at_token(lp_block)
    log_mix = jnp.logaddexp(jnp.log1p(-alpha) + logq, jnp.log(alpha) + logp)
    return token, logq, logp, jnp.exp(logq - log_mix), kl


def sample_categorical(key, scores: Float[Array, "B V"]) -> Int[Array, " B"]:
    """One draw per row from softmax(scores) by inverting the float32 CDF with one uniform per row
    (what torch.multinomial does); a Gumbel draw would need V random numbers per row and step."""
    probs = jax.nn.softmax(scores, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, (scores.shape[0], 1), jnp.float32)[:, 0] * cdf[:, -1]
    return _inverse_cdf(cdf, probs, u)


def _inverse_cdf(cdf: Float[Array, "B N"], mass: Float[Array, "B N"], at: Float[Array, " B"]) -> Int[Array, " B"]:
    """Per row, the first index whose cumulative mass passes `at`; never an index without mass (float32
    rounding can put `at` at the total, past the last id with mass, when ids without mass follow it)."""
    last = jnp.max(jnp.where(mass > 0, jnp.arange(mass.shape[-1]), 0), axis=-1)
    return jnp.minimum(jnp.sum(cdf <= at[:, None], axis=-1), last)


def top_k_filter(scores: Float[Array, "B V"], k: int) -> Float[Array, "B V"]:
    """Keep the k highest scores (ties with the k-th kept, as transformers does); others become -inf."""
    if k >= scores.shape[-1]:
        return scores
    kth = jax.lax.top_k(scores, k)[0][:, -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores: Float[Array, "B V"], top_p: float) -> Float[Array, "B V"]:
    """Keep the smallest set of highest-probability ids whose mass reaches top_p (at least one)."""
    ordered = jnp.sort(scores, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first has mass_before 0
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
    return jnp.where(scores < threshold, -jnp.inf, scores)


def _banned_ngrams(history, history_mask, filled, n: int, vocab: int) -> Bool[Array, "B V"]:
    """Ids that would complete an n-gram already present among the real tokens (prompt included)."""
    B, L = history.shape
    windows = L - n + 1
    if windows <= 0:
        return jnp.zeros((B, vocab), bool)
    prefix = jax.lax.dynamic_slice(history, (0, jnp.maximum(filled - (n - 1), 0)), (B, n - 1))
    prefix_ok = jax.lax.dynamic_slice(history_mask, (0, jnp.maximum(filled - (n - 1), 0)), (B, n - 1)).all(-1)
    prefix_ok &= filled >= n - 1
    match = jnp.ones((B, windows), bool)
    for i in range(n - 1):
        match &= history[:, i:i + windows] == prefix[:, i:i + 1]
    for i in range(n):
        match &= history_mask[:, i:i + windows]
    match &= (jnp.arange(windows) + n - 1 < filled)[None, :]
    match &= prefix_ok[:, None]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, windows))
    return jnp.zeros((B, vocab), bool).at[rows, history[:, n - 1:]].max(match)
