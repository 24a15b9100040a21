"""Property tests: every mode of `jax_ep.Buffer` against the NumPy oracle (tests/oracle.py),
on shapes, routings, capacities and data drawn by hypothesis.

The same tests run on both backends: `backend="reference"` on a mesh of 2, 4 or 8 CPU
devices, and `backend="cuda"` (marked `gpu`) on a mesh of every local GPU (R = their count).

Drawn per example:
- a case: R, local experts L (E = L * R), top-k K <= E, tokens per rank T (1, odd sizes),
  hidden H in {128, 256}, dtype, capacity rule. Cases are a few fixed buckets, because every
  shape, capacity and layout is a compile (a few seconds on CPU);
- a routing, fully random within its kind: uniform, skewed (most tokens to one rank's
  experts), one expert (every token to one expert), all masked (-1 everywhere), empty ranks
  (some ranks receive nothing), holes (random -1 slots); low latency also "junk" (repeated
  experts, ids outside [0, E)); slot order shuffled;
- data: random normal x, gate weights, expert outputs y (rows spread over 2^-8..2^8, so
  that a wrong summation order shows) and bias; never constants.

Equality is exact for data movement (rows, ids, weights, counts, handles, gradients that
move data). Combine (both layouts, with and without bias, intranode and internode) is
bit-exact against oracle.combine_exact: docs/design.md specifies its float32 order and it
only adds. The low-latency combine multiplies and adds (w * row + partial), which XLA:CPU
and the CUDA kernels may fuse into one multiply-add, so it is checked on both backends
within one ulp of the output dtype (bf16: 2^-7, float32: 2^-20 relative to the magnitude
of the terms; see _assert_close_to_ulp).

CI runs the reference part with a fixed example count and derandomized draws (the same
examples every run). JAX_EP_PROPERTY_EXAMPLES=N runs N examples per test with fresh random
draws (soak runs, e.g. on GPUs); hypothesis prints the failing example and a
`@reproduce_failure` blob.
"""

import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
import oracle
from conftest import cpu_mesh

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

SOAK_EXAMPLES = int(os.environ.get("JAX_EP_PROPERTY_EXAMPLES", "0"))
MAX_TOKENS = 64  # the Buffers' max_tokens_per_rank
BACKENDS = ["reference", pytest.param("cuda", marks=pytest.mark.gpu)]


