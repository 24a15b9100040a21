"""Hardening of the CUDA backend, one process driving the local GPUs: determinism (bit for
bit, across runs and against the reference backend), a peer that joins late, and the
lifecycle of Buffers (several at once, close, re-creation, `jax.clear_caches`, no leak, a
clean exit without close). tests/test_gpu_multiprocess.py covers one process per GPU.

Run on a GPU machine with `python -m pytest -m gpu tests/test_gpu_hardening.py`.
"""

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_ep
from conftest import run_sharded
from helpers import inputs

pytestmark = pytest.mark.gpu


def _gpus():
    return [d for d in jax.devices() if d.platform == "gpu"]


def _mesh(num_ranks, shape=None, names=("ep",), first=0):
    gpus = _gpus()
    if len(gpus) < first + num_ranks:
        pytest.skip(f"needs {first + num_ranks} GPUs, found {len(gpus)}")
    return Mesh(np.array(gpus[first:first + num_ranks]).reshape(shape or (num_ranks,)), names)


def _buffers(mesh, axis="ep", **kwargs):
    args = dict(num_experts=64, hidden=2048, max_tokens_per_rank=256) | kwargs
    return (jax_ep.Buffer(mesh, axis, backend="cuda", **args),
            jax_ep.Buffer(mesh, axis, backend="reference", **args))


def _normal(buf, mesh, x, idx, w, bias, layout, spec=P("ep")):
    """dispatch -> rows * 0.5 -> combine(bias): (recv_x, combined) as float32 numpy. The
    scale 0.5 is exact in bf16, so XLA's excess precision cannot change the reference's
    input to combine (docs/hardening.md, "Determinism")."""
    def body(x, idx, w, bias):
        out = buf.dispatch(x, idx, w, layout=layout)
        y = (out.recv_x.astype(jnp.float32) * 0.5).astype(x.dtype)
        return out.recv_x, buf.combine(y, out.handle, bias=bias)
    outs = run_sharded(mesh, body, x, idx, w, bias, in_specs=(spec,) * 4, out_specs=(spec,) * 2)
    return [np.asarray(o.astype(jnp.float32)) for o in outs]


def _low_latency(buf, mesh, x, idx, w, spec=P("ep")):
    """low-latency dispatch -> rows * 0.5 (exact, see _normal) -> weighted combine:
    (recv_count, combined)."""
    def body(x, idx, w):
        out = buf.low_latency_dispatch(x, idx)
        y = (out.recv_x.astype(jnp.float32) * 0.5).astype(x.dtype)
        return out.recv_count, buf.low_latency_combine(y, idx, w, out.handle)
    outs = run_sharded(mesh, body, x, idx, w, in_specs=(spec,) * 3, out_specs=(spec,) * 2)
    return [np.asarray(o.astype(jnp.float32)) for o in outs]


