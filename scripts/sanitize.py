"""Every CUDA-backend op under compute-sanitizer, with no NCCL in the sanitized process.

XLA's collectives (the reference backend's all_to_all, all_gather, ...) run on NCCL, whose
communicator set-up crashes under compute-sanitizer (docs/hardening.md, "Memory safety").
So the check runs in two passes over the same cases:

    python scripts/sanitize.py reference --out DIR     # a normal run: inputs + expected outputs
    compute-sanitizer --tool memcheck --leak-check full --error-exitcode 99 \\
        python scripts/sanitize.py cuda --in DIR       # the CUDA backend alone, compared with DIR

The reference pass draws each case's inputs (fixed seeds, random data, -1 holes in topk_idx),
runs the case on the reference backend over the first R devices (--ranks, default every
device: run it on the machine and GPUs of the cuda pass) and saves inputs and outputs to
DIR/<case>.npz. The cuda pass places the saved inputs on the GPUs (jax.device_put: no
collective), compiles each case with backend="cuda", refuses a compiled program that holds
an XLA collective (it would start NCCL), runs it twice, compares both results with the saved
ones (bit for bit where tests/test_gpu.py and tests/test_gpu_low_latency.py are, with their
tolerances elsewhere), calls Buffer.check(), prints one line per case and exits 1 on any
mismatch. One process drives every GPU (one Buffer over all of them, jax.shard_map), or, under
`python -m jax_ep.launch -n R`, one process each GPU (each compares its own shards): the
sanitizer runs the kernels of a process one at a time, so only the latter works under it.

Cases (T = 64 tokens per rank, top-4 unless named): normal dispatch + combine (rank and
expert layout, with a bias, get_dispatch_layout), FP8 dispatch, capacity overflow (rank and
expert layout, drops counted), jax.grad of a dispatch -> combine round trip (d x: combine's
backward is a cached dispatch, dispatch's a combine), low-latency dispatch + combine (bf16,
FP8, FP8 with round_scale on float32 with repeated and out-of-range expert ids), the hooked
low-latency halves (bf16 and FP8), two programs compiled with XLA command buffers (CUDA
graphs, custom calls captured), and an internode Buffer (2 virtual nodes, NVSHMEM; only with
one process per GPU): dispatch + combine fused and hooked, a capacity overflow, low-latency
FP8 fused and bf16 hooked; and, with one process per GPU, three failure paths in which the
last rank never runs the program (its peers time out after 2 s: a normal dispatch + combine
and an FP8 low-latency round trip must come back poisoned with an error naming the rank; a
hooked low-latency round trip with mask=True must mask the rank and complete). Not covered:
the top-k weight gradient of dispatch and the backward of the low-latency ops (they run
reference code, whose collectives need NCCL).
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import os
import pathlib
import re
import sys
import time
import zlib
from typing import Callable, Optional

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the reference pass on GPUs runs NCCL

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402

TOKENS = 64  # T, tokens per rank
TOPK = 4
MAX_TOKENS = 2 * TOKENS  # the Buffers' max_tokens_per_rank: low-latency M up to 2T
# name -> (hidden H, experts E, internode): an internode Buffer splits the R ranks into 2
# virtual nodes of R / 2 GPUs (NVSHMEM between them; 1 GPU per node with R = 2 or odd R).
BUFFERS = {"small": (512, 16, False), "large": (1024, 32, False), "internode": (512, 16, True)}
REPEATS = 2  # cuda pass: runs of each compiled program (the second reuses the staging)
# cuda pass: a case still running after this long prints every thread's Python stack and ends
# the process (a hang then says where it is, and does not use up the caller's time limit).
CASE_LIMIT_S = 120.0
GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL", "xla_gpu_graph_min_graph_size": 1}
CAST = ("x", "bias", "ct")  # inputs saved as float32 (exact in bf16) and cast to the case's dtype
# An XLA collective in HLO ("all-to-all(", "all-reduce-start(") or StableHLO text.
COLLECTIVE = re.compile(r"\b(all-to-all|ragged-all-to-all|all-gather|all-reduce|reduce-scatter|"
                        r"collective-permute|collective-broadcast)(-start)?\(|stablehlo\."
                        r"(all_to_all|all_gather|all_reduce|reduce_scatter|collective_permute|"
                        r"collective_broadcast)")


# ------------------------------------------------------------------ the cases
def routing(rng, num_tokens, num_experts, topk, distinct=True):
    """int32 [T, K]: distinct experts per token with 1/8 of the slots -1 (tests/helpers.py's
    routing), or (distinct=False) ids drawn from [-1, E + 2): -1, repeated experts and ids
    outside [0, E) (tests/test_gpu_low_latency.py's)."""
    if not distinct:
        return rng.integers(-1, num_experts + 2, (num_tokens, topk)).astype(np.int32)
    idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :topk].astype(np.int32)
    idx[rng.random(idx.shape) < 1 / 8] = -1
    return idx