def _settings(examples):
    """`examples` per test in CI (derandomized); JAX_EP_PROPERTY_EXAMPLES overrides it."""
    return settings(max_examples=SOAK_EXAMPLES or examples, deadline=None,
                    derandomize=not SOAK_EXAMPLES, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ cases (compile buckets)
class Case(NamedTuple):
    num_ranks: int  # R on CPU; on GPUs every local GPU
    num_local: int  # L = E / R
    topk: int  # K (at most E)
    num_tokens: int  # T per rank
    hidden: int
    dtype: str
    capacity: str = "default"  # "default" (None: never drops), "half", "third", "one"
    ranks_per_node: Optional[int] = None  # G < R: an internode Buffer (reference only)


NORMAL_CASES = [
    Case(2, 1, 1, 1, 128, "float32"),  # one token, one expert per rank, top-1
    Case(2, 2, 4, 3, 128, "bfloat16", "half"),  # K = E: every token picks every expert
    Case(2, 3, 4, 7, 256, "float32", "third"),
    Case(4, 2, 2, 5, 128, "bfloat16", "one"),  # capacity 1
    Case(4, 4, 8, 9, 128, "float32", "half"),  # top-8
    Case(8, 1, 3, 3, 128, "bfloat16"),
    Case(8, 3, 5, 11, 256, "float32", "half"),
]
INTERNODE_CASES = [
    Case(4, 2, 3, 5, 128, "float32", ranks_per_node=2),
    Case(8, 1, 4, 7, 128, "bfloat16", "half", ranks_per_node=2),
    Case(8, 2, 2, 3, 256, "float32", "third", ranks_per_node=4),
]


class LowLatencyCase(NamedTuple):
    num_ranks: int
    num_local: int
    topk: int
    num_tokens: int
    max_tokens: int  # M >= T
    hidden: int
    dtype: str


LOW_LATENCY_CASES = [
    LowLatencyCase(2, 1, 1, 1, 1, 128, "bfloat16"),  # M = T = 1
    LowLatencyCase(4, 2, 3, 5, 8, 256, "float32"),
    LowLatencyCase(8, 3, 8, 3, 4, 128, "bfloat16"),  # top-8
    LowLatencyCase(4, 4, 4, 7, 7, 128, "float32"),
]
FP8_MODES = [(False, False), (True, False), (True, True)]  # (fp8, round_scale)


def _gpus():
    return [d for d in jax.devices() if d.platform == "gpu"]


def _num_ranks(backend, case):
    if backend == "reference":
        return case.num_ranks
    gpus = _gpus()
    if not gpus:
        pytest.skip("backend='cuda' needs local GPUs")
    return len(gpus)


def _shape(backend, case):
    """(R, E, L, K) of a case on this backend: on GPUs R is the GPU count, K at most E."""
    num_ranks = _num_ranks(backend, case)
    num_experts = case.num_local * num_ranks
    return num_ranks, num_experts, case.num_local, min(case.topk, num_experts)


def _capacity(rule, num_ranks, num_tokens, topk, num_local, layout):
    """(capacity passed to dispatch, rows C of its output)."""
    worst = num_tokens * num_ranks * (min(topk, num_local) if layout == "expert" else 1)
    capacity = {"default": None, "half": max(1, worst // 2), "third": max(1, worst // 3),
                "one": 1}[rule]
    return capacity, worst if capacity is None else capacity


# ------------------------------------------------------------------ buffers and programs
_cache = {}


def _cached(key, build):
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def _buffer(backend, num_ranks, num_experts, hidden, ranks_per_node=None):
    """(mesh, Buffer), made once per configuration."""
    def build():
        if backend == "reference":
            mesh = cpu_mesh((num_ranks,), ("ep",))
        else:
            mesh = Mesh(np.array(_gpus()), ("ep",))
        return mesh, jax_ep.Buffer(mesh, "ep", num_experts=num_experts, hidden=hidden,
                                   backend=backend, max_tokens_per_rank=MAX_TOKENS,
                                   num_ranks_per_node=ranks_per_node)
    return _cached(("buffer", backend, num_ranks, num_experts, hidden, ranks_per_node), build)


def _program(key, mesh, body):
    """jit(shard_map(body)), every argument and result split on its leading axis over "ep";
    compiled once per key."""
    return _cached(key, lambda: jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"),
                                                      out_specs=P("ep"))))