def _assert_bitwise(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    differ = np.count_nonzero(got.view(np.uint32) != want.view(np.uint32))
    assert differ == 0, (f"{what}: {differ} of {got.size} elements differ "
                         f"({100 * differ / got.size:.4f} %), largest |difference| "
                         f"{np.max(np.abs(got - want))}")


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_combine_is_bitwise_reproducible_and_equal_to_the_reference(layout, dtype):
    """Normal-mode combine sums in float32 in a fixed order (bias, then ranks ascending;
    expert layout: a rank's slots in slot order first), so its output is bit for bit the
    same in every run and on both backends."""
    mesh = _mesh(4)
    cuda, ref = _buffers(mesh)
    rng = np.random.default_rng(21)
    x, idx, w = inputs(rng, 4, 256, 2048, 64, 8, dtype)
    bias = jnp.asarray(rng.standard_normal(x.shape), dtype)
    want = _normal(ref, mesh, x, idx, w, bias, layout)
    first = _normal(cuda, mesh, x, idx, w, bias, layout)
    for run in range(3):
        got = _normal(cuda, mesh, x, idx, w, bias, layout) if run else first
        _assert_bitwise(got[1], first[1], f"run {run} against run 0")
    _assert_bitwise(first[0], want[0], "recv_x against the reference")
    _assert_bitwise(first[1], want[1], "combine against the reference")
    cuda.check()


def test_low_latency_combine_is_bitwise_reproducible_and_equal_to_the_reference():
    """Low-latency combine: weight * row accumulated in float32 in slot order on the expert's
    rank, the rank partials summed in ascending rank: the same bits every run and on both
    backends."""
    mesh = _mesh(4)
    cuda, ref = _buffers(mesh)
    rng = np.random.default_rng(22)
    x, idx, w = inputs(rng, 4, 128, 2048, 64, 8, jnp.bfloat16)
    want = _low_latency(ref, mesh, x, idx, w)
    first = _low_latency(cuda, mesh, x, idx, w)
    for run in range(1, 3):
        _assert_bitwise(_low_latency(cuda, mesh, x, idx, w)[1], first[1], f"run {run}")
    np.testing.assert_array_equal(first[0], want[0], err_msg="recv_count")
    _assert_bitwise(first[1], want[1], "low-latency combine against the reference")
    cuda.check()


# ------------------------------------------------------------------ a late peer
def test_a_late_peer_is_waited_for():
    """GPU 1 runs its half of a dispatch + combine 3 s after GPU 0 (within timeout_s): GPU 0
    waits for it, and both halves equal the reference's outputs. Each GPU runs its shard as
    a program of its own (the Buffer's backend called directly, as a broken caller would),
    so that one can start late."""
    gpus = _gpus()
    if len(gpus) < 2:
        pytest.skip("needs 2 GPUs")
    mesh = Mesh(np.array(gpus[:2]), ("ep",))
    cuda, ref = _buffers(mesh, timeout_s=60.0)
    rng = np.random.default_rng(23)
    x, idx, w = inputs(rng, 2, 64, 2048, 64, 4, jnp.bfloat16)
    want = _normal(ref, mesh, x, idx, w, jnp.zeros_like(x), "rank")

    def half(rank, delay, results):
        def body(x, idx, w):
            out = cuda._backend.dispatch(x, None, idx, w, 128, False)
            y = (out[0].astype(jnp.float32) * 0.5).astype(x.dtype)
            return out[0], cuda._backend.combine(y, out[7], None, False)
        one = Mesh(np.array([gpus[rank]]), ("ep",))
        rows = slice(rank * 64, (rank + 1) * 64)
        args = [jax.device_put(np.asarray(a)[rows], gpus[rank]) for a in (x, idx, w)]
        fn = jax.jit(jax.shard_map(body, mesh=one, in_specs=(P("ep"),) * 3,
                                   out_specs=(P("ep"),) * 2)).lower(*args).compile()
        time.sleep(delay)
        results[rank] = [np.asarray(o.astype(jnp.float32)) for o in fn(*args)]

    results = {}
    threads = [threading.Thread(target=half, args=(r, 3.0 * r, results)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cuda.check()
    for rank in range(2):
        np.testing.assert_array_equal(results[rank][0], want[0][rank * 128:(rank + 1) * 128])
        np.testing.assert_array_equal(results[rank][1], want[1][rank * 64:(rank + 1) * 64])


# ------------------------------------------------------------------ lifecycle
def test_several_buffers_on_different_meshes_and_axes_live_together():
    """Buffers over 4 GPUs, over 2 GPUs, and over each axis of a (2, 2) mesh, used in turn,
    normal and low-latency: each equals the reference. Closing one does not disturb the
    others; a Buffer made again after close, and everything after jax.clear_caches(), still
    equals the reference."""
    rng = np.random.default_rng(24)
    four, pair = _mesh(4), _mesh(2)
    square = _mesh(4, (2, 2), ("dp", "ep"))
    made = {"four": (four, _buffers(four), P("ep")),
            "pair": (pair, _buffers(pair), P("ep")),
            "square ep": (square, _buffers(square, "ep"), P(("dp", "ep"))),
            "square dp": (square, _buffers(square, "dp"), P(("ep", "dp")))}

    def check(name):
        mesh, (cuda, ref), spec = made[name]
        ranks = mesh.devices.size
        x, idx, w = inputs(rng, ranks, 64, 2048, 64, 4, jnp.bfloat16)
        bias = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
        for layout in ("rank", "expert"):
            for g, v in zip(_normal(cuda, mesh, x, idx, w, bias, layout, spec),
                            _normal(ref, mesh, x, idx, w, bias, layout, spec)):
                _assert_bitwise(g, v, f"{name}, {layout} layout")
        got, want = (_low_latency(b, mesh, x, idx, w, spec) for b in (cuda, ref))
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{name}: recv_count")
        np.testing.assert_allclose(got[1], want[1], rtol=2 ** -7, atol=1e-2, err_msg=name)
        cuda.check()

    for name in made:
        check(name)
    made["pair"][1][0].close()
    for name in ("four", "square ep", "square dp"):
        check(name)
    made["pair"] = (pair, _buffers(pair), P("ep"))
    jax.clear_caches()
    for name in made:
        check(name)
    for _, (cuda, _), _ in made.values():
        cuda.close()


def _gpu_memory_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(v) for v in out.split()]


def test_making_and_closing_buffers_does_not_leak_gpu_memory():
    """30 Buffers of about 1.8 GiB per GPU, each used once and closed: GPU memory after them
    is within 1 GiB of the memory after the first (a leak would hold 50 GiB)."""
    mesh = _mesh(4)
    rng = np.random.default_rng(25)
    x, idx, w = inputs(rng, 4, 64, 7168, 256, 8, jnp.bfloat16)
    size = jax_ep.region_bytes(4, num_experts=256, hidden=7168, max_tokens_per_rank=4096)
    assert size > 1 << 30, size
    before = None
    for i in range(30):
        buf = jax_ep.Buffer(mesh, "ep", num_experts=256, hidden=7168, backend="cuda",
                            max_tokens_per_rank=4096)
        _normal(buf, mesh, x, idx, w, jnp.zeros_like(x), "rank")
        buf.close()
        if i == 0:
            before = _gpu_memory_used_mib()
    after = _gpu_memory_used_mib()
    grown = [a - b for a, b in zip(after, before)]
    print(f"region {size / 2**30:.2f} GiB per GPU; GPU memory used before {before} MiB, after "
          f"{after} MiB")
    assert max(grown) < 1024, f"GPU memory grew by {grown} MiB over 29 Buffers"


def test_a_process_exits_cleanly_without_closing_its_buffers():
    """A program that makes Buffers, runs them and ends without close() exits with code 0
    in seconds (the Buffers are released at exit)."""
    if len(_gpus()) < 2:
        pytest.skip("needs 2 GPUs")
    program = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        import jax_ep
        mesh = Mesh(np.array(jax.devices()[:2]), ("ep",))
        bufs = [jax_ep.Buffer(mesh, "ep", num_experts=8, hidden=1024, backend="cuda",
                              max_tokens_per_rank=32) for _ in range(3)]
        x = jnp.ones((64, 1024), jnp.bfloat16)
        idx = jnp.asarray(np.arange(128, dtype=np.int32).reshape(64, 2) % 8)
        for buf in bufs:
            f = jax.jit(jax.shard_map(lambda x, i: buf.dispatch(x, i, jnp.ones(i.shape)).recv_x,
                                      mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep")))
            f(x, idx).block_until_ready()
        print("ran")
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=240, cwd=Path(__file__).parent)
    assert done.returncode == 0 and "ran" in done.stdout, done.stdout + done.stderr
    print(f"exited in {time.monotonic() - start:.1f} s")
