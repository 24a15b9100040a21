"""The low-latency ops of an internode Buffer on CPU: they lower to jax_ep._nvshmem's
low-latency targets (fused and hooked, with the intranode targets' operands and attributes),
mask=True included, and the Buffer's low-latency cap reaches the group it creates. The kernels
themselves run in tests/test_gpu_internode_low_latency.py."""

import types
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import cpu_mesh
from jax_ep import cuda_backend
from jax_ep.cuda_backend import CudaBackend
from jax_ep.types import EPConfig

# jax_ep._nvshmem's low-latency target names (ffi/nvshmem_module.cc).
INTERNODE_LL_TARGETS = types.SimpleNamespace(
    TARGET_LOW_LATENCY_DISPATCH="jax_ep_internode_low_latency_dispatch",
    TARGET_LOW_LATENCY_DISPATCH_SEND="jax_ep_internode_low_latency_dispatch_send",
    TARGET_LOW_LATENCY_DISPATCH_RECV="jax_ep_internode_low_latency_dispatch_recv",
    TARGET_LOW_LATENCY_COMBINE="jax_ep_internode_low_latency_combine",
    TARGET_LOW_LATENCY_COMBINE_SEND="jax_ep_internode_low_latency_combine_send",
    TARGET_LOW_LATENCY_COMBINE_RECV="jax_ep_internode_low_latency_combine_recv")

R, T, H, E, K = 4, 16, 256, 32, 4


def _backend():
    """An internode Buffer's backend: 4 ranks in 2 nodes of 2."""
    return CudaBackend(EPConfig("ep", R, E, H, 2, T, 24), buffer_id=7,
                       internode=INTERNODE_LL_TARGETS)


def _lower_for_cuda(fn):
    mesh = cpu_mesh((R,), ("ep",))
    args = (jax.ShapeDtypeStruct((R * T, H), jnp.bfloat16),
            jax.ShapeDtypeStruct((R * T, K), jnp.int32),
            jax.ShapeDtypeStruct((R * T, K), jnp.float32))
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
    return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("fp8", [False, True])
def test_internode_low_latency_ops_lower_to_the_nvshmem_targets(fp8):
    backend = _backend()

    def body(x, idx, w):
        recv_x, _, _, handle = backend.low_latency_dispatch(x, idx, T, fp8, fp8, False)
        fused = backend.low_latency_combine(recv_x.astype(jnp.bfloat16), idx, w, handle, False)
        recv_x, _, _, handle = backend.low_latency_dispatch_recv(
            backend.low_latency_dispatch_send(x, idx, T, fp8, False, False))
        pending = backend.low_latency_combine_send(recv_x.astype(jnp.bfloat16), idx, w, handle, False)
        return fused + backend.low_latency_combine_recv(pending)

    text = _lower_for_cuda(body)
    for target in vars(INTERNODE_LL_TARGETS).values():
        assert f"@{target}(" in text, target
    assert "@jax_ep_low_latency_" not in text  # never the one-host targets
    recv_type = "f8E4M3FN" if fp8 else "bf16"
    assert f"tensor<{E // R}x{R * T}x{H}x{recv_type}>" in text
    assert "mask = false" in text and "round_scale" in text


@pytest.mark.parametrize("op", ["dispatch", "dispatch_send", "combine", "combine_send"])
def test_internode_low_latency_mask_reaches_the_targets(op):
    """mask=True lowers to the internode targets with mask = true (the kernels mask a rank
    that does not answer in time); a hooked op's receive gets its send's mask."""
    backend = _backend()

    def body(x, idx, w):
        if op.startswith("dispatch"):
            if op == "dispatch":
                return backend.low_latency_dispatch(x, idx, T, False, False, True)[0]
            return backend.low_latency_dispatch_recv(
                backend.low_latency_dispatch_send(x, idx, T, False, False, True))[0]
        handle = backend.low_latency_dispatch(x, idx, T, False, False, False)[3]
        y = jnp.zeros((E // R, R * T, H), jnp.bfloat16)
        if op == "combine":
            return backend.low_latency_combine(y, idx, w, handle, True)
        return backend.low_latency_combine_recv(backend.low_latency_combine_send(y, idx, w, handle, True))

    text = _lower_for_cuda(body)
    calls = [line for line in text.splitlines() if "@jax_ep_internode_low_latency_" in line]
    masked = [line for line in calls if "mask = true" in line]
    if op.startswith("dispatch"):
        assert len(calls) == len(masked) == (1 if op == "dispatch" else 2), calls
    else:  # the dispatch that makes the handle has mask=False
        assert len(calls) == (2 if op == "combine" else 3) and len(masked) == len(calls) - 1, calls
        assert "mask = false" in calls[0], calls[0]


def test_masked_ranks_of_an_internode_buffer_come_from_the_nvshmem_module():
    """Buffer.masked_ranks() reads jax_ep._nvshmem's record on an internode Buffer (the same
    tuples as jax_ep._cuda's), and nothing once the Buffer is closed."""
    targets = types.SimpleNamespace(
        masked_ranks=lambda buffer_id: [[1, 3, "internode low-latency dispatch", buffer_id]])
    backend = CudaBackend(EPConfig("ep", R, E, H, 2, T, 24), buffer_id=7, internode=targets)
    assert backend.masked_ranks() == [(1, 3, "internode low-latency dispatch", 7)]
    backend._closed = True
    assert backend.masked_ranks() == []


@pytest.mark.parametrize("cap, expected", [(None, T), (8, 8), (0, 0)])
@pytest.mark.parametrize("num_ranks_per_node", [2, R], ids=["internode", "one-host"])
def test_create_passes_the_low_latency_cap(monkeypatch, num_ranks_per_node, cap, expected):
    """CudaBackend.create with one process per GPU: an internode Buffer's group gets the
    low-latency cap with its sizes (internode.connect); a one-host Buffer's staging does not
    depend on it (create_local's sizes lack it), but its processes compare it."""
    Device = namedtuple("Device", "id process_index local_hardware_id")
    devices = np.empty(R, dtype=object)
    devices[:] = [Device(id=p, process_index=p, local_hardware_id=0) for p in range(R)]
    mesh = types.SimpleNamespace(axis_names=("ep",), devices=devices)
    calls = []
    monkeypatch.setattr(cuda_backend, "register_targets", lambda: None)
    monkeypatch.setattr(cuda_backend, "_internode_module", lambda: INTERNODE_LL_TARGETS)
    monkeypatch.setattr(cuda_backend.internode, "connect",
                        lambda *args: calls.append(("connect", args[7])))
    monkeypatch.setattr(cuda_backend.bootstrap, "connect_processes",
                        lambda *args, **kwargs: calls.append(("connect_processes", args[6],
                                                              kwargs)) or [])
    config = EPConfig("ep", R, E, H, num_ranks_per_node, T, 24,
                      low_latency_max_tokens_per_rank=cap)
    CudaBackend.create(mesh, config, 30.0, buffer_id=7)
    sizes = dict(max_tokens=T, hidden=H, max_topk=cuda_backend.MAX_TOPK, num_experts=E,
                 timeout_s=30.0)
    if num_ranks_per_node < R:
        assert calls == [("connect", dict(sizes, low_latency_max_tokens=expected))]
    else:
        assert calls == [("connect_processes", sizes, dict(low_latency_max_tokens=expected))]
