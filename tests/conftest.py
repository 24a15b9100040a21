"""Test setup: 8 virtual CPU devices for the CPU suite; `-m gpu` tests need local GPUs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
# Grow GPU memory on demand instead of taking 75% of every GPU at start: the worker
# processes of test_gpu_multiprocess.py need it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs local NVIDIA GPUs and the CUDA extension")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs NVIDIA GPUs")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


def cpu_mesh(shape, names):
    count = int(np.prod(shape))
    return Mesh(np.array(jax.devices("cpu")[:count]).reshape(shape), names)


def run_sharded(mesh, fn, *args, in_specs=None, out_specs=P("ep")):
    """jit(shard_map(fn)) with every argument's leading axis split over the mesh."""
    in_specs = in_specs or (P("ep"),) * len(args)
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs)]
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs))(*args)
