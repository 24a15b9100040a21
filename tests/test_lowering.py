"""The CUDA backend's custom calls lower for the "cuda" platform on this CPU machine, so
CI checks the GPU path's primitives, shapes and attributes without a GPU."""

import re
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from conftest import cpu_mesh
from jax_ep import buffer, cuda_backend
from jax_ep.cuda_backend import CudaBackend
from jax_ep.types import EPConfig

# The FFI target names of docs/design.md's contract. Without the built extension (a source
# checkout on CPU), the backend reads them from this stand-in; with it, they must agree.
TARGETS = types.SimpleNamespace(
    TARGET_GET_DISPATCH_LAYOUT="jax_ep_get_dispatch_layout", TARGET_DISPATCH="jax_ep_dispatch",
    TARGET_COMBINE="jax_ep_combine", TARGET_CACHED_DISPATCH="jax_ep_cached_dispatch",
    TARGET_LOW_LATENCY_DISPATCH="jax_ep_low_latency_dispatch",
    TARGET_LOW_LATENCY_DISPATCH_SEND="jax_ep_low_latency_dispatch_send",
    TARGET_LOW_LATENCY_DISPATCH_RECV="jax_ep_low_latency_dispatch_recv",
    TARGET_LOW_LATENCY_COMBINE="jax_ep_low_latency_combine",
    TARGET_LOW_LATENCY_COMBINE_SEND="jax_ep_low_latency_combine_send",
    TARGET_LOW_LATENCY_COMBINE_RECV="jax_ep_low_latency_combine_recv")

R, T, H, E, K = 4, 16, 256, 32, 4


def _lower_for_cuda(fn, *args):
    mesh = cpu_mesh((R,), ("ep",))
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * len(args), out_specs=P("ep")))
    return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture(scope="module")
def backend():
    if cuda_backend._cuda is None:
        cuda_backend._cuda = TARGETS
        yield CudaBackend(EPConfig("ep", R, E, H, R, T, 24), buffer_id=7)
        cuda_backend._cuda = None
    else:
        for name, value in vars(TARGETS).items():
            assert getattr(cuda_backend._cuda, name) == value, name
        yield CudaBackend(EPConfig("ep", R, E, H, R, T, 24), buffer_id=7)