def bf16_exact(rng, shape):
    """float32 `shape`, standard normal values rounded to bfloat16 (so casting is exact)."""
    return rng.standard_normal(shape).astype(jnp.bfloat16).astype(np.float32)


def fp8_quantize(x):
    """x float32 [N, H] -> (uint8 [N, H], the bits of float8_e4m3fn values, float32
    [N, H // 128] scales): one scale per 128 channels, max(amax, 1e-4) / 448."""
    blocks = x.reshape(x.shape[0], -1, 128)
    scales = (np.maximum(np.abs(blocks).max(-1), 1e-4) / 448).astype(np.float32)
    q = (blocks / scales[..., None]).astype(jnp.float8_e4m3fn).reshape(x.shape)
    return q.view(np.uint8), scales


def normal_round_trip(layout, capacity=None, hook=False):
    """dispatch -> rows * 0.5 (exact) -> combine with a bias (fused, or with hook the hooked
    halves); every output and handle array. Inputs per shard: x [T, H], idx int32 [T, K],
    w f32 [T, K], bias [T, H] (x's dtype)."""
    def program(buf, a):
        if hook:
            out = buf.dispatch_recv(buf.dispatch_send(a["x"], a["idx"], a["w"], layout=layout,
                                                      capacity=capacity))
        else:
            out = buf.dispatch(a["x"], a["idx"], a["w"], layout=layout, capacity=capacity)
        y = (out.recv_x.astype(jnp.float32) * 0.5).astype(a["x"].dtype)
        combined = (buf.combine_recv(buf.combine_send(y, out.handle, bias=a["bias"])) if hook
                    else buf.combine(y, out.handle, bias=a["bias"]))
        return dict(recv_x=out.recv_x, recv_topk_idx=out.recv_topk_idx,
                    recv_topk_weights=out.recv_topk_weights,
                    num_recv_tokens=out.num_recv_tokens[None],
                    num_recv_tokens_per_expert=out.num_recv_tokens_per_expert,
                    num_dropped=out.num_dropped[None], send_pos=out.handle.send_pos,
                    num_tokens_matrix=out.handle.num_tokens_matrix,
                    pair_expert_rows=out.handle.pair_expert_rows, combined=combined)
    return program


def layout_and_round_trip(buf, a):
    """get_dispatch_layout's four outputs and normal_round_trip("rank")'s."""
    lay = buf.get_dispatch_layout(a["idx"])
    return dict(num_tokens_per_rank=lay.num_tokens_per_rank[None],
                num_tokens_per_rdma_rank=lay.num_tokens_per_rdma_rank[None],
                num_tokens_per_expert=lay.num_tokens_per_expert[None],
                is_token_in_rank=lay.is_token_in_rank,
                **normal_round_trip("rank")(buf, a))