def _run(mesh, fn, *args):
    """Run a program; results as numpy arrays with a leading rank axis [R, ...]."""
    num_ranks = mesh.devices.size
    sharding = NamedSharding(mesh, P("ep"))
    outs = fn(*(jax.device_put(a, sharding) for a in args))

    def per_rank(a):
        a = np.asarray(a)
        return a.reshape((num_ranks, a.shape[0] // num_ranks) + a.shape[1:])
    return jax.tree.map(per_rank, outs)


# ------------------------------------------------------------------ routings
ROUTINGS = ("uniform", "skewed", "one_expert", "all_masked", "empty_ranks", "holes")


class Routing(NamedTuple):
    kind: str
    rank: int = 0  # skewed: the hot rank
    expert: int = 0  # one_expert
    fraction: float = 0.0  # skewed: tokens sent to the hot rank; holes: -1 slots
    receivers: tuple = ()  # empty_ranks: the ranks that receive anything


@st.composite
def routings(draw, num_ranks, num_experts, kinds=ROUTINGS):
    kind = draw(st.sampled_from(kinds))
    if kind == "skewed":
        return Routing(kind, rank=draw(st.integers(0, num_ranks - 1)),
                       fraction=draw(st.sampled_from([0.6, 0.9, 1.0])))
    if kind == "one_expert":
        return Routing(kind, expert=draw(st.integers(0, num_experts - 1)))
    if kind == "holes":
        return Routing(kind, fraction=draw(st.sampled_from([0.1, 0.4, 0.8])))
    if kind == "empty_ranks":
        size = draw(st.integers(1, max(1, num_ranks - 1)))
        receivers = draw(st.lists(st.integers(0, num_ranks - 1), min_size=size, max_size=size,
                                  unique=True))
        return Routing(kind, receivers=tuple(sorted(receivers)))
    return Routing(kind)


def make_routing(rng, routing, num_ranks, num_tokens, num_experts, topk):
    """Global topk_idx int32 [R * T, K]: each token's valid ids distinct (except "junk"),
    its slots in random order."""
    n, num_local = num_ranks * num_tokens, num_experts // num_ranks
    rank_of = np.arange(num_experts) // num_local
    if routing.kind == "junk":  # repeated experts and ids outside [0, E) (low latency only)
        return rng.integers(-3, num_experts + 3, (n, topk)).astype(np.int32)
    priority = rng.random((n, num_experts))  # each token takes its top-K experts
    if routing.kind == "skewed":
        hot = rng.random(n) < routing.fraction
        priority += np.where(hot[:, None] & (rank_of == routing.rank)[None], 1.0, 0.0)
    elif routing.kind == "one_expert":
        priority[:] = -np.inf
        priority[:, routing.expert] = 1.0
    elif routing.kind == "all_masked":
        priority[:] = -np.inf
    elif routing.kind == "empty_ranks":
        priority[:, ~np.isin(rank_of, routing.receivers)] = -np.inf
    order = np.argsort(-priority, axis=1, kind="stable")[:, :topk]
    idx = np.where(np.isfinite(np.take_along_axis(priority, order, 1)), order, -1)
    if routing.kind == "holes":
        idx[rng.random(idx.shape) < routing.fraction] = -1
    idx = np.take_along_axis(idx, np.argsort(rng.random(idx.shape), axis=1), 1)
    return idx.astype(np.int32)


def _normal(rng, shape, dtype="float32", spread=False):
    """Random normal data (rows scaled by 2^-8..2^8 with spread), as a jax array."""
    a = rng.standard_normal(shape)
    if spread:
        a = a * np.exp2(rng.integers(-8, 9, shape[:1] + (1,) * (len(shape) - 1)))
    return jnp.asarray(a, getattr(jnp, dtype))


def _f32(a):
    return np.asarray(a).astype(np.float32)


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("backend", BACKENDS)
@_settings(25)
@given(data=st.data())
def test_dispatch_layout_matches_oracle(backend, data):
    """get_dispatch_layout on every rank: num_tokens_per_rank[r] = tokens with an expert on
    r; num_tokens_per_rdma_rank[m] = tokens with an expert in node m; num_tokens_per_expert
    [e] = (token, slot) selections of e; is_token_in_rank[t, r] (docs/design.md, "Layout").
    Free shapes here (the op compiles fast): any R, G | R, L in 1..4, K <= min(8, E), T."""
    if backend == "reference":
        num_ranks = data.draw(st.sampled_from([2, 4, 8]), label="R")
        ranks_per_node = data.draw(st.sampled_from([g for g in (1, 2, 4, 8)
                                                    if num_ranks % g == 0]), label="G")
    else:  # one process drives the GPUs: intranode only (the Buffer's default G)
        num_ranks, ranks_per_node = _num_ranks(backend, None), None
    num_local = data.draw(st.integers(1, 4), label="L")
    num_experts = num_ranks * num_local
    topk = data.draw(st.integers(1, min(8, num_experts)), label="K")
    num_tokens = data.draw(st.sampled_from([1, 2, 5, 8, 13, 33]), label="T")
    routing = data.draw(routings(num_ranks, num_experts), label="routing")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    idx = make_routing(rng, routing, num_ranks, num_tokens, num_experts, topk)

    mesh, buf = _buffer(backend, num_ranks, num_experts, 128, ranks_per_node)
    ranks_per_node = buf.config.num_ranks_per_node
    fn = _program(("layout", backend, num_ranks, num_experts, topk, num_tokens, ranks_per_node),
                  mesh, lambda i: [a if a.ndim == 2 else a[None]
                                   for a in buf.get_dispatch_layout(i)])
    per_rank, per_node, per_expert, in_rank = _run(mesh, fn, jnp.asarray(idx))
    assert per_rank.dtype == per_node.dtype == per_expert.dtype == np.int32
    assert in_rank.dtype == bool
    idx = idx.reshape(num_ranks, num_tokens, topk)
    for r in range(num_ranks):
        want = oracle.layout(idx[r], num_ranks, num_experts, ranks_per_node)
        np.testing.assert_array_equal(per_rank[r, 0], want[0], err_msg=f"per rank, rank {r}")
        np.testing.assert_array_equal(per_node[r, 0], want[1], err_msg=f"per node, rank {r}")
        np.testing.assert_array_equal(per_expert[r, 0], want[2], err_msg=f"per expert, rank {r}")
        np.testing.assert_array_equal(in_rank[r], want[3], err_msg=f"in rank, rank {r}")


# ------------------------------------------------------------------ dispatch and combine
class NormalExample(NamedTuple):
    num_ranks: int
    num_experts: int
    topk: int
    capacity: int  # C, the rows of the output
    x: jax.Array
    idx: np.ndarray
    w: jax.Array
    y: jax.Array  # [R * C, H] random expert outputs
    bias: jax.Array


def _draw_normal(data, backend, cases):
    case = data.draw(st.sampled_from(cases), label="case")
    layout = data.draw(st.sampled_from(["rank", "expert"]), label="layout")
    num_ranks, num_experts, num_local, topk = _shape(backend, case)
    routing = data.draw(routings(num_ranks, num_experts), label="routing")
    event(f"routing: {routing.kind}")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    num_tokens, hidden = case.num_tokens, case.hidden
    capacity, rows = _capacity(case.capacity, num_ranks, num_tokens, topk, num_local, layout)
    idx = make_routing(rng, routing, num_ranks, num_tokens, num_experts, topk)
    total = num_ranks * num_tokens
    ex = NormalExample(num_ranks, num_experts, topk, rows,
                       x=_normal(rng, (total, hidden), case.dtype), idx=idx,
                       w=jnp.asarray(rng.random((total, topk)), jnp.float32),
                       y=_normal(rng, (num_ranks * rows, hidden), case.dtype, spread=True),
                       bias=_normal(rng, (total, hidden), case.dtype, spread=True))
    return case, layout, capacity, ex


def _normal_mode(backend, case, layout, capacity, ex):
    """get_dispatch_layout, dispatch (every output and the handle), combine of the random y
    (no bias) and combine of the received rows with bias: numpy [R, ...] arrays."""
    mesh, buf = _buffer(backend, ex.num_ranks, ex.num_experts, case.hidden, case.ranks_per_node)

    def body(x, idx, w, y, bias):
        lay = buf.get_dispatch_layout(idx)
        out = buf.dispatch(x, idx, w, layout=layout, capacity=capacity)
        h = out.handle
        assert (h.capacity, h.layout, h.buffer_id) == (y.shape[0], layout, buf.id)
        return dict(num_tokens_per_rank=lay.num_tokens_per_rank[None],
                    num_tokens_per_rdma_rank=lay.num_tokens_per_rdma_rank[None],
                    num_tokens_per_expert=lay.num_tokens_per_expert[None],
                    recv_x=out.recv_x, recv_topk_idx=out.recv_topk_idx,
                    recv_topk_weights=out.recv_topk_weights,
                    num_recv_tokens=out.num_recv_tokens[None],
                    num_recv_tokens_per_expert=out.num_recv_tokens_per_expert,
                    num_dropped=out.num_dropped[None], send_pos=h.send_pos,
                    num_tokens_matrix=h.num_tokens_matrix, pair_expert_rows=h.pair_expert_rows,
                    combined=buf.combine(y, h),
                    combined_recv=buf.combine(out.recv_x, h, bias=bias))

    key = ("normal", backend, case, layout)
    return _run(mesh, _program(key, mesh, body), ex.x, jnp.asarray(ex.idx), ex.w, ex.y, ex.bias)


def _ranks_per_node(backend, case, ex):
    """G of the case's Buffer (its default, min(R, 8), unless the case sets it)."""
    buf = _buffer(backend, ex.num_ranks, ex.num_experts, case.hidden, case.ranks_per_node)[1]
    return buf.config.num_ranks_per_node


def _oracle_dispatch(ex, layout):
    r, k = ex.num_ranks, ex.topk
    return oracle.dispatch(_f32(ex.x).reshape(r, -1, ex.x.shape[1]), ex.idx.reshape(r, -1, k),
                           np.asarray(ex.w).reshape(r, -1, k), ex.num_experts, ex.capacity,
                           layout)


def _check_dispatch(got, ex, layout, ranks_per_node):
    num_ranks, num_local = ex.num_ranks, ex.num_experts // ex.num_ranks
    idx = ex.idx.reshape(num_ranks, -1, ex.topk)
    want = _oracle_dispatch(ex, layout)
    event(f"rows dropped: {any(d['num_dropped'] for d in want)}")
    handles = oracle.handle(idx, want, ex.num_experts, layout)
    needed = np.zeros(num_ranks, np.int64)  # rows each rank needs, from the layouts
    for s in range(num_ranks):
        per_rank, per_node, per_expert, _ = oracle.layout(idx[s], num_ranks, ex.num_experts,
                                                          ranks_per_node)
        np.testing.assert_array_equal(got["num_tokens_per_rank"][s, 0], per_rank)
        np.testing.assert_array_equal(got["num_tokens_per_rdma_rank"][s, 0], per_node)
        np.testing.assert_array_equal(got["num_tokens_per_expert"][s, 0], per_expert)
        needed += (got["num_tokens_per_rank"][s, 0] if layout == "rank" else
                   got["num_tokens_per_expert"][s, 0].reshape(num_ranks, num_local).sum(1))
    for r in range(num_ranks):
        for name in ("recv_x", "recv_topk_idx", "recv_topk_weights",
                     "num_recv_tokens_per_expert"):
            np.testing.assert_array_equal(_f32(got[name][r]) if name == "recv_x" else
                                          got[name][r], want[r][name], err_msg=f"{name}, rank {r}")
        assert got["num_recv_tokens"][r, 0] == want[r]["num_recv_tokens"], f"rank {r}"
        assert got["num_dropped"][r, 0] == want[r]["num_dropped"], f"rank {r}"
        # Every needed row is received or counted as dropped, never both.
        assert got["num_recv_tokens"][r, 0] + got["num_dropped"][r, 0] == needed[r], f"rank {r}"
        for name in ("send_pos", "num_tokens_matrix", "pair_expert_rows"):
            np.testing.assert_array_equal(got[name][r], handles[r][name],
                                          err_msg=f"handle.{name}, rank {r}")
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(20)
@given(data=st.data())
def test_dispatch_rows_are_the_oracles_or_counted_as_dropped(backend, data):
    """Dispatch (rank and expert layout, any capacity): on every rank recv_x, recv_topk_idx,
    recv_topk_weights, num_recv_tokens, num_recv_tokens_per_expert and num_dropped equal
    the oracle's exactly (rows past num_recv_tokens zero / -1); the first C rows in
    DeepEP's order are kept and num_recv_tokens + num_dropped = the rows the rank needs
    (from the senders' get_dispatch_layout); the handle's send_pos, num_tokens_matrix and
    pair_expert_rows are docs/design.md's."""
    case, layout, capacity, ex = _draw_normal(data, backend, NORMAL_CASES)
    got = _normal_mode(backend, case, layout, capacity, ex)
    _check_dispatch(got, ex, layout, _ranks_per_node(backend, case, ex))


def _check_combine(got, ex, layout, want, ranks_per_node):
    r, k = ex.num_ranks, ex.topk
    idx = ex.idx.reshape(r, -1, k)
    y = np.asarray(ex.y).reshape(r, ex.capacity, -1)
    bias = np.asarray(ex.bias).reshape(r, idx.shape[1], -1)
    recv_x = np.stack([d["recv_x"] for d in want]).astype(y.dtype)
    exact = oracle.combine_exact(y, idx, want, ex.num_experts, ranks_per_node)
    np.testing.assert_array_equal(_f32(got["combined"]), _f32(exact), err_msg="combine(y)")
    exact = oracle.combine_exact(recv_x, idx, want, ex.num_experts, ranks_per_node, bias)
    np.testing.assert_array_equal(_f32(got["combined_recv"]), _f32(exact),
                                  err_msg="combine(recv_x, bias)")


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(20)
@given(data=st.data())
def test_combine_is_bit_exact_in_the_specified_order(backend, data):
    """Combine (rank and expert layout, any capacity), bit-exact against
    oracle.combine_exact: out[t] = bias[t] + the value of every rank t went to, in float32
    in ascending rank, cast to the dtype; a rank's value is its pair's row (rank layout; 0
    if dropped) or its kept expert rows summed in float32 in slot order and cast (expert
    layout). Checked on random rows y (rows past num_recv_tokens must be ignored) without
    bias, and on the received rows themselves with a bias."""
    case, layout, capacity, ex = _draw_normal(data, backend, NORMAL_CASES)
    got = _normal_mode(backend, case, layout, capacity, ex)
    want = _oracle_dispatch(ex, layout)
    event(f"rows dropped: {any(d['num_dropped'] for d in want)}")
    _check_combine(got, ex, layout, want, _ranks_per_node(backend, case, ex))


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(10)
@given(data=st.data())
def test_internode_combine_sums_per_node_then_across_nodes(backend, data):
    """An internode Buffer (num_ranks_per_node G < R): get_dispatch_layout counts tokens per
    node, dispatch and the handle are exactly the intranode ones, and combine is bit-exact
    against oracle.combine_exact with G: a float32 partial per node over its ranks in
    ascending rank, then bias + the partials of the nodes the token went to, in ascending
    node. Reference backend only here: the CUDA internode kernels need one process per GPU
    (tests/test_gpu_multiprocess.py)."""
    if backend != "reference":
        pytest.skip("internode Buffers need one process per GPU (tests/test_gpu_multiprocess.py)")
    case, layout, capacity, ex = _draw_normal(data, backend, INTERNODE_CASES)
    got = _normal_mode(backend, case, layout, capacity, ex)
    assert _ranks_per_node(backend, case, ex) == case.ranks_per_node < ex.num_ranks
    want = _check_dispatch(got, ex, layout, case.ranks_per_node)
    _check_combine(got, ex, layout, want, case.ranks_per_node)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("backend", BACKENDS)
@_settings(6)
@given(data=st.data())
def test_gradients_are_combine_and_cached_dispatch(backend, data):
    """jax.vjp of dispatch: d x = combine of d recv_x (no bias; bit-exact against
    oracle.combine_exact), d topk_weights[t, k] = d recv_topk_weights at the kept row
    holding slot k of t (0 if dropped). jax.vjp of combine: d y = d out dispatched to the
    rows (oracle.dispatch of d out, dropped rows' cotangents lost), d bias = d out. All
    exact."""
    case, layout, capacity, ex = _draw_normal(data, backend, NORMAL_CASES[1:5])
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="cotangent seed"))
    ct_x = _normal(rng, ex.y.shape, case.dtype, spread=True)
    ct_w = jnp.asarray(rng.standard_normal((ex.y.shape[0], ex.topk)), jnp.float32)
    ct_out = _normal(rng, ex.x.shape, case.dtype)
    mesh, buf = _buffer(backend, ex.num_ranks, ex.num_experts, case.hidden)

    def body(x, idx, w, y, bias, ct_x, ct_w, ct_out):
        def dispatch(x, w):
            out = buf.dispatch(x, idx, w, layout=layout, capacity=capacity)
            return (out.recv_x, out.recv_topk_weights), out.handle
        _, dispatch_vjp, handle = jax.vjp(dispatch, x, w, has_aux=True)
        dx, dw = dispatch_vjp((ct_x, ct_w))
        _, combine_vjp = jax.vjp(lambda y, b: buf.combine(y, handle, bias=b), y, bias)
        dy, dbias = combine_vjp(ct_out)
        return dict(dx=dx, dw=dw, dy=dy, dbias=dbias)

    fn = _program(("grad", backend, case, layout), mesh, body)
    got = _run(mesh, fn, ex.x, jnp.asarray(ex.idx), ex.w, ex.y, ex.bias, ct_x, ct_w, ct_out)
    r, k = ex.num_ranks, ex.topk
    idx = ex.idx.reshape(r, -1, k)
    want = _oracle_dispatch(ex, layout)
    ct_x_r = np.asarray(ct_x).reshape(r, ex.capacity, -1)
    np.testing.assert_array_equal(
        _f32(got["dx"]), _f32(oracle.combine_exact(ct_x_r, idx, want, ex.num_experts, r)),
        err_msg="d x")
    np.testing.assert_array_equal(got["dw"], oracle.dispatch_weights_grad(
        np.asarray(ct_w).reshape(r, ex.capacity, k), idx, want, ex.num_experts),
        err_msg="d topk_weights")
    rows = oracle.dispatch(_f32(ct_out).reshape(r, idx.shape[1], -1), idx,
                           np.asarray(ex.w).reshape(r, -1, k), ex.num_experts, ex.capacity, layout)
    np.testing.assert_array_equal(_f32(got["dy"]), np.stack([d["recv_x"] for d in rows]),
                                  err_msg="d y")
    np.testing.assert_array_equal(_f32(got["dbias"]), _f32(ct_out).reshape(got["dbias"].shape),
                                  err_msg="d bias")


