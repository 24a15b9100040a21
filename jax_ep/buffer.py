"""`jax_ep.Buffer`: the public API.

A Buffer owns the communication resources of one mesh axis (one EP group per combination
of the other mesh axes) and exposes DeepEP's operations as JAX functions that run per shard
inside `shard_map` under `jax.jit`. Every operation goes through the Buffer's backend
(`jax_ep.backend.Backend`). `dispatch` / `combine` carry a custom VJP (dispatch's backward is
a combine, combine's backward is a cached dispatch), so they work under `jax.grad` on every
backend.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.backend import Backend, ReferenceBackend
from jax_ep.vma import cotangent_like
from jax_ep import reference
from jax_ep.types import (DispatchLayout, DispatchOutput, EPConfig, Handle,
                          LowLatencyDispatchOutput, LowLatencyHandle, LowLatencyPending, Pending)

BACKENDS = ("auto", "cuda", "reference")
LAYOUTS = ("rank", "expert")
X_DTYPES = (jnp.bfloat16, jnp.float32)
DEFAULT_MAX_TOKENS_PER_RANK = 4096
DEFAULT_NUM_SMS = 48
DEFAULT_TIMEOUT_S = 300.0  # long enough for a peer's slow first compile (see Buffer)
_buffer_ids = itertools.count(1)  # Buffer.id: advances identically in every process
_NUM_TOKENS = "jax_ep.num_tokens"  # LowLatencyPending.info key the Buffer adds: the send's T


# ------------------------------------------------------------------ argument checks
def _int(name: str, value, hint: str = "") -> int:
    """`value` as an int if it is a Python or NumPy integer; a TypeError for any other type
    (bools, floats such as 4096.0, strings, arrays)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}) must be a Python int, e.g. "
                        f"{name}=int(...); it is a size, never rounded or truncated.{hint}")
    return int(value)


def _positive_int(name: str, value, hint: str = "") -> int:
    """`value` as an int if it is a positive Python or NumPy integer; a TypeError for any
    other type (`_int`), a ValueError for 0 or less."""
    value = _int(name, value, hint)
    if value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int.{hint}")
    return value


def _low_latency_max_tokens_per_rank(value, max_tokens_per_rank: int) -> Optional[int]:
    """The Buffer's low_latency_max_tokens_per_rank, checked: None, or an int in
    [0, max_tokens_per_rank] (a TypeError or ValueError otherwise)."""
    if value is None:
        return None
    hint = (" Pass 0 for a Buffer that runs no low-latency ops, or None (the default) for "
            "max_tokens_per_rank.")
    value = _int("low_latency_max_tokens_per_rank", value, hint)
    if value < 0:
        raise ValueError(f"low_latency_max_tokens_per_rank={value} must be 0 or a positive "
                         f"int.{hint}")
    if value > max_tokens_per_rank:
        raise ValueError(f"low_latency_max_tokens_per_rank={value} exceeds max_tokens_per_rank="
                         f"{max_tokens_per_rank}; pass at most {max_tokens_per_rank}, or raise "
                         "max_tokens_per_rank.")
    return value