def fp8_round_trip(buf, a):
    """FP8 dispatch (rank layout) of x_bits uint8 [T, H] (float8_e4m3fn bits) with x_scales
    f32 [T, H / 128] -> combine of the dequantized rows in float32."""
    q = jax.lax.bitcast_convert_type(a["x_bits"], jnp.float8_e4m3fn)
    out = buf.dispatch((q, a["x_scales"]), a["idx"], a["w"])
    recv_q, recv_scales = out.recv_x
    y = jax_ep.dequantize_fp8(recv_q, recv_scales)
    return dict(recv_x=recv_q, recv_x_scales=recv_scales, recv_topk_idx=out.recv_topk_idx,
                recv_topk_weights=out.recv_topk_weights, num_recv_tokens=out.num_recv_tokens[None],
                num_recv_tokens_per_expert=out.num_recv_tokens_per_expert,
                send_pos=out.handle.send_pos, combined=buf.combine(y, out.handle))


def round_trip_gradient(layout):
    """d x of sum(combine(dispatch(x).recv_x * 0.5) * ct), per shard: the backward runs a
    cached dispatch (combine's) and a combine (dispatch's). Inputs: x, idx, w, ct [T, H]."""
    def program(buf, a):
        def loss(x):
            out = buf.dispatch(x, a["idx"], a["w"], layout=layout)
            y = (out.recv_x.astype(jnp.float32) * 0.5).astype(x.dtype)
            combined = buf.combine(y, out.handle).astype(jnp.float32)
            return jnp.sum(combined * a["ct"].astype(jnp.float32))
        return dict(d_x=jax.grad(loss)(a["x"]))
    return program


def low_latency_round_trip(fp8, hook, round_scale=False, max_tokens_per_rank=None, mask=False):
    """Low-latency dispatch (fused or hooked) -> rows * 0.5 (dequantized with fp8) ->
    low-latency combine. Per shard: recv_x [L, R*M, H], recv_scales f32 [L, R*M, H / 128]
    (fp8), recv_count int32 [L], row_of_slot int32 [R, M, K], combined [T, H]."""
    def program(buf, a):
        x, idx, w = a["x"], a["idx"], a["w"]
        kw = dict(max_tokens_per_rank=max_tokens_per_rank, fp8=fp8, round_scale=round_scale,
                  mask=mask)
        if hook:
            out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, idx, **kw))
        else:
            out = buf.low_latency_dispatch(x, idx, **kw)
        rows = (jax_ep.dequantize_fp8(out.recv_x, out.recv_scales) if fp8
                else out.recv_x.astype(jnp.float32))
        y = (rows * 0.5).astype(x.dtype)
        if hook:
            combined = buf.low_latency_combine_recv(
                buf.low_latency_combine_send(y, idx, w, out.handle, mask=mask))
        else:
            combined = buf.low_latency_combine(y, idx, w, out.handle, mask=mask)
        outs = dict(recv_count=out.recv_count, row_of_slot=out.handle.row_of_slot,
                    recv_x=out.recv_x, combined=combined)
        if fp8:
            outs["recv_scales"] = out.recv_scales
        return outs
    return program


# Comparisons (got, want: float32/int numpy arrays; outputs: want's outputs of the case).
EXACT, ROWS, ROWS_FP8, ULP, NORM = "exact", "rows", "rows_fp8", "ulp", "norm"
LOW_LATENCY = {"recv_x": ROWS, "recv_scales": ROWS, "combined": ULP}
LOW_LATENCY_FP8 = {"recv_x": ROWS_FP8, "recv_scales": ROWS, "combined": ULP}


@dataclasses.dataclass(frozen=True)
class Case:
    """One program: `program(buf, inputs)` runs per shard inside jax.shard_map (every input
    and output split along axis 0 over "ep") and returns a dict of outputs; `checks` names
    the outputs not compared bit for bit (kinds above)."""
    name: str
    buffer: str  # a key of BUFFERS
    program: Callable
    checks: dict = dataclasses.field(default_factory=dict)
    dtype: str = "bfloat16"  # of x, bias and ct
    topk: int = TOPK
    distinct: bool = True  # routing(distinct=...)
    inputs: tuple = ("x", "idx", "w")  # from: x, idx, w, bias, ct, x_bits + x_scales (FP8)
    expect_drops: bool = False  # the reference pass checks that every rank dropped rows
    graphs: bool = False  # the cuda pass compiles it with XLA command buffers (GRAPHS)
    expect: Optional[str] = None  # another case whose inputs and outputs it uses
    # "fail" or "mask": the last rank never runs the program (failure paths, below); the case
    # has a Buffer of its own and no reference outputs.
    silent: Optional[str] = None