# ------------------------------------------------------------------ low latency
def _draw_low_latency(data, backend, cases=LOW_LATENCY_CASES):
    case = data.draw(st.sampled_from(cases), label="case")
    fp8, round_scale = data.draw(st.sampled_from(FP8_MODES), label="(fp8, round_scale)")
    num_ranks, num_experts, _, topk = _shape(backend, case)
    routing = data.draw(routings(num_ranks, num_experts, ROUTINGS + ("junk",)), label="routing")
    event(f"routing: {routing.kind}")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    total = num_ranks * case.num_tokens
    idx = make_routing(rng, routing, num_ranks, case.num_tokens, num_experts, topk)
    x = _normal(rng, (total, case.hidden), case.dtype)
    w = jnp.asarray(rng.standard_normal((total, topk)), jnp.float32)
    y = _normal(rng, (num_ranks * case.num_local, num_ranks * case.max_tokens, case.hidden),
                case.dtype, spread=True)
    return case, fp8, round_scale, (num_ranks, num_experts, topk), (x, idx, w, y)


def _low_latency(backend, case, fp8, round_scale, shape, arrays, hook):
    """low_latency_dispatch (fused, or the send/recv halves with hook) and
    low_latency_combine of the random rows y: numpy [R, ...] arrays."""
    num_ranks, num_experts, _ = shape
    mesh, buf = _buffer(backend, num_ranks, num_experts, case.hidden)
    kw = dict(max_tokens_per_rank=case.max_tokens, fp8=fp8, round_scale=round_scale)

    def body(x, idx, w, y):
        if hook:
            out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, idx, **kw))
            combined = buf.low_latency_combine_recv(
                buf.low_latency_combine_send(y, idx, w, out.handle))
        else:
            out = buf.low_latency_dispatch(x, idx, **kw)
            combined = buf.low_latency_combine(y, idx, w, out.handle)
        scales = out.recv_scales if fp8 else jnp.zeros((1,), jnp.float32)
        return dict(recv_x=out.recv_x, recv_scales=scales, recv_count=out.recv_count,
                    row_of_slot=out.handle.row_of_slot, combined=combined)

    key = ("low_latency", backend, case, fp8, round_scale, hook)
    x, idx, w, y = arrays
    return _run(mesh, _program(key, mesh, body), x, jnp.asarray(idx), w, y)  # [R, L, R*M, ...]