def _flag(name: str, value) -> bool:
    """`value` if it is a Python or NumPy bool, else a TypeError (a traced or truthy value
    would be silently coerced)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r:.60} must be True or False (a Python bool; static).")
    return bool(value)


def _check_array(name: str, value):
    """TypeError unless `value` is an array (jax.Array, a tracer, or a numpy array)."""
    if not isinstance(value, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray), got "
                        f"{type(value).__name__}; convert it with jnp.asarray({name}).")


def check_topk_idx(topk_idx, num_experts: int, *, distinct: bool = True) -> jax.Array:
    """Opt-in device check of routing: bool [] True when every entry of topk_idx [T, K] is -1
    or in [0, num_experts) and (with `distinct`) no token repeats an expert.

    The Buffer's ops cannot see array values at trace time: they treat ids outside
    [0, E) (other than -1) as -1 and, in normal mode, give a repeated expert one row
    (docs/bad_input.md). Runs anywhere, e.g. per shard inside shard_map; combine the result
    with `jax.experimental.checkify.check` in a checkified function, or return it and assert
    on the host:

        ok = buf.check_topk_idx(topk_idx)   # or jax_ep.check_topk_idx(topk_idx, E)
        checkify.check(ok, "topk_idx has ids outside [0, E) or repeated experts")
    """
    num_experts = _positive_int("num_experts", num_experts)
    distinct = _flag("distinct", distinct)
    _check_array("topk_idx", topk_idx)
    if topk_idx.ndim != 2 or not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise TypeError(f"topk_idx must be an integer array [num_tokens, top_k]; got "
                        f"{topk_idx.dtype} {topk_idx.shape}.")
    topk_idx = jnp.asarray(topk_idx)
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    ok = jnp.all(valid | (topk_idx == -1))
    if distinct:
        num_slots = topk_idx.shape[1]
        earlier = jnp.tri(num_slots, k=-1, dtype=bool)  # [k, k'] True where k' < k
        same = topk_idx[:, :, None] == topk_idx[:, None, :]
        ok = ok & ~jnp.any(same & earlier & valid[:, :, None])
    return ok


# ------------------------------------------------------------------ differentiable ops
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dispatch(backend, capacity, expert_layout, x, topk_idx, topk_weights):
    """x: an array, or an FP8 tuple (x, x_scales), which Buffer.dispatch guards against
    differentiation (`_not_differentiable`): its cotangent is never needed."""
    x, x_scales = x if isinstance(x, tuple) else (x, None)
    return backend.dispatch(x, x_scales, topk_idx, topk_weights, capacity, expert_layout)


def _dispatch_fwd(backend, capacity, expert_layout, x, topk_idx, topk_weights):
    out = _dispatch(backend, capacity, expert_layout, x, topk_idx, topk_weights)
    handle, recv_topk_idx = out[7], out[2]
    # Zero-size slices carry x's and topk_weights' types (their vma inside shard_map).
    x_type = None if isinstance(x, tuple) else x[:0]
    return out, (handle, recv_topk_idx, x_type, topk_weights[:0])


def _dispatch_bwd(backend, capacity, expert_layout, residuals, ct):
    handle, recv_topk_idx, x_type, weights_type = residuals
    ct_recv_x, ct_recv_topk_weights = ct[0], ct[3]
    dx = None  # an FP8 x: no cotangent (see _dispatch)
    if x_type is not None:
        dx = cotangent_like(backend.combine(ct_recv_x, handle, None, expert_layout), x_type)
    dweights = backend.combine_topk_weights_grad(ct_recv_topk_weights, recv_topk_idx, handle,
                                                 expert_layout)
    return dx, None, cotangent_like(dweights, weights_type)


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _not_differentiable(message, arrays):
    """`arrays` unchanged; raises TypeError(message) at trace time when JAX differentiates
    through them (the forward rule runs only when one of them carries a tangent)."""
    return arrays


def _not_differentiable_fwd(message, arrays):
    raise TypeError(message)


def _not_differentiable_bwd(message, residuals, ct):  # never runs: the forward rule raises
    raise TypeError(message)


_not_differentiable.defvjp(_not_differentiable_fwd, _not_differentiable_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine(backend, expert_layout, y, handle, bias):
    return backend.combine(y, handle, bias, expert_layout)


def _combine_fwd(backend, expert_layout, y, handle, bias):
    out = backend.combine(y, handle, bias, expert_layout)
    # Zero-size slices carry C, dtypes and vma (inside shard_map) of y and bias statically.
    y_type = y[:, :0]
    bias_type = None if bias is None else bias[:, :0]
    return out, (handle, y_type, bias_type)


def _combine_bwd(backend, expert_layout, residuals, ct):
    handle, y_type, bias_type = residuals
    dy = backend.cached_dispatch(ct, handle, y_type.shape[0], expert_layout)
    dhandle = jax.tree.map(lambda _: None, handle)
    dbias = None if bias_type is None else cotangent_like(ct, bias_type).astype(bias_type.dtype)
    return cotangent_like(dy.astype(y_type.dtype), y_type), dhandle, dbias


_combine.defvjp(_combine_fwd, _combine_bwd)


# ------------------------------------------------------------------ the Buffer
class Buffer:
    """Expert-parallel communication over one mesh axis.

    Args:
      mesh: a `jax.sharding.Mesh`. Every other mesh axis makes independent EP groups,
        e.g. a (dp=2, ep=4) mesh with axis_name="ep" holds two groups of 4 ranks.
      axis_name: the mesh axis along which experts are sharded. EP rank = index on it.
      num_experts: E, global experts; a multiple of the axis size R. Rank r owns experts
        [r * E/R, (r+1) * E/R).
      hidden: H, the model width; a multiple of 128 (FP8 scales cover 128 channels).
      backend: "cuda" (our CUDA kernels; the GPUs of an EP group on one host, driven by
        one process or by one process each under jax.distributed), "reference" (pure JAX,
        any platform), or "auto" (cuda when available, else reference).
      max_tokens_per_rank: the most tokens one rank passes in one call (sizes the CUDA
        buffers; the upper bound of low-latency `max_tokens_per_rank`, whose default is the
        call's own token count).
      low_latency_max_tokens_per_rank: the most tokens per rank of a low-latency op (its T
        and its `max_tokens_per_rank` M), at most max_tokens_per_rank. None (the default):
        max_tokens_per_rank. 0: the Buffer runs no low-latency ops (each raises a ValueError).
        On an internode Buffer it sizes the low-latency staging, a symmetric allocation of
        its own (0: none), so a decode cap far below max_tokens_per_rank saves most of that
        memory (`region_bytes`). A one-host Buffer's low-latency ops share the normal mode's
        staging: there it only caps the ops and saves no memory.
      num_ranks_per_node: ranks sharing one NVLink domain (defaults to min(R, 8)); sets the
        length of `num_tokens_per_rdma_rank`. Fewer than R makes an internode Buffer: ranks
        in nodes of this many consecutive ranks, combine summed per node then across nodes,
        and with backend="cuda" the internode kernels over NVSHMEM, which need one process per
        GPU (`python -m jax_ep.launch`); creating and closing it are then collective.
      num_sms: SMs the CUDA normal-mode kernels use (even: half send, half receive).
      low_latency_num_sms: SMs (one block each) of the CUDA low-latency kernels, fused and
        hooked. None: 96, or every SM of a GPU that has fewer. Every block must be resident
        at once, so at most the GPU's SM count (the op raises otherwise).
      timeout_s: seconds (a positive finite number) a CUDA kernel waits for a peer before it
        gives up and the op fails (see `check`). The default, 300 s, is long enough for a
        slow first compile on a peer: the first call of a jitted function waits for the
        ranks still compiling it. Lower it to learn of a dead peer sooner. With one process
        per GPU, creating the Buffer also waits at most this long for the other processes
        (a RuntimeError names those that did not create it).

    Every method runs per shard inside `jax.shard_map(..., mesh=mesh)` (usually under
    `jax.jit`), with per-shard shapes as documented. Create the Buffer eagerly, outside jit.

    Bad input: every size is a Python int (a TypeError otherwise: 4096.0, True or "8" are
    never truncated), and every operation checks at trace time that it runs inside a
    shard_map whose `axis_name` axis has the Buffer's size, and every operand's type, shape
    and dtype, raising TypeError or ValueError with what to change. What only device data
    can tell (expert ids outside [0, E), repeated experts, NaN) has a documented behaviour
    and an opt-in check, `check_topk_idx`. docs/bad_input.md lists every case.

    Lifecycle: `close()` releases the backend's resources (idempotent); every operation on
    a closed Buffer raises RuntimeError. `with jax_ep.Buffer(...) as buf:` closes it at the
    end of the block.

    Attributes:
      id: int, unique in this process, from a per-process counter (1, 2, ...); stamped into
        every Handle and LowLatencyHandle the Buffer makes, so that only this Buffer's
        combine accepts them. Every process of a multi-process program must create its
        Buffers in the same order, so that one Buffer has the same id everywhere.
      mesh, config: the mesh and its EPConfig.
    """

    def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, *, num_experts: int, hidden: int,
                 backend: str = "auto", max_tokens_per_rank: int = DEFAULT_MAX_TOKENS_PER_RANK,
                 low_latency_max_tokens_per_rank: Optional[int] = None,
                 num_ranks_per_node: Optional[int] = None, num_sms: int = DEFAULT_NUM_SMS,
                 low_latency_num_sms: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (of devices), got "
                            f"{type(mesh).__name__}.")
        if not isinstance(axis_name, str):
            raise TypeError(f"axis_name={axis_name!r} must be a str, the name of one mesh axis "
                            f"(one of {tuple(mesh.shape)}).")
        if axis_name not in mesh.shape:
            raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; the mesh has "
                             f"axes {tuple(mesh.shape)}. Pass one of those.")
        num_ranks = int(mesh.shape[axis_name])
        num_experts = _positive_int("num_experts", num_experts)
        if num_experts % num_ranks:
            raise ValueError(f"num_experts={num_experts} must be a positive multiple of the "
                             f"{num_ranks} ranks on axis {axis_name!r}, so every rank holds the "
                             "same number of experts.")
        hidden = _positive_int("hidden", hidden)
        if hidden % 128:
            raise ValueError(f"hidden={hidden} is not allowed: it must be a positive multiple of "
                             "128 (FP8 scales and vectorized copies cover 128 channels). Pad the "
                             "model width to a multiple of 128.")
        if num_ranks_per_node is None:
            num_ranks_per_node = min(num_ranks, 8)
        num_ranks_per_node = _positive_int(
            "num_ranks_per_node", num_ranks_per_node,
            f" Pass None for the default, min(R, 8) = {min(num_ranks, 8)}.")
        if num_ranks % num_ranks_per_node:
            raise ValueError(f"num_ranks_per_node={num_ranks_per_node} must divide the "
                             f"{num_ranks} ranks on axis {axis_name!r}.")
        max_tokens_per_rank = _positive_int("max_tokens_per_rank", max_tokens_per_rank)
        low_latency_max_tokens_per_rank = _low_latency_max_tokens_per_rank(
            low_latency_max_tokens_per_rank, max_tokens_per_rank)
        num_sms = _positive_int("num_sms", num_sms)
        if num_sms < 2 or num_sms % 2:
            raise ValueError(f"num_sms={num_sms} must be even and >= 2: half of the SMs send, "
                             "half receive.")
        if low_latency_num_sms is not None:
            low_latency_num_sms = _positive_int(
                "low_latency_num_sms", low_latency_num_sms,
                " Pass None for the default (96, or every SM of a smaller GPU).")
        if isinstance(timeout_s, (bool, np.bool_)) or not isinstance(timeout_s, numbers.Real):
            raise TypeError(f"timeout_s={timeout_s!r} must be a number of seconds (an int or a "
                            f"float), e.g. timeout_s={DEFAULT_TIMEOUT_S}.")
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive finite number of "
                             f"seconds, e.g. timeout_s={DEFAULT_TIMEOUT_S} (the default).")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
        self.mesh = mesh
        self.config = EPConfig(axis_name=axis_name, num_ranks=num_ranks,
                               num_experts=num_experts, hidden=hidden,
                               num_ranks_per_node=num_ranks_per_node,
                               max_tokens_per_rank=max_tokens_per_rank, num_sms=num_sms,
                               low_latency_num_sms=low_latency_num_sms,
                               low_latency_max_tokens_per_rank=low_latency_max_tokens_per_rank)
        self.id = next(_buffer_ids)
        self._closed = False
        self._backend: Backend = _make_backend(backend, mesh, self.config, float(timeout_s),
                                               self.id)

    # -------------------------------------------------------------- properties
    @property
    def backend(self) -> str:
        """"cuda" or "reference": the backend in use."""
        return self._backend.name

    @property
    def num_ranks(self) -> int:
        return self.config.num_ranks

    @property
    def num_local_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._closed

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the backend's resources (the CUDA buffers and peer mappings); idempotent.

        Every later operation on this Buffer raises RuntimeError, and jitted functions that
        use it must not run any more. With one process per GPU, close only after every rank
        ran its last operation on the Buffer (e.g. after `jax.block_until_ready` and a
        barrier), as a peer may still be reading this rank's memory."""
        if self._closed:
            return
        self._closed = True
        self._backend.close()

    def __enter__(self) -> "Buffer":
        self._check_open()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.close()

    def check(self) -> None:
        """Raise RuntimeError if a kernel of this Buffer failed (`Backend.take_error`), e.g.
        a CUDA kernel that gave up waiting for a peer.

        Kernels never hang: after `timeout_s` they record which operation waited for which
        rank and return; every later call on the Buffer then fails with that message. Call
        this after `jax.block_until_ready` to learn of it at once. The reference backend
        records no failures (its errors raise at once)."""
        self._check_open()
        message = self._backend.take_error()
        if message:
            raise RuntimeError(f"jax_ep: {message}")

    # -------------------------------------------------------------- validation
    def _check_open(self):
        if self._closed:
            raise RuntimeError(f"jax_ep: this Buffer is closed (Buffer {self.id}: close() or the "
                               "end of its with-block released its resources); make a new "
                               "jax_ep.Buffer to run more operations.")

    def _check_call(self, op):
        """Open, able to run `op` (a low-latency op needs low_latency_max_tokens_per_rank > 0),
        and called per shard inside shard_map over a mesh whose axis is the Buffer's, with the
        Buffer's size (checked at trace time on the current mesh)."""
        self._check_open()
        if op.startswith("low_latency_") and self.config.low_latency_max_tokens == 0:
            raise ValueError(f"Buffer.{op}: this Buffer was made with "
                             "low_latency_max_tokens_per_rank=0, so it runs no low-latency ops. "
                             "Make the Buffer with a positive low_latency_max_tokens_per_rank "
                             "(the most tokens per rank of a low-latency op), or None for "
                             "max_tokens_per_rank.")
        axis, num_ranks = self.config.axis_name, self.num_ranks
        mesh = jax.sharding.get_abstract_mesh()
        if axis in mesh.manual_axes:
            size = mesh.shape[axis]
        else:
            try:  # bound some other way, e.g. jax.vmap(..., axis_name=axis)
                size = jax.lax.axis_size(axis)
            except NameError:
                here = ("no mesh" if mesh.empty else
                        f"mesh {dict(mesh.shape)}, manual axes {tuple(mesh.manual_axes)}")
                raise ValueError(
                    f"Buffer.{op} must be called per shard inside jax.shard_map over the "
                    f"Buffer's mesh (axis {axis!r} of {dict(self.mesh.shape)}), with {axis!r} "
                    f"among shard_map's manual axes; here {axis!r} is not bound ({here}). Wrap "
                    f"the call: jax.shard_map(fn, mesh=buf.mesh, in_specs=..., "
                    "out_specs=...).") from None
        if size != num_ranks:
            raise ValueError(
                f"Buffer.{op}: axis {axis!r} has size {size} in the enclosing shard_map, but this "
                f"Buffer was made for {num_ranks} ranks on it (mesh {dict(self.mesh.shape)}). "
                "Call it inside shard_map over the Buffer's own mesh (buf.mesh), or make a "
                "Buffer for this mesh.")

    def _check_handle_owner(self, handle, made_by, used_by):
        if handle.buffer_id != self.id:
            raise ValueError(f"this handle was made by the {made_by} of Buffer "
                             f"{handle.buffer_id}, but {used_by} was called on Buffer {self.id}; "
                             f"call {used_by} on the Buffer whose {made_by} made the handle.")

    def _check_topk(self, topk_idx, num_tokens=None, what="topk_idx"):
        _check_array(what, topk_idx)
        if topk_idx.ndim != 2:
            raise ValueError(f"{what} must be int32 [num_tokens, top_k]; got shape {topk_idx.shape}.")
        if topk_idx.dtype != jnp.int32:
            raise TypeError(f"{what} must be int32, got {topk_idx.dtype}; cast it with "
                            f"{what}.astype(jnp.int32).")
        if topk_idx.shape[1] == 0:
            raise ValueError(f"{what} has shape {topk_idx.shape}: top_k = 0. Give every token at "
                             "least one slot (-1 marks an empty slot).")
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ValueError(f"{what} has {topk_idx.shape[0]} tokens but x has {num_tokens}; "
                             "they must match.")

    def _check_x(self, x, what="x", dtypes=X_DTYPES):
        _check_array(what, x)
        if x.ndim != 2:
            raise ValueError(f"{what} must be [num_tokens, hidden] per shard; got shape {x.shape}. "
                             "Call the Buffer inside shard_map with per-shard arrays.")
        if x.shape[1] != self.config.hidden:
            raise ValueError(f"{what} has hidden size {x.shape[1]} but the Buffer was made with "
                             f"hidden={self.config.hidden}.")
        if x.dtype not in dtypes:
            raise TypeError(f"{what} has dtype {x.dtype}; supported: "
                            f"{', '.join(str(jnp.dtype(d)) for d in dtypes)}.")

    def _check_weights(self, topk_weights, topk_idx):
        _check_array("topk_weights", topk_weights)
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(f"topk_weights has shape {topk_weights.shape} but topk_idx has "
                             f"{topk_idx.shape}; they must match.")
        if topk_weights.dtype != jnp.float32:
            raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}; cast it "
                            "with topk_weights.astype(jnp.float32).")

    def _check_tokens(self, num_tokens):
        if num_tokens == 0:
            raise ValueError("x has 0 tokens: normal-mode dispatch needs at least one token per "
                             "shard. Pad the batch with a token whose topk_idx row is all -1 "
                             "(it goes to no rank).")
        if num_tokens > self.config.max_tokens_per_rank:
            raise ValueError(f"{num_tokens} tokens per rank exceed max_tokens_per_rank="
                             f"{self.config.max_tokens_per_rank}; make the Buffer with a larger "
                             "max_tokens_per_rank.")

    def check_topk_idx(self, topk_idx, *, distinct: bool = True) -> jax.Array:
        """`jax_ep.check_topk_idx(topk_idx, E, distinct=distinct)` with this Buffer's E:
        bool [] True when every id is -1 or in [0, E) (and, with `distinct`, no token repeats
        an expert). An opt-in device check; runs anywhere (per shard or on global arrays)."""
        return check_topk_idx(topk_idx, self.config.num_experts, distinct=distinct)

    # -------------------------------------------------------------- normal mode
    def get_dispatch_layout(self, topk_idx: jax.Array) -> DispatchLayout:
        """topk_idx int32 [T, K] (global expert ids, -1 = none; ids outside [0, E) count as
        -1) -> DispatchLayout: num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32
        [R / ranks_per_node], num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R].
        T = 0 gives zero counts and an empty is_token_in_rank."""
        self._check_call("get_dispatch_layout")
        self._check_topk(topk_idx)
        return self._backend.get_dispatch_layout(topk_idx)

    def _dispatch_args(self, op, x, topk_idx, topk_weights, capacity, layout):
        """dispatch's arguments, checked: (x [T, H], x_scales or None, capacity, expert_layout)."""
        self._check_call(op)
        x_scales = None
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError("x must be a [T, H] array, or an FP8 tuple (float8_e4m3fn "
                                 f"[T, H], float32 [T, H // 128]); got a {type(x).__name__} of "
                                 f"{len(x)} items.")
            x, x_scales = x
            self._check_x(x, dtypes=(jnp.float8_e4m3fn,))
            _check_array("the FP8 scales (x[1])", x_scales)
            expected = (x.shape[0], self.config.hidden // 128)
            if x_scales.shape != expected or x_scales.dtype != jnp.float32:
                raise ValueError(f"FP8 scales must be float32 {expected} (one per 128 channels); "
                                 f"got {x_scales.dtype} {x_scales.shape}.")
        else:
            self._check_x(x)
        num_tokens = x.shape[0]
        self._check_topk(topk_idx, num_tokens)
        self._check_weights(topk_weights, topk_idx)
        self._check_tokens(num_tokens)
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}.")
        expert_layout = layout == "expert"
        if capacity is None:
            capacity = num_tokens * self.num_ranks
            if expert_layout:
                capacity *= min(topk_idx.shape[1], self.num_local_experts)
        capacity = _positive_int("capacity", capacity)
        return x, x_scales, capacity, expert_layout

    @staticmethod
    def _fp8_no_grad(fp8_x):
        return _not_differentiable(
            "dispatch with an FP8 x (a (float8_e4m3fn, scales) tuple) is not differentiable "
            "in x: jax.grad reached the FP8 tuple. Under jax.grad, dispatch x in bfloat16 or "
            "float32 (its backward is a combine), or wrap the tuple in "
            "jax.lax.stop_gradient if no gradient should flow to x.", fp8_x)

    def dispatch(self, x, topk_idx: jax.Array, topk_weights: jax.Array, *,
                 capacity: Optional[int] = None, layout: str = "rank") -> DispatchOutput:
        """Send every token to the ranks holding its top-k experts.

        Args:
          x: [T, H] bfloat16 or float32, 1 <= T <= max_tokens_per_rank; or an FP8 tuple
            (float8_e4m3fn [T, H], float32 [T, H // 128] scales), carried through unchanged.
            Values are moved, never inspected: NaN and Inf pass through to the rows of
            their token.
          topk_idx: int32 [T, K] global expert ids, K >= 1, -1 for an empty slot. Ids outside
            [0, E) are treated as -1 (not checked: `check_topk_idx` checks on device). A
            token's valid ids must be distinct (as a top-k router produces); a repeated
            expert is outside the contract (docs/bad_input.md says what happens).
          topk_weights: float32 [T, K] gate weights, carried through (any values, negative
            too).
          capacity: C, a positive int, rows of the output. Default: the worst case, T * R
            (rank layout) or T * R * min(K, L) (expert layout), so nothing drops. Rows past C
            are dropped and counted in num_dropped, never written.
          layout: "rank" (one row per (token, rank), grouped by source rank then token,
            DeepEP's order) or "expert" (one row per (token, local expert), grouped by local
            expert; num_recv_tokens_per_expert are ragged_dot group sizes).

        Returns DispatchOutput (see its docstring for every shape and dtype); its handle
        records C, the layout and this Buffer's id. Differentiable in x and topk_weights; an
        FP8 x is not differentiable (a TypeError at trace time if jax.grad reaches it; the
        topk_weights gradient still works).
        """
        x, x_scales, capacity, expert_layout = self._dispatch_args(
            "dispatch", x, topk_idx, topk_weights, capacity, layout)
        if x_scales is not None:
            x = self._fp8_no_grad((x, x_scales))
        out = _dispatch(self._backend, capacity, expert_layout, x, topk_idx, topk_weights)
        recv_x = out[0] if x_scales is None else (out[0], out[1])
        return DispatchOutput(recv_x=recv_x, recv_topk_idx=out[2], recv_topk_weights=out[3],
                              num_recv_tokens=out[4], num_recv_tokens_per_expert=out[5],
                              handle=out[7], num_dropped=out[6])

    def _combine_args(self, op, x, handle, bias):
        """combine's arguments, checked: returns bias cast to x.dtype (or None)."""
        self._check_call(op)
        if not isinstance(handle, Handle):
            raise ValueError(f"handle must be a jax_ep.Handle, got {type(handle).__name__}; pass "
                             "DispatchOutput.handle of this Buffer's dispatch, whole (a Handle "
                             "passes through jit and shard_map as a pytree).")
        self._check_handle_owner(handle, "dispatch", op)
        self._check_x(x)
        if x.shape[0] != handle.capacity:
            raise ValueError(
                f"x has {x.shape[0]} rows but the dispatch that made the handle returned "
                f"{handle.capacity} rows ({handle.layout} layout, capacity={handle.capacity}); "
                f"combine takes exactly those rows: pass x [{handle.capacity}, "
                f"{self.config.hidden}] in recv_x's row order (keep every row through the expert "
                "computation, without slicing to num_recv_tokens or padding), or dispatch with "
                f"capacity={x.shape[0]}.")
        num_tokens = handle.send_pos.shape[0]
        if bias is not None:
            if not isinstance(bias, (jax.Array, np.ndarray)):
                raise TypeError(f"bias must be a [{num_tokens}, {self.config.hidden}] array (or "
                                f"None), got {type(bias).__name__}; for a constant, pass "
                                f"jnp.full(({num_tokens}, {self.config.hidden}), value, "
                                f"{jnp.dtype(x.dtype).name}).")
            if bias.shape != (num_tokens, self.config.hidden):
                raise ValueError(f"bias must be [{num_tokens}, {self.config.hidden}], got {bias.shape}.")
            if bias.dtype not in X_DTYPES:
                raise TypeError(f"bias has dtype {bias.dtype}; supported: bfloat16, float32 "
                                f"(cast to x's {jnp.dtype(x.dtype).name}).")
            bias = bias.astype(x.dtype)
        return bias

    def combine(self, x: jax.Array, handle: Handle, *, bias: Optional[jax.Array] = None) -> jax.Array:
        """Send rows back to their source ranks and sum them.

        Args:
          x: [C, H] bfloat16 or float32, rows laid out as the dispatch that made `handle`
            (C = handle.capacity; apply gate weights before combine: it is unweighted). Only
            the row count is checked: rows are read in the handle's layout, whatever their
            origin.
          handle: DispatchOutput.handle of this Buffer's dispatch; it sets the layout.
          bias: optional [T, H] bfloat16 or float32 array (cast to x.dtype), added to the sum.

        Returns [T, H] x.dtype: out[t] = bias[t] + sum over ranks r holding t (ascending r,
        float32) of r's value for t (expert layout: the sum of t's expert rows on r). With
        several nodes the float32 sum runs per node (ascending rank), then bias + the nodes'
        sums in ascending node.
        Differentiable in x and bias.
        """
        bias = self._combine_args("combine", x, handle, bias)
        return _combine(self._backend, handle.layout == "expert", x, handle, bias)

    # -------------------------------------------------------------- hooked normal mode
    def dispatch_send(self, x, topk_idx: jax.Array, topk_weights: jax.Array, *,
                      capacity: Optional[int] = None, layout: str = "rank") -> Pending:
        """The send half of `dispatch` (same arguments and defaults), for internode Buffers:
        plans the routing and puts every row on the network (its kernel ends once its own
        puts completed), then returns a Pending for `dispatch_recv`, which waits for the rows
        of the other nodes, forwards them inside the node and returns what the fused dispatch
        returns. Computation placed between the two (`jax_ep.overlap` pins it there) runs
        while the other nodes' rows arrive, and no SM waits for them (an RDMA buffer holds the
        whole batch). On one host (the virtual nodes of a test) every put is a copy by the
        send kernel itself, so there is nothing left to hide.
        Rules: receive every send exactly once, right after it: no other op of this Buffer
        between a send and its receive (a clear error at run time, never mixed data). XLA
        may move a send ahead of an earlier receive it does not depend on: make each send's
        inputs depend on the previous receive (as consecutive layers do). Not
        differentiable on the CUDA backend (a TypeError at trace time under jax.grad: use the
        fused op there); the reference backend's halves differentiate as plain JAX. On a one-host Buffer (and the reference
        backend) the op has no network leg: the send half runs the whole op and the receive
        returns its results, so hooked code runs unchanged on one host."""
        x, x_scales, capacity, expert_layout = self._dispatch_args(
            "dispatch_send", x, topk_idx, topk_weights, capacity, layout)
        if x_scales is not None:
            x, x_scales = self._fp8_no_grad((x, x_scales))
        x, topk_weights = self._hook_no_grad("dispatch_send", (x, topk_weights))
        return self._backend.dispatch_send(x, x_scales, topk_idx, topk_weights, capacity,
                                           expert_layout)

    def dispatch_recv(self, pending: Pending) -> DispatchOutput:
        """The receive half of `dispatch_send`: the DispatchOutput the fused dispatch returns."""
        self._check_pending(pending, Pending, "", "dispatch")
        out = self._backend.dispatch_recv(pending)
        recv_x = out[0] if out[1] is None else (out[0], out[1])
        return DispatchOutput(recv_x=recv_x, recv_topk_idx=out[2], recv_topk_weights=out[3],
                              num_recv_tokens=out[4], num_recv_tokens_per_expert=out[5],
                              handle=out[7], num_dropped=out[6])

    def combine_send(self, x: jax.Array, handle: Handle, *,
                     bias: Optional[jax.Array] = None) -> Pending:
        """The send half of `combine` (same arguments; rules as `dispatch_send`): sums the
        rows of each token inside this node and puts the partial sums on the network;
        `combine_recv` adds bias and the nodes' sums and returns the fused combine's result."""
        bias = self._combine_args("combine_send", x, handle, bias)
        x, bias = self._hook_no_grad("combine_send", (x, bias))
        return self._backend.combine_send(x, handle, bias, handle.layout == "expert")

    def combine_recv(self, pending: Pending) -> jax.Array:
        """The receive half of `combine_send`: [T, H], what the fused combine returns."""
        self._check_pending(pending, Pending, "", "combine")
        return self._backend.combine_recv(pending)

    def _check_pending(self, pending, kind, prefix, op):
        """A receive's argument: a `kind` (Pending or LowLatencyPending) of `op` ("dispatch"
        or "combine") sent by this Buffer's `{prefix}{op}_send`."""
        self._check_call(f"{prefix}{op}_recv")
        if not isinstance(pending, kind) or pending.op != op:
            raise ValueError(f"pass the {kind.__name__} returned by this Buffer's "
                             f"{prefix}{op}_send; got {pending!r:.80}.")
        if pending.buffer_id != self.id:
            raise ValueError(f"this pending op was sent by Buffer {pending.buffer_id}; receive it "
                             f"on that Buffer, not on Buffer {self.id}.")

    # -------------------------------------------------------------- low latency
    def masked_ranks(self) -> list:
        """Peers that low-latency ops with mask=True stopped waiting for, on this process's
        devices: a list of (EP rank that masked, masked EP rank, op, op number). They are
        treated as sending nothing by every later low-latency op of the Buffer with mask=True
        (normal-mode ops, and low-latency ops with mask=False, still wait for them and fail).
        The op names carry "internode" on an internode Buffer."""
        self._check_open()
        return self._backend.masked_ranks()

    def _low_latency_limit(self):
        """(the most tokens per rank of a low-latency op, the Buffer argument that sets it)."""
        name = ("max_tokens_per_rank" if self.config.low_latency_max_tokens_per_rank is None
                else "low_latency_max_tokens_per_rank")
        return self.config.low_latency_max_tokens, name

    def _low_latency_args(self, op, x, topk_idx, max_tokens_per_rank, fp8, round_scale, mask):
        self._check_call(op)
        self._check_x(x)
        self._check_topk(topk_idx, x.shape[0])
        num_tokens = x.shape[0]
        limit, limit_name = self._low_latency_limit()
        if num_tokens == 0:
            raise ValueError("x has 0 tokens: low-latency ops need at least one token per rank; "
                             "pad the batch with a token whose topk_idx row is all -1.")
        if num_tokens > limit:
            raise ValueError(f"x has {num_tokens} tokens but the Buffer takes at most "
                             f"{limit_name}={limit} per rank; make the Buffer with a "
                             f"larger {limit_name}.")
        if max_tokens_per_rank is None:
            m = num_tokens
        else:
            m = _positive_int("max_tokens_per_rank", max_tokens_per_rank,
                              " Or leave it out: the default is the call's token count T.")
            if m > limit:
                raise ValueError(f"max_tokens_per_rank={m} exceeds the Buffer's "
                                 f"{limit_name}={limit}; make the Buffer with a larger "
                                 "one.")
            if num_tokens > m:
                raise ValueError(f"x has {num_tokens} tokens, more than max_tokens_per_rank={m}; "
                                 "pass a larger max_tokens_per_rank (or leave it out: the default "
                                 "is the call's token count).")
        fp8, round_scale, mask = _flag("fp8", fp8), _flag("round_scale", round_scale), \
            _flag("mask", mask)
        if round_scale and not fp8:
            raise ValueError("round_scale=True only applies with fp8=True.")
        return m, fp8, round_scale, mask

    def low_latency_dispatch(self, x: jax.Array, topk_idx: jax.Array, *,
                             max_tokens_per_rank: Optional[int] = None, fp8: bool = False,
                             round_scale: bool = False,
                             mask: bool = False) -> LowLatencyDispatchOutput:
        """Decode-time dispatch into an expert-major, fixed-size layout.

        Args:
          x: [T, H] bfloat16 or float32, 1 <= T <= the Buffer's max_tokens_per_rank. The
            CUDA kernel keeps a bit per (expert, token) in shared memory: E * ceil(T / 32) * 4
            bytes must stay under about 200 KiB (T <= 6400 at E = 256), a ValueError says so.
          topk_idx: int32 [T, K] global expert ids, -1 for an empty slot (ids outside
            [0, E) are treated as -1; `check_topk_idx` checks on device). A repeated expert
            in a token's row gets one row; combine weighs it with every slot that names it.
          max_tokens_per_rank: M, a positive int, T <= M <= the Buffer's max_tokens_per_rank:
            the most tokens any rank sends, which sizes recv_x. Default: T, this call's token
            count (the same static shape on every shard), so the outputs are sized to the
            request.
          fp8: cast x to float8_e4m3fn with one float32 scale per 128 channels
            (scale = max(amax, 1e-4) / 448).
          round_scale: with fp8, round every scale up to a power of two.
          mask: a peer that does not answer within timeout_s is masked (`masked_ranks`) and
            treated as sending nothing, now and in later low-latency ops, instead of failing
            the op: nothing is sent to it, its slots of row_of_slot are -1, recv_count leaves
            out its rows (unless it was masked after its counts arrived: then they are counted
            but not received), and combine leaves its rows out. The same on an internode
            Buffer (there the op number of `masked_ranks` counts the normal-mode ops too).

        Returns LowLatencyDispatchOutput: recv_x [L, R * M, H], recv_scales (fp8 only),
        recv_count int32 [L], handle (it records M and T). Rows of a local expert are grouped
        by source rank, then source token (deterministic); rows past recv_count[e] are
        unspecified.
        Differentiable in x when fp8 is False (the backward runs the reference code); with
        fp8=True, jax.grad reaching x raises a TypeError at trace time.
        """
        m, fp8, round_scale, mask = self._low_latency_args(
            "low_latency_dispatch", x, topk_idx, max_tokens_per_rank, fp8, round_scale, mask)
        if fp8:
            (x,) = _not_differentiable(
                "low_latency_dispatch with fp8=True is not differentiable: jax.grad reached its "
                "x. Under jax.grad use fp8=False, or wrap x in jax.lax.stop_gradient if no "
                "gradient should flow to it.", (x,))
            out = self._backend.low_latency_dispatch(x, topk_idx, m, fp8, round_scale, mask)
        else:
            out = _low_latency_dispatch(self._backend, m, mask, x, topk_idx)
        return self._ll_output(out, x.shape[0])

    def _ll_output(self, out, num_tokens):
        """The backend's 4-tuple as a LowLatencyDispatchOutput whose handle records T."""
        recv_x, recv_scales, recv_count, handle = out
        return LowLatencyDispatchOutput(recv_x, recv_scales, recv_count,
                                        dataclasses.replace(handle, num_tokens=num_tokens))

    def _hook_no_grad(self, op, arrays, fp8=False):
        """`arrays`, guarded against jax.grad unless the hooked half is differentiable: the
        reference backend's are plain JAX (differentiated like the fused ops), except FP8
        casts; another backend's are custom calls without a derivative."""
        if self._backend.name == "reference" and not fp8:
            return arrays
        why = "with fp8=True" if fp8 else f"on the {self._backend.name} backend"
        fused = op.rsplit("_", 1)[0] + (" with fp8=False" if fp8 else "")
        return _not_differentiable(
            f"{op} {why} is not differentiable: jax.grad reached its inputs. Under jax.grad use "
            f"the fused op ({fused}), or wrap the inputs in jax.lax.stop_gradient.", arrays)

    def low_latency_dispatch_send(self, x: jax.Array, topk_idx: jax.Array, *,
                                  max_tokens_per_rank: Optional[int] = None, fp8: bool = False,
                                  round_scale: bool = False,
                                  mask: bool = False) -> LowLatencyPending:
        """The send half of `low_latency_dispatch` (same arguments and defaults): starts the
        transfer and returns at once a LowLatencyPending for `low_latency_dispatch_recv`.
        Computation placed between the two (that does not depend on the receive;
        `jax_ep.overlap` pins it there) runs while the rows travel, beside the send kernel
        (on the CUDA backend the send runs on a stream of its own, on num_sms SMs), and no SM
        waits for them.
        Rules: receive every send exactly once, in the order of the sends; at most two sends
        in flight; no other op of this Buffer between a send and its receive. These are not
        checked at trace time: the CUDA backend skips a receive that breaks them and records
        the failure (`check` raises it); the reference backend returns the results again.
        An internode Buffer allows one send in flight (its handlers refuse a second one), and
        runs the send on XLA's stream: its puts leave every SM to the work placed between.
        XLA may move a send that does not depend on earlier receives ahead of them: make each
        send's input depend on the receives before it (as consecutive layers do) when more
        than two could be in flight. Not differentiable on the CUDA backend, nor with
        fp8=True (a TypeError at trace time; use the fused op under jax.grad); the reference
        backend's hooked halves otherwise differentiate as plain JAX."""
        m, fp8, round_scale, mask = self._low_latency_args(
            "low_latency_dispatch_send", x, topk_idx, max_tokens_per_rank, fp8, round_scale,
            mask)
        (x,) = self._hook_no_grad("low_latency_dispatch_send", (x,), fp8)
        pending = self._backend.low_latency_dispatch_send(x, topk_idx, m, fp8, round_scale, mask)
        return dataclasses.replace(pending, info=pending.info + ((_NUM_TOKENS, x.shape[0]),))

    def low_latency_dispatch_recv(self, pending: LowLatencyPending) -> LowLatencyDispatchOutput:
        """The receive half: waits for the rows of `pending` (from this Buffer's
        low_latency_dispatch_send) and returns what the fused low_latency_dispatch returns."""
        self._check_pending(pending, LowLatencyPending, "low_latency_", "dispatch")
        num_tokens = dict(pending.info).get(_NUM_TOKENS)
        info = tuple(item for item in pending.info if item[0] != _NUM_TOKENS)
        out = self._backend.low_latency_dispatch_recv(dataclasses.replace(pending, info=info))
        return self._ll_output(out, num_tokens)

    def _low_latency_combine_args(self, op, x, topk_idx, topk_weights, handle, mask):
        self._check_call(op)
        if not isinstance(handle, LowLatencyHandle):
            raise ValueError(f"handle must be a jax_ep.LowLatencyHandle, got "
                             f"{type(handle).__name__}; pass LowLatencyDispatchOutput.handle of "
                             "this Buffer's low_latency_dispatch.")
        self._check_handle_owner(handle, "low_latency_dispatch", "low_latency_combine")
        self._check_topk(topk_idx)
        self._check_weights(topk_weights, topk_idx)
        num_ranks, m, num_slots = handle.row_of_slot.shape
        limit, limit_name = self._low_latency_limit()
        if m > limit:
            raise ValueError(f"the handle was made for max_tokens_per_rank={m}, more than the "
                             f"Buffer's {limit_name}={limit}; pass the handle of this Buffer's "
                             "low_latency_dispatch.")
        if handle.num_tokens is None:  # a handle not made by Buffer: T <= M is all we know
            tokens_fit, tokens = topk_idx.shape[0] <= m, f"at most {m} tokens"
        else:
            tokens_fit = topk_idx.shape[0] == handle.num_tokens
            tokens = f"{handle.num_tokens} tokens"
        if topk_idx.shape[1] != num_slots or not tokens_fit:
            raise ValueError(f"topk_idx has shape {topk_idx.shape} but the handle was made for "
                             f"top-k {num_slots} and {tokens}; pass the topk_idx given "
                             "to low_latency_dispatch.")
        _check_array("x", x)
        expected = (self.num_local_experts, num_ranks * m, self.config.hidden)
        if x.shape != expected:
            raise ValueError(f"x must be [{expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(local experts, R * max_tokens_per_rank, hidden); got {x.shape}.")
        if x.dtype not in X_DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; supported: bfloat16, float32.")
        return _flag("mask", mask)

    def low_latency_combine(self, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
                            handle: LowLatencyHandle, *, mask: bool = False) -> jax.Array:
        """Weighted combine of low-latency expert outputs.

        Args:
          x: [L, R * M, H] bfloat16 or float32, laid out as low_latency_dispatch's recv_x
            (rows past recv_count are ignored; M is the handle's).
          topk_idx: int32 [T, K], the one given to low_latency_dispatch (its shape is
            checked against the handle, its values are not: they must be the same).
          topk_weights: float32 [T, K] (any values, negative too).
          handle: LowLatencyDispatchOutput.handle of this Buffer's low_latency_dispatch.
          mask: as in low_latency_dispatch.

        Returns [T, H] x.dtype. Every rank holding experts of token t sums
        topk_weights[t, k] * (expert k's row for t) over its slots of t in float32, in slot
        order, and sends the sum cast to x.dtype (one row per (token, rank)); out[t] is the
        float32 sum of those rows in ascending rank order, cast to x.dtype.
        Differentiable in x and topk_weights (the backward runs the reference code).
        """
        mask = self._low_latency_combine_args("low_latency_combine", x, topk_idx, topk_weights,
                                              handle, mask)
        return _low_latency_combine(self._backend, mask, x, topk_idx, topk_weights, handle)

    def low_latency_combine_send(self, x: jax.Array, topk_idx: jax.Array,
                                 topk_weights: jax.Array, handle: LowLatencyHandle, *,
                                 mask: bool = False) -> LowLatencyPending:
        """The send half of `low_latency_combine` (same arguments and rules as
        `low_latency_dispatch_send`); `low_latency_combine_recv` returns the result."""
        mask = self._low_latency_combine_args("low_latency_combine_send", x, topk_idx,
                                              topk_weights, handle, mask)
        x, topk_weights = self._hook_no_grad("low_latency_combine_send", (x, topk_weights))
        return self._backend.low_latency_combine_send(x, topk_idx, topk_weights, handle, mask)

    def low_latency_combine_recv(self, pending: LowLatencyPending) -> jax.Array:
        """The receive half: [T, H], what the fused low_latency_combine returns."""
        self._check_pending(pending, LowLatencyPending, "low_latency_", "combine")
        return self._backend.low_latency_combine_recv(pending)