CASES = (
    Case("normal_rank", "small", layout_and_round_trip, inputs=("x", "idx", "w", "bias")),
    Case("normal_expert", "large", normal_round_trip("expert"), inputs=("x", "idx", "w", "bias")),
    Case("fp8_dispatch", "small", fp8_round_trip, inputs=("x_bits", "x_scales", "idx", "w")),
    Case("overflow_rank", "small", normal_round_trip("rank", capacity=TOKENS),
         inputs=("x", "idx", "w", "bias"), expect_drops=True),
    Case("overflow_expert", "large", normal_round_trip("expert", capacity=TOKENS),
         inputs=("x", "idx", "w", "bias"), dtype="float32", expect_drops=True),
    Case("grad_rank", "small", round_trip_gradient("rank"), {"d_x": NORM},
         inputs=("x", "idx", "w", "ct")),
    Case("grad_expert", "large", round_trip_gradient("expert"), {"d_x": NORM},
         inputs=("x", "idx", "w", "ct")),
    Case("low_latency_bf16", "large", low_latency_round_trip(False, False), LOW_LATENCY),
    Case("low_latency_fp8", "large",
         low_latency_round_trip(True, False, max_tokens_per_rank=MAX_TOKENS), LOW_LATENCY_FP8),
    Case("low_latency_fp8_round_scale", "small",
         low_latency_round_trip(True, False, round_scale=True), LOW_LATENCY_FP8,
         dtype="float32", topk=6, distinct=False),
    Case("hook_bf16", "small", low_latency_round_trip(False, True), LOW_LATENCY),
    Case("hook_fp8", "large", low_latency_round_trip(True, True, max_tokens_per_rank=MAX_TOKENS),
         LOW_LATENCY_FP8),
    Case("graphs_normal_expert", "large", normal_round_trip("expert"),
         inputs=("x", "idx", "w", "bias"), graphs=True, expect="normal_expert"),
    Case("graphs_hook_fp8", "large",
         low_latency_round_trip(True, True, max_tokens_per_rank=MAX_TOKENS), LOW_LATENCY_FP8,
         graphs=True, expect="hook_fp8"),
    Case("internode_rank", "internode", normal_round_trip("rank"),
         inputs=("x", "idx", "w", "bias")),
    Case("internode_expert_hook", "internode", normal_round_trip("expert", hook=True),
         inputs=("x", "idx", "w", "bias")),
    Case("internode_overflow_expert", "internode", normal_round_trip("expert", capacity=TOKENS),
         inputs=("x", "idx", "w", "bias"), dtype="float32", expect_drops=True),
    Case("internode_low_latency_fp8", "internode",
         low_latency_round_trip(True, False, max_tokens_per_rank=MAX_TOKENS), LOW_LATENCY_FP8),
    Case("internode_hook_bf16", "internode", low_latency_round_trip(False, True), LOW_LATENCY),
    Case("silent_rank_dispatch", "small", normal_round_trip("expert"),
         inputs=("x", "idx", "w", "bias"), silent="fail"),
    Case("silent_rank_low_latency_fp8", "small", low_latency_round_trip(True, False),
         silent="fail"),
    Case("silent_rank_masked_hook", "small", low_latency_round_trip(False, True, mask=True),
         silent="mask"),
)
SILENT_TIMEOUT_S = 2.0  # timeout_s of the silent cases' Buffers


