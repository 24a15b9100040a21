"""A functional MoE feed-forward layer (router, SwiGLU experts, optional shared expert) for
use per shard inside `jax.shard_map`, on top of `Buffer.dispatch` / `Buffer.combine`.

    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jax_ep

    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("dp", "ep"))
    buf = jax_ep.Buffer(mesh, "ep", num_experts=64, hidden=1024)     # eager, outside jit
    params = jax_ep.init_moe_params(jax.random.key(0), hidden=1024, ffn=512,
                                    num_experts=64, shared_ffn=1024)   # global arrays
    specs = jax_ep.moe_partition_specs("ep")   # router / shared replicated, experts over ep

    def layer(x, params):                      # per shard: x [T, H], params of this rank
        out = jax_ep.moe(buf, x, params, top_k=8, score_func="softmax")
        aux = jax.lax.pmean(out.aux_loss, ("dp", "ep"))
        return out.y, aux

    tokens = P(("dp", "ep"))                   # tokens split over both axes
    fn = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=(tokens, specs),
                               out_specs=(tokens, P())))
    y, aux = fn(x, params)                     # x [dp * ep * T, 1024] bfloat16

Per shard, with `R` EP ranks, `E` experts, `L = E / R` local experts, `T` tokens, `H`
hidden, `F` expert FFN width, `Fs` shared FFN width, `K` top-k, `C` dispatch capacity:

  1. router: logits = x @ router (float32 [T, E]); scores = softmax(logits) or
     sigmoid(logits); topk_idx int32 [T, K], topk_weights float32 [T, K] = the top-k scores
     (`jax.lax.top_k`), optionally divided by their sum, times `routed_scaling`.
  2. dispatch (expert layout): recv_x [C, H], rows grouped by local expert.
  3. experts: h = recv_x @ w_gate_up[e] ([C, 2F]); act = silu(h[:, :F]) * h[:, F:] * gate
     weight of the row (float32, cast to x.dtype); out_rows = act @ w_down[e] ([C, H]).
  4. combine: y [T, H] = sum over a token's experts, plus the shared expert
     silu(x @ Sg) * (x @ Su) @ shared_down (added inside combine as its bias, in float32).

Differentiable (jax.grad) in x, router and every weight: the top-k weights' gradient reaches
the router through dispatch's custom VJP. Works under jax.jit and jax.checkpoint, and on
meshes with other axes besides the EP one (e.g. (dp, ep)).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_ep.grouped_matmul import IMPLS, grouped_matmul

SCORE_FUNCS = ("softmax", "sigmoid")


class MoEParams(NamedTuple):
    """Weights of one MoE layer. Inside shard_map these are per shard (this rank's experts);
    `init_moe_params` returns the global arrays, `moe_partition_specs` their specs.

    router:         float32 [H, E]      replicated.
    w_gate_up:      [L, H, 2F]          this rank's experts (global [E, H, 2F] sharded over
                                        the EP axis, axis 0); columns [:F] gate, [F:] up.
    w_down:         [L, F, H]           this rank's experts (global [E, F, H]).
    shared_gate_up: [H, 2Fs] or None    optional shared expert (replicated); [:Fs] gate,
                                        [Fs:] up.
    shared_down:    [Fs, H] or None     (replicated); give both shared weights or neither.

    Expert and shared weights may be bfloat16 or float32; they are cast to x.dtype for the
    matmuls (accumulation is float32), so float32 master weights work with bfloat16 x.
    """

    router: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array
    shared_gate_up: Optional[jax.Array] = None
    shared_down: Optional[jax.Array] = None


class MoEOutput(NamedTuple):
    """`moe` result, per shard.

    y:                 [T, H] x.dtype   the layer's output for this shard's tokens.
    aux_loss:          float32 []       load-balancing loss of this shard's tokens
                                        (Switch/GShard): E * sum_e f_e * p_e, f_e = fraction
                                        of the T*K selections routed to e, p_e = mean router
                                        probability of e (softmax, or sigmoid scores
                                        normalized to sum 1). Average over shards with
                                        `jax.lax.pmean` if wanted.
    z_loss:            float32 []       mean over tokens of logsumexp(logits)^2.
    num_dropped:       int32 []         (token, expert) rows this rank's dispatch could not
                                        fit in `capacity` (0 with the default capacity).
    tokens_per_expert: int32 [E]        selections of each expert by this shard's tokens.
    """

    y: jax.Array
    aux_loss: jax.Array
    z_loss: jax.Array
    num_dropped: jax.Array
    tokens_per_expert: jax.Array


# ------------------------------------------------------------------------ router
def route(x: jax.Array, router: jax.Array, *, top_k: int, score_func: str = "softmax",
          normalize_topk: bool = False, routed_scaling: float = 1.0):
    """Top-k routing of x [T, H] with router [H, E].

    Returns (topk_idx int32 [T, K], topk_weights float32 [T, K], logits float32 [T, E],
    probs float32 [T, E]); `probs` are the softmax, or the sigmoid scores normalized to sum
    1 per token (what the load-balancing loss uses).
    """
    logits = jnp.dot(x, router.astype(x.dtype), preferred_element_type=jnp.float32)
    if score_func == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:  # sigmoid (DeepSeek-V3 style): top-k on independent sigmoid scores
        scores = jax.nn.sigmoid(logits)
        probs = scores / (scores.sum(-1, keepdims=True) + 1e-20)
    topk_weights, topk_idx = jax.lax.top_k(scores, top_k)
    if normalize_topk:
        topk_weights = topk_weights / (topk_weights.sum(-1, keepdims=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling
    return topk_idx.astype(jnp.int32), topk_weights.astype(jnp.float32), logits, probs


def router_losses(topk_idx: jax.Array, logits: jax.Array, probs: jax.Array):
    """Router statistics of one shard from `route`'s outputs (topk_idx int32 [T, K], logits
    and probs float32 [T, E]). Returns (tokens_per_expert int32 [E], aux_loss float32 [],
    z_loss float32 []): aux_loss = E * sum_e f_e * p_e (f_e the fraction of the T*K
    selections routed to e, p_e the mean probability of e), z_loss = mean logsumexp^2."""
    num_tokens, num_experts = logits.shape
    top_k = topk_idx.shape[1]
    tokens_per_expert = jnp.zeros(num_experts, jnp.int32).at[topk_idx.reshape(-1)].add(1)
    fraction = tokens_per_expert.astype(jnp.float32) / max(num_tokens * top_k, 1)
    mean_prob = probs.sum(0) / max(num_tokens, 1)
    aux_loss = num_experts * jnp.sum(fraction * mean_prob)
    z_loss = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2) / max(num_tokens, 1)
    return tokens_per_expert, aux_loss.astype(jnp.float32), z_loss.astype(jnp.float32)


def swiglu(h: jax.Array) -> jax.Array:
    """[N, 2F] -> float32 [N, F]: silu(gate) * up (gate columns [:F], up [F:])."""
    gate, up = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return jax.nn.silu(gate) * up


def shared_expert(x: jax.Array, params: MoEParams) -> Optional[jax.Array]:
    """The shared expert on x [T, H]: [T, H] x.dtype, or None without shared weights."""
    if params.shared_gate_up is None:
        return None
    hs = jnp.dot(x, params.shared_gate_up.astype(x.dtype), preferred_element_type=jnp.float32)
    act = swiglu(hs).astype(x.dtype)
    return jnp.dot(act, params.shared_down.astype(x.dtype),
                   preferred_element_type=jnp.float32).astype(x.dtype)


# ------------------------------------------------------------------------ the layer
def moe(buf, x: jax.Array, params: MoEParams, *, top_k: int, score_func: str = "softmax",
        normalize_topk: bool = False, routed_scaling: float = 1.0,
        capacity: Optional[int] = None, matmul_impl: str = "auto") -> MoEOutput:
    """One MoE feed-forward, per shard inside `jax.shard_map` over the Buffer's mesh.

    Args:
      buf: a `jax_ep.Buffer` whose axis is the EP axis of the mesh.
      x: [T, H] bfloat16 or float32, this shard's tokens (H = buf.config.hidden).
      params: MoEParams of this rank: router float32 [H, E], w_gate_up [L, H, 2F],
        w_down [L, F, H], optional shared_gate_up [H, 2Fs] and shared_down [Fs, H]
        (L = buf.num_local_experts, E = buf.config.num_experts).
      top_k: K, experts per token, 1 <= K <= E.
      score_func: "softmax" (softmax over E, then top-k) or "sigmoid" (top-k of sigmoid
        scores, DeepSeek-V3 style).
      normalize_topk: divide each token's top-k weights by their sum (+1e-20).
      routed_scaling: multiply the top-k weights by this.
      capacity: C, rows of the expert-layout dispatch per rank. Default: the worst case
        T * R * min(K, L), so nothing drops; rows past C are dropped (their experts'
        contribution is missing from y) and counted in `num_dropped`.
      matmul_impl: `jax_ep.grouped_matmul` impl: "auto", "mosaic" or "xla".

    Returns MoEOutput: y [T, H] x.dtype, aux_loss float32 [], z_loss float32 [],
    num_dropped int32 [], tokens_per_expert int32 [E]. Differentiable in x and every weight.
    """
    _check(buf, x, params, top_k, score_func, matmul_impl)
    # Router and its statistics.
    topk_idx, topk_weights, logits, probs = route(
        x, params.router, top_k=top_k, score_func=score_func, normalize_topk=normalize_topk,
        routed_scaling=routed_scaling)
    tokens_per_expert, aux_loss, z_loss = router_losses(topk_idx, logits, probs)
    # Shared expert on the local tokens: added as combine's bias (in float32 there).
    bias = shared_expert(x, params)
    # Routed experts.
    out = buf.dispatch(x, topk_idx, topk_weights, layout="expert", capacity=capacity)
    group_sizes = out.num_recv_tokens_per_expert
    h = grouped_matmul(out.recv_x, params.w_gate_up.astype(x.dtype), group_sizes,
                       impl=matmul_impl)                                       # [C, 2F]
    gate_weight = out.recv_topk_weights.sum(-1, keepdims=True)                 # f32 [C, 1]
    act = (swiglu(h) * gate_weight).astype(x.dtype)                            # [C, F]
    out_rows = grouped_matmul(act, params.w_down.astype(x.dtype), group_sizes,
                              impl=matmul_impl)                                # [C, H]
    y = buf.combine(out_rows, out.handle, bias=bias)
    return MoEOutput(y=y, aux_loss=aux_loss, z_loss=z_loss,
                     num_dropped=out.num_dropped.astype(jnp.int32),
                     tokens_per_expert=tokens_per_expert)


# ------------------------------------------------------------------------ validation
def _is_float(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating)


def _check(buf, x, params, top_k, score_func, matmul_impl):
    config = getattr(buf, "config", None)
    if config is None or not hasattr(buf, "dispatch"):
        raise TypeError(f"buf must be a jax_ep.Buffer, got {type(buf).__name__}.")
    if not isinstance(params, MoEParams):
        raise TypeError(f"params must be a jax_ep.MoEParams, got {type(params).__name__}.")
    hidden, num_experts, num_local = config.hidden, config.num_experts, config.num_local_experts
    axis = config.axis_name
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [num_tokens, {hidden}] per shard (the Buffer's hidden); got "
                         f"{x.shape}. Call moe inside shard_map with this shard's tokens.")
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise TypeError(f"x has dtype {x.dtype}; moe takes bfloat16 or float32.")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func={score_func!r} must be one of {SCORE_FUNCS}.")
    if matmul_impl not in IMPLS:
        raise ValueError(f"matmul_impl={matmul_impl!r} must be one of {IMPLS}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) \
            or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be a Python int in [1, {num_experts}] "
                         "(the Buffer's num_experts).")

    router = params.router
    if router.ndim != 2 or router.shape != (hidden, num_experts):
        raise ValueError(f"params.router must be [{hidden}, {num_experts}] (hidden, num_experts "
                         f"of the Buffer); got {router.shape}.")
    if not _is_float(router):
        raise TypeError(f"params.router must be floating point (float32), got {router.dtype}.")

    w1, w2 = params.w_gate_up, params.w_down
    if w1.ndim != 3 or w1.shape[1] != hidden or w1.shape[2] % 2:
        raise ValueError(f"params.w_gate_up must be [L, {hidden}, 2F] (gate columns [:F], up "
                         f"[F:]); got {w1.shape}.")
    if w1.shape[0] != num_local:
        hint = (f" It looks global ({num_experts} experts): shard it over axis {axis!r} "
                f"(in_specs from moe_partition_specs({axis!r}))."
                if w1.shape[0] == num_experts and num_experts != num_local else "")
        raise ValueError(f"params.w_gate_up holds {w1.shape[0]} experts but this rank owns "
                         f"L = {num_local} (num_experts / ranks on {axis!r}).{hint}")
    ffn = w1.shape[2] // 2
    if w2.shape != (num_local, ffn, hidden):
        raise ValueError(f"params.w_down must be [{num_local}, {ffn}, {hidden}] (L, F, H; F = "
                         f"half of w_gate_up's last axis); got {w2.shape}.")
    if not (_is_float(w1) and _is_float(w2)):
        raise TypeError(f"expert weights must be floating point; got w_gate_up {w1.dtype}, "
                        f"w_down {w2.dtype}.")

    s1, s2 = params.shared_gate_up, params.shared_down
    if (s1 is None) != (s2 is None):
        raise ValueError("give both params.shared_gate_up and params.shared_down for a shared "
                         "expert, or neither.")
    if s1 is not None:
        if s1.ndim != 2 or s1.shape[0] != hidden or s1.shape[1] % 2:
            raise ValueError(f"params.shared_gate_up must be [{hidden}, 2Fs]; got {s1.shape}.")
        shared_ffn = s1.shape[1] // 2
        if s2.shape != (shared_ffn, hidden):
            raise ValueError(f"params.shared_down must be [{shared_ffn}, {hidden}] (Fs, H; Fs = "
                             f"half of shared_gate_up's columns); got {s2.shape}.")
        if not (_is_float(s1) and _is_float(s2)):
            raise TypeError(f"shared weights must be floating point; got {s1.dtype}, {s2.dtype}.")


# ------------------------------------------------------------------------ helpers
def init_moe_params(key: jax.Array, *, hidden: int, ffn: int, num_experts: int,
                    shared_ffn: int = 0, dtype=jnp.bfloat16) -> MoEParams:
    """GLOBAL MoE weights, each normal with std 1 / sqrt(fan_in).

    Returns MoEParams: router float32 [H, E], w_gate_up dtype [E, H, 2F], w_down dtype
    [E, F, H], and with shared_ffn > 0 shared_gate_up dtype [H, 2Fs], shared_down dtype
    [Fs, H] (else None). Place them with `moe_partition_specs`.
    """
    for name, value in (("hidden", hidden), ("ffn", ffn), ("num_experts", num_experts)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int.")
    if not isinstance(shared_ffn, (int, np.integer)) or shared_ffn < 0:
        raise ValueError(f"shared_ffn={shared_ffn!r} must be an int >= 0 (0: no shared expert).")
    return _init(key, int(hidden), int(ffn), int(num_experts), int(shared_ffn), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init(key, hidden, ffn, num_experts, shared_ffn, dtype):
    # One compiled program: eager jax.random calls cost about a second each on CPU.
    keys = jax.random.split(key, 5)

    def normal(k, shape, fan_in, dt):
        return (jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)).astype(dt)

    shared_gate_up = shared_down = None
    if shared_ffn:
        shared_gate_up = normal(keys[3], (hidden, 2 * shared_ffn), hidden, dtype)
        shared_down = normal(keys[4], (shared_ffn, hidden), shared_ffn, dtype)
    return MoEParams(
        router=normal(keys[0], (hidden, num_experts), hidden, jnp.float32),
        w_gate_up=normal(keys[1], (num_experts, hidden, 2 * ffn), hidden, dtype),
        w_down=normal(keys[2], (num_experts, ffn, hidden), ffn, dtype),
        shared_gate_up=shared_gate_up, shared_down=shared_down)


def moe_partition_specs(ep_axis: str = "ep") -> MoEParams:
    """MoEParams of PartitionSpecs for shard_map's in_specs: router P(), expert weights
    P(ep_axis) (axis 0, the experts), shared weights P(). The shared specs also match params
    whose shared weights are None."""
    return MoEParams(router=P(), w_gate_up=P(ep_axis), w_down=P(ep_axis),
                     shared_gate_up=P(), shared_down=P())


def shard_moe_params(params: MoEParams, mesh: jax.sharding.Mesh, ep_axis: str = "ep") -> MoEParams:
    """Place GLOBAL MoEParams (e.g. from `init_moe_params`) on `mesh`: expert weights split
    over `ep_axis` (axis 0), router and shared weights replicated. Missing (None) shared
    weights stay None."""
    specs = moe_partition_specs(ep_axis)
    return MoEParams(*(None if a is None else jax.device_put(a, jax.sharding.NamedSharding(mesh, s))
                       for a, s in zip(params, specs)))
