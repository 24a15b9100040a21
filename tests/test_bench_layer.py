"""Smoke test of the MoE layer benchmark (`python -m jax_ep.bench layer`) on 8 CPU devices at
tiny shapes: every implementation that runs on CPU, the breakdown, the grouped-matmul table,
the small-shape check against the reference, the PNG and the JSON.

It runs in a subprocess forced onto CPU (so on a GPU machine it stays tiny) with XLA's CPU
optimizations off: the timings are meaningless, and compiling the layers' loops is ~5x faster
(about 20 s instead of 100 s on 2 cores)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _run(args, fast):
    flags = "--xla_force_host_platform_device_count=8" + (" " + FAST_COMPILE if fast else "")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    return subprocess.run([sys.executable, "-m", "jax_ep.bench", "layer", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_layer_benchmark_runs_on_cpu(tmp_path):
    png, js = tmp_path / "layer.png", tmp_path / "layer.json"
    args = ["--tokens", "16", "--hidden", "128", "--experts", "16", "--ffn", "128", "--topk", "2",
            "--shared-ffn", "128", "--iters", "1", "--min-time", "0", "--strict",
            "--plot", str(png), "--json", str(js)]
    proc = _run(args, fast=True)
    if proc.returncode != 0 and "nknown flag" in proc.stderr:  # an XLA without these flags
        proc = _run(args, fast=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "jax_ep.bench layer" in out and "8 x cpu" in out
    assert "whole / sum of parts" in out and "grouped matmul alone" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"

    data = json.loads(js.read_text())
    assert data["meta"]["device_count"] == 8 and not data["meta"]["errors"]
    assert all(c["ok"] for c in data["meta"]["check"].values())
    (res,) = data["results"]
    impls = res["impls"]
    for impl in ("jax_ep", "reference", "capacity"):
        assert impls[impl]["time_s"] > 0, impl
        assert impls[impl]["tokens_per_s_per_gpu"] > 0, impl
    assert "skipped" in impls["ragged_a2a"]  # no ragged_all_to_all on XLA:CPU
    assert impls["jax_ep"]["dropped"] == 0 and impls["reference"]["dropped"] == 0
    assert 0 < impls["capacity"]["drop_rate"] < 1
    for impl in ("jax_ep", "reference"):
        parts = res["breakdown"][impl]["parts"]
        assert len(parts) == 5 and all(p["time_s"] > 0 for p in parts.values())
        assert res["breakdown"][impl]["sum_of_parts_s"] > 0
    for entry in res["gmm"]["shapes"].values():
        assert entry["gmm[auto] fwd+bwd"]["tflops"] > 0 and entry["einsum fwd"]["tflops"] > 0