def make_inputs(case: Case, num_ranks: int) -> dict:
    """The case's global inputs, numpy, leading axis R * T: x, bias, ct float32 [R*T, H]
    (exact in bf16), idx int32 [R*T, K], w float32 [R*T, K] (in [0, 1)), x_bits uint8
    [R*T, H] and x_scales float32 [R*T, H / 128] (FP8). Seeded by the case's name."""
    hidden, num_experts, _ = BUFFERS[case.buffer]
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    total = num_ranks * TOKENS
    x = bf16_exact(rng, (total, hidden))
    x_bits, x_scales = fp8_quantize(x)
    every = dict(x=x, x_bits=x_bits, x_scales=x_scales,
                 idx=routing(rng, total, num_experts, case.topk, case.distinct),
                 w=rng.random((total, case.topk)).astype(np.float32),
                 bias=bf16_exact(rng, (total, hidden)), ct=bf16_exact(rng, (total, hidden)))
    return {name: every[name] for name in case.inputs}


# ------------------------------------------------------------------ running
def make_mesh(num_ranks: int, platform: Optional[str] = None) -> Mesh:
    """A 1-D "ep" mesh over the first num_ranks devices (of `platform`, else the default)."""
    devices = jax.devices(platform) if platform else jax.devices()
    if len(devices) < num_ranks:
        raise SystemExit(f"sanitize.py: needs {num_ranks} {platform or ''} devices, found "
                         f"{len(devices)}: {devices}")
    return Mesh(np.array(devices[:num_ranks]), ("ep",))


def make_buffer(mesh: Mesh, backend: str, name: str, timeout_s: float = 300.0):
    """The Buffer BUFFERS[name] describes (max_tokens_per_rank=MAX_TOKENS); an internode one
    splits the R ranks into 2 virtual nodes (1 GPU per node with R = 2 or odd R)."""
    hidden, num_experts, internode = BUFFERS[name]
    num_ranks = mesh.devices.size
    per_node = num_ranks // 2 if num_ranks % 2 == 0 else 1
    return jax_ep.Buffer(mesh, "ep", num_experts=num_experts, hidden=hidden, backend=backend,
                         max_tokens_per_rank=MAX_TOKENS, timeout_s=timeout_s,
                         num_ranks_per_node=per_node if internode else None)


def make_buffers(mesh: Mesh, backend: str, timeout_s: float = 300.0,
                 internode: bool = True) -> dict:
    """make_buffer for every entry of BUFFERS (the internode one only with `internode`)."""
    return {name: make_buffer(mesh, backend, name, timeout_s) for name, spec in BUFFERS.items()
            if internode or not spec[2]}