def _valid_rows(recv_count, rows):
    """bool [R, L, R * M]: the rows the contract defines (row < recv_count of its expert)."""
    return np.arange(rows)[None, None, :] < recv_count[:, :, None]


def _assert_close_to_ulp(got, want, bound, what):
    """|got - want| <= eps * (bound + |want|), `bound` the sum of the magnitudes of a
    token's terms: one ulp of the output dtype (bf16: eps = 2^-7; float32: eps = 2^-20, a
    last-bit change in each of up to 8 roundings). That is what contracting w * row + partial
    into a fused multiply-add may change: a last float32 bit of a partial (which can flip
    its rounding to bf16), then the final rounding."""
    eps = 2.0**-20 if got.dtype == np.float32 else 2.0**-7
    diff = np.abs(_f32(got) - _f32(want))
    bad = diff > eps * (bound + np.abs(_f32(want)))
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements differ by more than "
                           f"an ulp; largest difference {diff.max()}")


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(16)
@given(data=st.data())
def test_low_latency_matches_oracle(backend, data):
    """low_latency_dispatch, fp8 off and on (with and without round_scale): recv_count and
    the handle's row_of_slot equal the oracle's; every row below recv_count[e] is the token
    of the next (source, token) selecting e, exactly (fp8: oracle.quantize_fp8, values and
    scales bit for bit); rows past recv_count are not checked (unspecified). Repeated
    experts share one row; ids outside [0, E) are skipped.
    low_latency_combine of random rows (rows past recv_count must be ignored) against
    oracle.low_latency_combine (per holding rank a float32 sum of w * row in slot order,
    cast to the dtype; then the partials in ascending rank), within one ulp of the output
    dtype: the compilers may fuse w * row + partial into a multiply-add (XLA:CPU does for
    the reference backend, the CUDA kernels do), so it is not bit-exact."""
    case, fp8, round_scale, shape, arrays = _draw_low_latency(data, backend)
    got = _low_latency(backend, case, fp8, round_scale, shape, arrays, hook=False)
    _check_low_latency(got, case, fp8, round_scale, shape, arrays)


