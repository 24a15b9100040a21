"""The low-latency (decode) benchmark (`python -m jax_ep.bench decode`) on 8 CPU devices: a
smoke test of the whole run at tiny shapes (the reference and jax.lax rows, the hook overlap,
the decode step, the JSON), and its jax.lax baseline checked against the reference backend.

The smoke test runs in a subprocess forced onto CPU (so on a GPU machine it stays tiny) with
XLA's CPU optimizations off, as tests/test_bench_layer.py: the timings are meaningless."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import cpu_mesh, run_sharded
from helpers import inputs
from jax_ep.bench_decode import lax_low_latency

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _run(args, fast):
    flags = "--xla_force_host_platform_device_count=8" + (" " + FAST_COMPILE if fast else "")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    return subprocess.run([sys.executable, "-m", "jax_ep.bench", "decode", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_decode_benchmark_runs_on_cpu(tmp_path):
    js = tmp_path / "decode.json"
    args = ["--tokens", "8", "--hidden", "256", "--experts", "16", "--topk", "4", "--iters", "1",
            "--layers", "2", "--expert-ffn", "128", "--json", str(js)]
    proc = _run(args, fast=True)
    if proc.returncode != 0 and "nknown flag" in proc.stderr:  # an XLA without these flags
        proc = _run(args, fast=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "jax_ep.bench decode" in out and "8 x cpu" in out
    for title in ("1. latency", "2. hook overlap", "3. decode step"):
        assert title in out, out
    assert "reference (all_gather)" in out and "jax.lax all_to_all (C=" in out
    assert "jax_ep cuda" not in out  # no GPU: no CUDA rows

    data = json.loads(js.read_text())
    assert data["meta"]["device_count"] == 8 and not data["meta"]["errors"]
    assert [r["impl"].split(" (")[0] for r in data["latency"]] == ["reference",
                                                                  "jax.lax all_to_all"]
    for row in data["latency"]:
        for op in ("dispatch", "fp8 dispatch", "combine", "round trip"):
            assert math.isfinite(row[op]), (row["impl"], op)
    overlap = data["overlap"]
    assert overlap["ffn"] % 128 == 0 and 128 <= overlap["ffn"] <= 16 * 256
    (row,) = overlap["rows"]
    for key in ("dispatch_s", "fused_then_matmul_s", "hooked_s"):
        assert math.isfinite(row[key]), key
    (row,) = data["decode"]
    assert row["impl"].startswith("reference") and row["off_s"] > 0 and "on_s" not in row


@pytest.mark.parametrize("fp8", [False, True])
def test_lax_baseline_matches_reference(fp8):
    """Rows, counts and the combine of the jax.lax all_to_all baseline equal the reference
    backend's (the baseline's rows per expert are R * C instead of R * M; rows past
    recv_count are compared as zero: both zero them)."""
    num_ranks, tokens, hidden, experts, topk = 8, 8, 256, 16, 4
    mesh = cpu_mesh((num_ranks,), ("ep",))
    rng = np.random.default_rng(3)
    x, idx, w = inputs(rng, num_ranks, tokens, hidden, experts, topk, jnp.bfloat16)
    ref = jax_ep.Buffer(mesh, "ep", num_experts=experts, hidden=hidden, backend="reference",
                        max_tokens_per_rank=tokens)
    dest = np.where(np.asarray(idx) >= 0, np.asarray(idx) // (experts // num_ranks), -1)
    sent = (dest.reshape(num_ranks, tokens, topk)[:, :, :, None] == np.arange(num_ranks)).any(2)
    capacity = int(sent.sum(1).max())  # the most tokens one rank sends another: no drops
    assert capacity < tokens  # so the layouts differ ([L, R * C, H] against [L, R * M, H])
    dispatch, combine = lax_low_latency("ep", num_ranks, experts, capacity)

    def rows_of(recv_x):
        if fp8:
            return jax_ep.dequantize_fp8(*recv_x, jnp.float32)
        return recv_x.astype(jnp.float32)

    def baseline(x, i, w):
        recv_x, count, aux = dispatch(x, i, w, fp8)
        y = (rows_of(recv_x) * 1.5).astype(jnp.bfloat16)
        return rows_of(recv_x), count, combine(y, aux).astype(jnp.float32)

    def reference(x, i, w):
        out = ref.low_latency_dispatch(x, i, fp8=fp8)
        rows = (jax_ep.dequantize_fp8(out.recv_x, out.recv_scales, jnp.float32) if fp8
                else out.recv_x.astype(jnp.float32))
        y = (rows * 1.5).astype(jnp.bfloat16)
        combined = ref.low_latency_combine(y, i, w, out.handle)
        return rows, out.recv_count, combined.astype(jnp.float32)

    got = [np.asarray(a) for a in run_sharded(mesh, baseline, x, idx, w, out_specs=(P("ep"),) * 3)]
    want = [np.asarray(a) for a in run_sharded(mesh, reference, x, idx, w,
                                               out_specs=(P("ep"),) * 3)]
    rows_per_expert = num_ranks * capacity
    np.testing.assert_array_equal(got[1], want[1])
    assert not np.any(want[0][:, rows_per_expert:])  # all past the counts
    np.testing.assert_array_equal(got[0], want[0][:, :rows_per_expert])
    np.testing.assert_array_equal(got[2], want[2])