def _operands():
    x = jax.ShapeDtypeStruct((R * T, H), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((R * T, K), jnp.int32)
    w = jax.ShapeDtypeStruct((R * T, K), jnp.float32)
    return x, idx, w


@pytest.mark.parametrize("expert_layout", [False, True])
def test_dispatch_and_combine_lower_to_jax_ep_custom_calls(backend, expert_layout):
    def body(x, idx, w):
        out = buffer._dispatch(backend, 100, expert_layout, x, idx, w)
        return buffer._combine(backend, expert_layout, out[0], out[7], None)

    text = _lower_for_cuda(body, *_operands())
    assert "jax_ep_dispatch" in text and "jax_ep_combine" in text
    assert "has_side_effect = true" in text
    assert "buffer_id = 7" in text and "capacity = 100" in text


def test_gradient_lowers_to_combine_and_cached_dispatch(backend):
    def body(x, idx, w):
        def loss(x):
            out = buffer._dispatch(backend, 64, False, x, idx, w)
            return buffer._combine(backend, False, out[0] * 2, out[7], None).astype(
                jnp.float32).sum()
        return jax.grad(loss)(x)

    text = _lower_for_cuda(body, *_operands())
    assert text.count("jax_ep_dispatch") >= 1
    assert "jax_ep_cached_dispatch" in text and "jax_ep_combine" in text


def test_layout_lowers_with_per_shard_shapes(backend):
    text = _lower_for_cuda(lambda idx: backend.get_dispatch_layout(idx)[3],
                           jax.ShapeDtypeStruct((R * T, K), jnp.int32))
    assert "jax_ep_get_dispatch_layout" in text
    assert f"tensor<{T}x{R}xi1>" in text


def test_fp8_dispatch_lowers_with_scales(backend):
    def body(q, s, idx, w):
        return backend.dispatch(q, s, idx, w, 50, False)[1]

    text = _lower_for_cuda(body, jax.ShapeDtypeStruct((R * T, H), jnp.float8_e4m3fn),
                           jax.ShapeDtypeStruct((R * T, H // 128), jnp.float32),
                           *_operands()[1:])
    assert "f8E4M3FN" in text and f"tensor<50x{H // 128}xf32>" in text


def test_topk_beyond_the_cuda_buffers_is_a_python_error(backend):
    def body(x, idx, w):
        return backend.dispatch(x, None, idx, w, 50, False)[0]

    with pytest.raises(ValueError, match="top-k = 17 exceeds the 16 slots"):
        _lower_for_cuda(body, jax.ShapeDtypeStruct((R * T, H), jnp.bfloat16),
                        jax.ShapeDtypeStruct((R * T, 17), jnp.int32),
                        jax.ShapeDtypeStruct((R * T, 17), jnp.float32))


@pytest.mark.parametrize("fp8", [False, True])
def test_low_latency_ops_lower_fused_and_hooked(backend, fp8):
    def body(x, idx, w):
        recv_x, _, _, handle = backend.low_latency_dispatch(x, idx, T, fp8, fp8, False)
        y = recv_x.astype(jnp.bfloat16)
        fused = backend.low_latency_combine(y, idx, w, handle, False)
        pending = backend.low_latency_dispatch_send(x, idx, T, fp8, False, True)
        recv_x, _, _, handle = backend.low_latency_dispatch_recv(pending)
        pending = backend.low_latency_combine_send(recv_x.astype(jnp.bfloat16), idx, w, handle, True)
        return fused + backend.low_latency_combine_recv(pending)

    text = _lower_for_cuda(body, *_operands())
    for target in ("jax_ep_low_latency_dispatch", "jax_ep_low_latency_dispatch_send",
                   "jax_ep_low_latency_dispatch_recv", "jax_ep_low_latency_combine",
                   "jax_ep_low_latency_combine_send", "jax_ep_low_latency_combine_recv"):
        assert f"@{target}(" in text, target
    recv_type = "f8E4M3FN" if fp8 else "bf16"
    assert f"tensor<{E // R}x{R * T}x{H}x{recv_type}>" in text
    assert "mask = true" in text and "round_scale" in text


def test_low_latency_ops_run_on_their_own_sm_count(backend):
    """Low-latency custom calls carry low_latency_num_sms (default 96 here: no GPU to cap it),
    normal-mode ones num_sms."""
    def body(x, idx, w, backend):
        recv_x, _, _, handle = backend.low_latency_dispatch(x, idx, T, False, False, False)
        pending = backend.low_latency_combine_send(recv_x, idx, w, handle, False)
        out = backend.dispatch(x, None, idx, w, 50, False)
        return backend.low_latency_combine_recv(pending) + out[0][:T]

    assert backend.low_latency_num_sms == cuda_backend.DEFAULT_LOW_LATENCY_NUM_SMS == 96
    chosen = CudaBackend(EPConfig("ep", R, E, H, R, T, 24, 20), buffer_id=9)
    for b, ll_sms in ((backend, 96), (chosen, 20)):
        text = _lower_for_cuda(lambda x, idx, w, b=b: body(x, idx, w, b), *_operands())
        calls = re.findall(r"@(jax_ep_\w+)\(.*?num_sms = (\d+)", text)
        assert {name for name, _ in calls} >= {"jax_ep_dispatch", "jax_ep_low_latency_dispatch",
                                               "jax_ep_low_latency_combine_send",
                                               "jax_ep_low_latency_combine_recv"}, calls
        for name, sms in calls:
            assert int(sms) == (ll_sms if "low_latency" in name else 24), (name, sms)


def test_hooked_receives_keep_the_sends_inputs_alive(backend):
    """A hooked send reads its inputs on a stream of its own while XLA goes on: its receive
    takes them as operands, so XLA cannot reuse their memory before the receive."""
    def body(x, idx, w):
        pending = backend.low_latency_dispatch_send(x, idx, T, False, False, False)
        recv_x, _, _, handle = backend.low_latency_dispatch_recv(pending)
        pending = backend.low_latency_combine_send(recv_x, idx, w, handle, False)
        return backend.low_latency_combine_recv(pending)

    text = _lower_for_cuda(body, *_operands())

    def operands(target):
        (args,) = re.findall(rf"@{target}\(([^)]*)\)", text)
        return [a.strip() for a in args.split(",")]

    dispatch_send, dispatch_recv = operands("jax_ep_low_latency_dispatch_send"), operands(
        "jax_ep_low_latency_dispatch_recv")
    assert dispatch_recv[1:] == dispatch_send  # pending, then x and topk_idx
    combine_send, combine_recv = operands("jax_ep_low_latency_combine_send"), operands(
        "jax_ep_low_latency_combine_recv")
    assert combine_recv[2:] == combine_send  # pending, topk_idx, then x, weights, row_of_slot


def test_low_latency_gradient_lowers_to_kernels_forward(backend):
    def body(x, idx, w):
        def loss(x, w):
            out = buffer._low_latency_dispatch(backend, T, False, x, idx)
            y = buffer._low_latency_combine(backend, False, out[0], idx, w, out[3])
            return y.astype(jnp.float32).sum()
        return jax.grad(loss)(x, w)

    text = _lower_for_cuda(body, *_operands())
    assert "@jax_ep_low_latency_dispatch(" in text and "@jax_ep_low_latency_combine(" in text


def test_low_latency_dispatch_refuses_more_tokens_than_shared_memory_holds(backend):
    # A bit per (expert, token) in shared memory: 1024 experts x 2048 tokens need 256 KiB.
    big = CudaBackend(EPConfig("ep", R, 1024, H, R, 2048, 24), buffer_id=8)
    x = jax.ShapeDtypeStruct((R * 2048, H), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((R * 2048, K), jnp.int32)
    for op in (big.low_latency_dispatch, big.low_latency_dispatch_send):
        with pytest.raises(ValueError, match="pass fewer tokens per call"):
            _lower_for_cuda(lambda x, idx: op(x, idx, 2048, False, False, False)[0], x, idx)
    big._check_low_latency_tokens(1024, K)  # 128 KiB + positions: fits


# The internode module's targets (jax_ep._nvshmem) that the hooked normal mode calls.
INTERNODE_TARGETS = types.SimpleNamespace(
    TARGET_DISPATCH_SEND="jax_ep_internode_dispatch_send",
    TARGET_DISPATCH_RECV="jax_ep_internode_dispatch_recv",
    TARGET_COMBINE_SEND="jax_ep_internode_combine_send",
    TARGET_COMBINE_RECV="jax_ep_internode_combine_recv")


@pytest.mark.parametrize("expert_layout", [False, True])
def test_hooked_normal_ops_lower_to_the_internode_halves(expert_layout):
    """An internode Buffer's dispatch_send / dispatch_recv / combine_send / combine_recv are
    one custom call each; the receive depends on its send through `pending` (int32 [2]) and
    dispatch_recv gets send_pos from the send. A one-host Buffer's halves are the fused ops."""
    internode = CudaBackend(EPConfig("ep", R, E, H, 2, T, 24), buffer_id=7,
                            internode=INTERNODE_TARGETS)

    def body(x, idx, w):
        pending = internode.dispatch_send(x, None, idx, w, 100, expert_layout)
        out = internode.dispatch_recv(pending)
        pending = internode.combine_send(out[0], out[7], None, expert_layout)
        return internode.combine_recv(pending)

    text = _lower_for_cuda(body, *_operands())
    for name in vars(INTERNODE_TARGETS).values():
        assert f"@{name}(" in text, name
    (send,) = re.findall(r"(%\S+):2 = stablehlo.custom_call @jax_ep_internode_dispatch_send", text)
    (recv_args,) = re.findall(r"@jax_ep_internode_dispatch_recv\(([^)]*)\)", text)
    assert [a.strip() for a in recv_args.split(",")] == [f"{send}#0", f"{send}#1"]
    assert f"tensor<100x{H}xbf16>" in text and "capacity = 100" in text

    one_host = CudaBackend(EPConfig("ep", R, E, H, R, T, 24), buffer_id=8)

    def fused(x, idx, w):  # one host: the send half is the fused dispatch, the receive nothing
        pending = one_host.dispatch_send(x, None, idx, w, 100, expert_layout)
        out = one_host.dispatch_recv(pending)
        return one_host.combine_recv(one_host.combine_send(out[0], out[7], None, expert_layout))

    text = _lower_for_cuda(fused, *_operands())
    assert "@jax_ep_dispatch(" in text and "@jax_ep_combine(" in text
    assert "internode" not in text