# ------------------------------------------------------------------ low-latency gradients
# The kernels run forward; the backward is the reference code's (pure JAX) VJP.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _low_latency_dispatch(backend, m, mask, x, topk_idx):
    return backend.low_latency_dispatch(x, topk_idx, m, False, False, mask)


def _low_latency_dispatch_fwd(backend, m, mask, x, topk_idx):
    return _low_latency_dispatch(backend, m, mask, x, topk_idx), (x, topk_idx)


def _low_latency_dispatch_bwd(backend, m, mask, residuals, ct):
    x, topk_idx = residuals
    _, vjp = jax.vjp(lambda x: reference.low_latency_dispatch(
        x, topk_idx, max_tokens_per_rank=m, fp8=False, config=backend.config,
        buffer_id=backend.buffer_id)[0], x)
    (dx,) = vjp(ct[0])
    return dx, None


_low_latency_dispatch.defvjp(_low_latency_dispatch_fwd, _low_latency_dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_latency_combine(backend, mask, x, topk_idx, topk_weights, handle):
    return backend.low_latency_combine(x, topk_idx, topk_weights, handle, mask)


def _low_latency_combine_fwd(backend, mask, x, topk_idx, topk_weights, handle):
    out = _low_latency_combine(backend, mask, x, topk_idx, topk_weights, handle)
    return out, (x, topk_idx, topk_weights, handle)


def _low_latency_combine_bwd(backend, mask, residuals, ct):
    x, topk_idx, topk_weights, handle = residuals
    _, vjp = jax.vjp(lambda x, w: reference.low_latency_combine(
        x, topk_idx, w, handle, config=backend.config), x, topk_weights)
    dx, dw = vjp(ct)
    return dx, None, dw, jax.tree.map(lambda _: None, handle)


_low_latency_combine.defvjp(_low_latency_combine_fwd, _low_latency_combine_bwd)


def overlap(pending, fn, *args):
    """Runs fn(*args) while a hooked op is in flight: after the send that made `pending` (a
    LowLatencyPending or a Pending) and before its receive. XLA's scheduler does not move independent work between a send and
    its receive by itself; this pins it there (two `jax.lax.optimization_barrier`s).

        pending = buf.low_latency_dispatch_send(x, topk_idx)
        pending, shared = jax_ep.overlap(pending, shared_expert, params, x)
        out = buf.low_latency_dispatch_recv(pending)

    Returns (pending, fn(*args)); pass the returned pending to the receive."""
    pending, args = jax.lax.optimization_barrier((pending, args))
    result = fn(*args)
    return jax.lax.optimization_barrier((pending, result))


def region_bytes(num_ranks: int, *, num_experts: int, hidden: int,
                 max_tokens_per_rank: int = DEFAULT_MAX_TOKENS_PER_RANK,
                 low_latency_max_tokens_per_rank: Optional[int] = None,
                 num_ranks_per_node: Optional[int] = None) -> int:
    """GPU memory (bytes) one device of a CUDA-backend Buffer with this configuration
    allocates: the staging of every mode (normal and low-latency), for top-k up to 16.

    num_ranks_per_node as in Buffer (None: min(num_ranks, 8)); below num_ranks the Buffer is
    an internode one and the figure is its NVSHMEM symmetric region (the network staging holds
    a whole batch: it grows with num_ranks x max_tokens_per_rank) plus its low-latency
    staging, sized by low_latency_max_tokens_per_rank as in Buffer (None: max_tokens_per_rank;
    0: none). A one-host Buffer's low-latency ops share its staging: there
    low_latency_max_tokens_per_rank changes nothing. Needs the CUDA extension (jax_ep._cuda),
    and for internode sizes the internode module (jax_ep._nvshmem)."""
    num_ranks, num_experts = _positive_int("num_ranks", num_ranks), _positive_int(
        "num_experts", num_experts)
    hidden = _positive_int("hidden", hidden)
    max_tokens_per_rank = _positive_int("max_tokens_per_rank", max_tokens_per_rank)
    low_latency_max_tokens_per_rank = _low_latency_max_tokens_per_rank(
        low_latency_max_tokens_per_rank, max_tokens_per_rank)
    if num_ranks_per_node is None:
        num_ranks_per_node = min(num_ranks, 8)
    num_ranks_per_node = _positive_int("num_ranks_per_node", num_ranks_per_node)
    if num_ranks % num_ranks_per_node:
        raise ValueError(f"num_ranks_per_node={num_ranks_per_node} must divide "
                         f"num_ranks={num_ranks}.")
    from jax_ep import cuda_backend
    if not cuda_backend.is_available():
        raise RuntimeError("region_bytes needs jax_ep's CUDA extension, which is not built "
                           f"here ({cuda_backend.unavailable_reason()}).")
    if num_ranks_per_node < num_ranks:
        if low_latency_max_tokens_per_rank is None:
            low_latency_max_tokens_per_rank = max_tokens_per_rank
        return int(cuda_backend._internode_module().region_bytes(
            num_ranks, num_ranks_per_node, max_tokens_per_rank, low_latency_max_tokens_per_rank,
            hidden, cuda_backend.MAX_TOPK, num_experts))
    return int(cuda_backend._cuda.region_bytes(num_ranks, max_tokens_per_rank, hidden,
                                               cuda_backend.MAX_TOPK, num_experts))


def _make_backend(backend: str, mesh, config: EPConfig, timeout_s: float,
                  buffer_id: int) -> Backend:
    platforms = {d.platform for d in mesh.devices.flat}
    if backend == "reference":
        return ReferenceBackend(config, buffer_id)
    from jax_ep import cuda_backend
    if backend == "auto":
        if platforms == {"gpu"} and cuda_backend.is_available():
            return cuda_backend.CudaBackend.create(mesh, config, timeout_s, buffer_id=buffer_id)
        return ReferenceBackend(config, buffer_id)
    if platforms != {"gpu"}:
        raise ValueError(f"backend='cuda' needs a mesh of GPUs; this mesh has {sorted(platforms)} "
                         "devices. Use backend='reference' (or 'auto').")
    if not cuda_backend.is_available():
        raise RuntimeError("backend='cuda' but jax_ep was installed without its CUDA extension "
                           f"({cuda_backend.unavailable_reason()}). Reinstall on a machine with "
                           "nvcc, or use backend='reference'.")
    return cuda_backend.CudaBackend.create(mesh, config, timeout_s, buffer_id=buffer_id)
