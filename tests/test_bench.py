"""The dispatch/combine benchmark (`python -m jax_ep.bench`): its network-leg accounting, and a
smoke run on 8 CPU devices (tiny shapes; its timings mean nothing)."""

import os
import subprocess
import sys

import numpy as np

from jax_ep.bench import node_pairs_per_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_node_pairs_count_each_token_once_per_node_it_reaches():
    # 2 GPUs x 2 tokens, 4 ranks in 2 nodes of 2: token rows [R * T, R].
    in_rank = np.array([[1, 1, 0, 0],   # GPU 0: node 0 only (two of its ranks): 1 pair
                        [1, 0, 1, 0],   # GPU 0: nodes 0 and 1: 2 pairs
                        [0, 0, 0, 0],   # GPU 1: nowhere: 0
                        [0, 0, 1, 1]],  # GPU 1: node 1: 1 pair
                       dtype=bool)
    assert node_pairs_per_gpu(in_rank, tokens_per_rank=2, ranks_per_node=2) == 2.0
    # Nodes of one GPU: a pair per (token, rank).
    assert node_pairs_per_gpu(in_rank, tokens_per_rank=2, ranks_per_node=1) == 3.0


def test_benchmark_runs_on_cpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "jax_ep.bench"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "8 x cpu" in proc.stdout
    assert "reference (all_to_all)" in proc.stdout and "all_to_all only" in proc.stdout