def _check_low_latency(got, case, fp8, round_scale, shape, arrays):
    num_ranks, num_experts, topk = shape
    x, idx, w, y = arrays
    idx_r = idx.reshape(num_ranks, -1, topk)
    x_r = np.asarray(x).reshape(num_ranks, idx_r.shape[1], -1)
    want = oracle.low_latency_dispatch(x_r, idx_r, num_experts, case.max_tokens, fp8, round_scale)
    np.testing.assert_array_equal(got["recv_count"], np.stack([d["recv_count"] for d in want]),
                                  err_msg="recv_count")
    np.testing.assert_array_equal(got["row_of_slot"], np.stack([d["row_of_slot"] for d in want]),
                                  err_msg="row_of_slot")
    valid = _valid_rows(got["recv_count"], got["recv_x"].shape[2])
    want_x = np.stack([d["recv_x"] for d in want])
    assert got["recv_x"].dtype == want_x.dtype
    np.testing.assert_array_equal(_f32(got["recv_x"][valid]), _f32(want_x[valid]),
                                  err_msg="recv_x (valid rows)")
    if fp8:
        want_s = np.stack([d["recv_scales"] for d in want])
        got_s = got["recv_scales"].reshape(want_s.shape)
        np.testing.assert_array_equal(got_s[valid], want_s[valid], err_msg="recv_scales")
    y_r = np.asarray(y).reshape((num_ranks, case.num_local) + y.shape[1:])
    w_r = np.asarray(w).reshape(num_ranks, -1, topk)
    exact = oracle.low_latency_combine(y_r, idx_r, w_r, num_experts, case.max_tokens)
    size = np.zeros(exact.shape, np.float32)  # sum of |w * row| over a token's slots
    for r, (row_of_slot, _) in enumerate(oracle.low_latency_rows(idx_r, num_experts,
                                                                 case.max_tokens)):
        rows = _f32(y_r[r]).reshape(-1, y.shape[-1])
        for s in range(num_ranks):
            for t in range(idx_r.shape[1]):
                for k in np.flatnonzero(row_of_slot[s, t] >= 0):
                    size[s, t] += np.abs(w_r[s, t, k] * rows[row_of_slot[s, t, k]])
    _assert_close_to_ulp(got["combined"], exact, size, "combine")


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(6)
@given(data=st.data())
def test_low_latency_hooked_halves_equal_the_fused_ops(backend, data):
    """low_latency_dispatch_send + _recv and low_latency_combine_send + _recv return what
    the fused ops return (recv_x on the valid rows, scales, counts, handle, combine), bit
    for bit, and both match the oracle."""
    case, fp8, round_scale, shape, arrays = _draw_low_latency(data, backend,
                                                              LOW_LATENCY_CASES[:2])
    fused = _low_latency(backend, case, fp8, round_scale, shape, arrays, hook=False)
    hooked = _low_latency(backend, case, fp8, round_scale, shape, arrays, hook=True)
    valid = _valid_rows(fused["recv_count"], fused["recv_x"].shape[2])
    for name in ("recv_count", "row_of_slot", "combined"):
        np.testing.assert_array_equal(_f32(hooked[name]), _f32(fused[name]), err_msg=name)
    np.testing.assert_array_equal(_f32(hooked["recv_x"][valid]), _f32(fused["recv_x"][valid]),
                                  err_msg="recv_x")
    if fp8:
        s_shape = fused["recv_x"].shape[:3] + (-1,)
        np.testing.assert_array_equal(hooked["recv_scales"].reshape(s_shape)[valid],
                                      fused["recv_scales"].reshape(s_shape)[valid],
                                      err_msg="recv_scales")
    _check_low_latency(hooked, case, fp8, round_scale, shape, arrays)