def place(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array `value` (the same in every process) split over "ep": each process
    places its own devices' rows (no collective)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def lower_case(case: Case, buf, mesh: Mesh, inputs: dict, graphs: bool):
    """(lowered program, device inputs): inputs cast (CAST to case.dtype) and split over
    "ep"; the program compiles with XLA command buffers when `graphs`."""
    args = {name: place(value.astype(jnp.dtype(case.dtype)) if name in CAST else value,
                        NamedSharding(mesh, P("ep")))
            for name, value in inputs.items()}
    fn = jax.shard_map(functools.partial(case.program, buf), mesh=mesh, in_specs=P("ep"),
                       out_specs=P("ep"))
    return jax.jit(fn, compiler_options=GRAPHS if graphs else None).lower(args), args


def widen(value: np.ndarray) -> np.ndarray:
    """bfloat16 and float8 widened to float32 (exactly); other dtypes unchanged."""
    return value.astype(np.float32) if value.dtype in (jnp.bfloat16, jnp.float8_e4m3fn) else value


def to_numpy(outputs: dict) -> dict:
    """Global outputs as numpy arrays (widened)."""
    return {name: widen(np.asarray(value)) for name, value in outputs.items()}


def local_parts(outputs: dict, want: Optional[dict] = None) -> tuple:
    """(got, want) restricted to this process's shards: the rows of each output split over
    "ep" that live on this process's devices (one process per GPU), both widened (want:
    None without `want`)."""
    got_parts, want_parts = {}, {}
    for name, value in outputs.items():
        shards = sorted(value.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        got_parts[name] = np.concatenate([widen(np.asarray(shard.data)) for shard in shards])
        if want is not None:
            want_parts[name] = np.concatenate([want[name][shard.index] for shard in shards])
    return got_parts, want_parts if want is not None else None


def compare(case: Case, got: dict, want: dict) -> list:
    """Mismatch messages (empty when every output matches). ROWS / ROWS_FP8: only rows
    below want's recv_count (the contract leaves the others unspecified); FP8 rows may differ
    by a tie between FP8 subnormals that XLA:GPU (a reference on GPUs) rounds away from the
    even neighbour. ULP: within one bf16 ulp (rtol 2**-6, atol 1e-2). NORM: |got - want| <=
    0.01 |want|. The tolerances are those of tests/test_gpu.py and test_gpu_low_latency.py."""
    problems = []
    for name, w in want.items():
        g, kind = got[name], case.checks.get(name, EXACT)
        try:
            if g.shape != w.shape:
                raise AssertionError(f"shape {g.shape}, expected {w.shape}")
            if kind in (ROWS, ROWS_FP8):
                counts = want["recv_count"]
                valid = np.arange(g.shape[1])[None, :] < counts[:, None]
                g, w = g[valid], w[valid]
                if kind == ROWS_FP8:
                    tie = (np.abs(w) < 2 ** -6) & (np.abs(g - w) <= 2 ** -9)
                    g = np.where(tie, w, g)
            if kind == ULP:
                np.testing.assert_allclose(g, w, rtol=2 ** -6, atol=1e-2)
            elif kind == NORM:
                error, norm = np.linalg.norm(g - w), np.linalg.norm(w)
                assert error <= 1e-2 * norm, f"|got - expected| = {error}, |expected| = {norm}"
            else:
                np.testing.assert_array_equal(g, w)
        except AssertionError as err:
            problems.append(f"{name} ({kind}): {str(err).strip()[:400]}")
    return problems


def cases_named(names) -> list:
    """CASES, or those named in `names` (a SystemExit for an unknown name)."""
    if not names:
        return list(CASES)
    known = {case.name: case for case in CASES}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"sanitize.py: unknown cases {unknown}; known: {sorted(known)}")
    return [known[name] for name in names]


def close(buffers: dict) -> None:
    """Close the Buffers, then free every live array and compiled program, so that a leak
    check sees only what was never freed."""
    for buf in buffers.values():
        buf.close()
    for array in jax.live_arrays():
        array.delete()
    jax.clear_caches()


def reference_pass(out_dir: pathlib.Path, num_ranks: Optional[int], names=()) -> int:
    """Runs every case (not those with `expect`) on the reference backend and writes
    out_dir/<case>.npz: input_<name> (make_inputs), output_<name> (to_numpy), num_ranks.
    Returns the exit code."""
    num_ranks = num_ranks or len(jax.devices())
    if num_ranks < 2:
        print(f"sanitize.py: skipped: expert parallelism needs 2 devices or more, found "
              f"{len(jax.devices())}")
        return 0
    mesh = make_mesh(num_ranks)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffers = make_buffers(mesh, "reference")
    print(f"reference pass on {num_ranks} {mesh.devices.flat[0].platform} devices -> {out_dir}")
    for case in cases_named(names):
        if case.expect or case.silent:
            continue
        start = time.monotonic()
        inputs = make_inputs(case, num_ranks)
        lowered, args = lower_case(case, buffers[case.buffer], mesh, inputs, graphs=False)
        outputs = to_numpy(lowered.compile()(args))
        buffers[case.buffer].check()
        if case.expect_drops and not np.all(outputs["num_dropped"] > 0):
            raise AssertionError(f"{case.name}: the capacity must overflow on every rank; "
                                 f"num_dropped = {outputs['num_dropped']}")
        np.savez_compressed(out_dir / f"{case.name}.npz", num_ranks=num_ranks,
                 **{f"input_{k}": v for k, v in inputs.items()},
                 **{f"output_{k}": v for k, v in outputs.items()})
        print(f"{case.name:<28} saved  {time.monotonic() - start:6.1f} s", flush=True)
    close(buffers)
    return 0


def load_case(in_dir: pathlib.Path, case: Case):
    """(num_ranks, inputs, expected outputs) saved by the reference pass for `case`."""
    path = in_dir / f"{case.expect or case.name}.npz"
    if not path.exists():
        raise SystemExit(f"sanitize.py: {path} is missing; run `python scripts/sanitize.py "
                         f"reference --out {in_dir}` first (normally, not under the sanitizer).")
    with np.load(path) as data:
        inputs = {k[len("input_"):]: data[k] for k in data.files if k.startswith("input_")}
        outputs = {k[len("output_"):]: data[k] for k in data.files if k.startswith("output_")}
        return int(data["num_ranks"]), inputs, outputs


def run_silent_case(case: Case, buf, mesh: Mesh, num_ranks: int, start: float) -> bool:
    """A failure path (one process per GPU): the last rank compiles the case's program but
    never runs it; every other rank runs it once on its Buffer (timeout_s =
    SILENT_TIMEOUT_S). "fail": every float output is NaN, recv_count / num_recv_tokens are -1,
    and Buffer.check() raises an error naming the silent rank. "mask" (low-latency,
    mask=True): the op masks the silent rank (masked_ranks() lists it), check() passes and no
    output is NaN. Prints the case's line; returns whether it failed."""
    silent_rank = num_ranks - 1
    problems = []
    try:
        # Every rank compiles the program: with several processes XLA:GPU compiles
        # collectively (sharded autotuning exchanges results through the key-value store), so
        # a rank that never compiled it would hang the others' compile, outside jax_ep's limits.
        inputs = make_inputs(case, num_ranks)
        lowered, args = lower_case(case, buf, mesh, inputs, graphs=False)
        compiled = lowered.compile()
        if jax.process_index() == silent_rank:
            print(f"{case.name:<28} silent   (this rank compiles it and does not run it)",
                  flush=True)
            return False
        got, _ = local_parts(compiled(args))
        error = ""
        try:
            buf.check()
        except RuntimeError as err:
            error = str(err)
        if case.silent == "fail":
            floats = {n: v for n, v in got.items() if np.issubdtype(v.dtype, np.floating)}
            counts = {n: v for n, v in got.items() if n in ("recv_count", "num_recv_tokens")}
            problems += [f"{name}: not poisoned" for name, value in floats.items()
                         if not np.all(np.isnan(value))]
            problems += [f"{name}: not -1" for name, value in counts.items() if np.any(value != -1)]
            if f"rank {silent_rank}" not in error:
                problems.append(f"Buffer.check() must name rank {silent_rank}; it said: "
                                f"{error or 'nothing'}")
        else:
            masked = [entry[1] for entry in buf.masked_ranks()]
            if error or silent_rank not in masked:
                problems.append(f"rank {silent_rank} must be masked without an error; "
                                f"masked_ranks() = {buf.masked_ranks()}, check(): {error}")
            problems += [f"{name}: NaN" for name, value in got.items()
                         if np.issubdtype(value.dtype, np.floating) and np.any(np.isnan(value))]
    except Exception as err:  # noqa: BLE001 - one line per case, then the next case
        problems = [f"{type(err).__name__}: {err}"]
    print_result(case, problems, start)
    return bool(problems)


def print_result(case: Case, problems: list, start: float) -> None:
    """The case's line (ok or MISMATCH, seconds since `start`), then a line per problem."""
    print(f"{case.name:<28} {'MISMATCH' if problems else 'ok':<8} "
          f"{time.monotonic() - start:6.1f} s", flush=True)
    for problem in problems:
        print(f"    {problem}", flush=True)


def cuda_pass(in_dir: pathlib.Path, timeout_s: float, names=()) -> int:
    """Runs the cases on the CUDA backend only (no collective in any program) and compares
    with the reference pass's outputs. Returns the exit code: 0 when every case matched."""
    from jax_ep import cuda_backend
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus or not cuda_backend.is_available():
        raise SystemExit("sanitize.py: the cuda pass runs the CUDA backend, which needs NVIDIA "
                         f"GPUs and jax_ep's CUDA extension; this process has devices "
                         f"{jax.devices()} and extension: "
                         f"{cuda_backend.unavailable_reason() or 'built'}.")
    cases = cases_named(names)
    num_ranks = load_case(in_dir, cases[0])[0]
    mesh = make_mesh(num_ranks, "gpu")
    # Internode Buffers and silent ranks need one process per GPU: only under jax_ep.launch.
    per_gpu = jax.process_count() > 1
    buffers = make_buffers(mesh, "cuda", timeout_s, internode=per_gpu)
    print(f"cuda pass on {num_ranks} GPUs, expected outputs from {in_dir}")
    failed = 0
    # Every process makes every Buffer (collective), the silent cases' ones included.
    silent = {case.name: make_buffer(mesh, "cuda", case.buffer, SILENT_TIMEOUT_S)
              for case in cases if case.silent and per_gpu}
    for case in cases:
        start = time.monotonic()
        faulthandler.dump_traceback_later(CASE_LIMIT_S, exit=True)
        if case.buffer not in buffers or (case.silent and not per_gpu):
            print(f"{case.name:<28} skipped: needs one process per GPU (python -m "
                  "jax_ep.launch)", flush=True)
            continue
        if case.silent:
            failed += run_silent_case(case, silent[case.name], mesh, num_ranks, start)
            continue
        buf = buffers[case.buffer]
        try:
            saved_ranks, inputs, want = load_case(in_dir, case)
            if saved_ranks != num_ranks:
                raise ValueError(f"saved for {saved_ranks} ranks, this run has {num_ranks}")
            lowered, args = lower_case(case, buf, mesh, inputs, case.graphs)
            compiled = lowered.compile()
            found = sorted({m.group(0) for m in COLLECTIVE.finditer(compiled.as_text())})
            if found:
                raise RuntimeError(f"the compiled program holds XLA collectives {found}, which "
                                   "would start NCCL: not run")
            problems = []
            for run in range(REPEATS):
                outputs = compiled(args)
                buf.check()
                if jax.process_count() == 1:
                    got, expected = to_numpy(outputs), want
                else:
                    got, expected = local_parts(outputs, want)
                problems += [f"run {run + 1}: {p}" for p in compare(case, got, expected)]
        except Exception as err:  # noqa: BLE001 - one line per case, then the next case
            problems = [f"{type(err).__name__}: {err}"]
        failed += bool(problems)
        print_result(case, problems, start)
    faulthandler.cancel_dump_traceback_later()
    close({**buffers, **{f"silent {name}": buf for name, buf in silent.items()}})
    print(f"sanitize.py: {len(cases)} cases, {failed} failed", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    ref = sub.add_parser("reference", help="save inputs and reference outputs (a normal run)")
    ref.add_argument("--out", type=pathlib.Path, required=True, help="directory for the .npz files")
    ref.add_argument("--ranks", type=int, default=None,
                     help="EP ranks: the first RANKS devices (default: every device)")
    cuda = sub.add_parser("cuda", help="the CUDA backend alone, compared (under the sanitizer)")
    cuda.add_argument("--in", dest="in_dir", type=pathlib.Path, required=True,
                      help="the reference pass's directory")
    cuda.add_argument("--timeout-s", type=float, default=300.0,
                      help="Buffer timeout_s: how long a kernel waits for a peer")
    for p in (ref, cuda):
        p.add_argument("--cases", nargs="+", default=(), help="only these cases")
    args = parser.parse_args(argv)
    if args.mode == "reference":
        return reference_pass(args.out, args.ranks, args.cases)
    # Set before the GPU client starts: every XLA buffer its own cudaMalloc (no pool), so
    # memcheck sees an access past an operand or result of a custom call.
    os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    from jax_ep import launch
    launch.initialize()  # one process per GPU under `python -m jax_ep.launch`; else a no-op
    return cuda_pass(args.in_dir, args.timeout_s, args.cases)


if __name__ == "__main__":
    sys.exit(main())
