"""grouped_matmul: the contract (CPU, XLA path) and the Mosaic GPU kernels (marked gpu)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep import mosaic_kernels


def oracle(x, w, group_sizes):
    """NumPy float64: rows of group g times w[g]; rows past the groups are zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out


def random_case(rng, m, k, n, g, used, dtype):
    cuts = np.sort(rng.integers(0, used + 1, g - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [used]])).astype(np.int32)
    sizes[rng.integers(0, g)] = 0  # an empty group
    sizes[-1] += used - sizes.sum()
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[used:] = rng.standard_normal((m - used, k))  # the unused tail holds data, not zeros
    w = (rng.standard_normal((g, k, n)) / np.sqrt(k)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(sizes)


def test_work_list_covers_every_row_once():
    rng = np.random.default_rng(0)
    for block in (64, 128):
        sizes = jnp.asarray(rng.integers(0, 300, 7).astype(np.int32))
        m = int(sizes.sum()) + 200
        items = np.asarray(mosaic_kernels.work_list(sizes, m, block))
        owner = np.full(m, -9)
        for group, blk, lo, hi in items.T:
            if group == mosaic_kernels.SKIP:
                continue
            rows = np.arange(blk * block + lo, blk * block + hi)
            assert (owner[rows] == -9).all(), "a row is stored twice"
            owner[rows] = group
        expected = np.repeat(np.arange(7), np.asarray(sizes))
        np.testing.assert_array_equal(owner[:len(expected)], expected)
        assert (owner[len(expected):] == mosaic_kernels.ZERO_FILL).all()


def test_xla_path_matches_oracle_and_zero_tail():
    rng = np.random.default_rng(1)
    x, w, sizes = random_case(rng, 96, 32, 48, 5, 70, jnp.float32)
    out = jax.jit(lambda *a: jax_ep.grouped_matmul(*a, impl="xla"))(x, w, sizes)
    np.testing.assert_allclose(np.asarray(out), oracle(x, w, sizes), rtol=1e-5, atol=1e-5)
    assert not np.asarray(out[70:]).any()


def test_gradients_match_ragged_dot():
    rng = np.random.default_rng(2)
    x, w, sizes = random_case(rng, 64, 16, 24, 4, 50, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)
    loss = lambda f: lambda x, w: (f(x, w) * ct).sum()  # noqa: E731
    ours = jax.grad(loss(lambda x, w: jax_ep.grouped_matmul(x, w, sizes)), (0, 1))(x, w)
    ref = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_clear_error():
    x, w, sizes = jnp.zeros((8, 4)), jnp.zeros((2, 4, 6)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="columns"):
        jax_ep.grouped_matmul(x[:, :3], w, sizes)
    with pytest.raises(TypeError, match="cast"):
        jax_ep.grouped_matmul(x.astype(jnp.bfloat16), w, sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        jax_ep.grouped_matmul(x, w, sizes[:1])
    with pytest.raises(ValueError, match="impl"):
        jax_ep.grouped_matmul(x, w, sizes, impl="cutlass")


def test_mosaic_kernel_lowers_for_cuda_on_cpu():
    """The Mosaic GPU kernels trace and lower without a GPU (catches API drift in CI)."""
    for transpose_w in (False, True):
        x = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((3, 256, 256), jnp.bfloat16)
        sizes = jax.ShapeDtypeStruct((3,), jnp.int32)
        fn = jax.jit(lambda x, w, s: mosaic_kernels.gmm(x, w, s, transpose_w=transpose_w))
        text = fn.trace(x, w, sizes).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


# ---------------------------------------------------------------- GPU (Hopper) kernels
@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,g,used", [(1024, 256, 256, 4, 1000), (3000, 512, 768, 9, 2111),
                                          (4096, 1024, 512, 64, 4096), (256, 128, 256, 3, 0)])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("config", [
    mosaic_kernels.GmmConfig(),
    mosaic_kernels.GmmConfig(tile_m=64, stages=4, wg_split="m", epi_n=64)])
def test_gmm_kernel_matches_oracle(m, k, n, g, used, transpose_w, config):
    rng = np.random.default_rng(m + g)
    x, w, sizes = random_case(rng, m, k, n, g, used, jnp.bfloat16)
    w_in = jnp.swapaxes(w, 1, 2) if transpose_w else w
    out = jax.jit(lambda *a: mosaic_kernels.gmm(*a, transpose_w=transpose_w, config=config))(
        x, w_in, sizes)
    expected = oracle(x, w, sizes)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)
    assert not np.asarray(out[used:]).any(), "rows past sum(group_sizes) must be zero"


@pytest.mark.gpu
def test_tgmm_kernel_matches_oracle():
    rng = np.random.default_rng(5)
    x, _, sizes = random_case(rng, 2048, 256, 128, 6, 1900, jnp.bfloat16)
    x = x.at[1900:].set(0)
    dy = jnp.asarray(rng.standard_normal((2048, 384)), jnp.bfloat16).at[1900:].set(0)
    dw = jax.jit(mosaic_kernels.tgmm)(x, dy, sizes)
    xs, dys = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    ends = np.cumsum(np.asarray(sizes))
    for g, (s, e) in enumerate(zip(ends - np.asarray(sizes), ends)):
        np.testing.assert_allclose(np.asarray(dw[g], np.float32), xs[s:e].T @ dys[s:e],
                                   rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
def test_mosaic_gradients_match_xla():
    rng = np.random.default_rng(6)
    x, w, sizes = random_case(rng, 2048, 512, 256, 8, 1800, jnp.bfloat16)
    x = x.at[1800:].set(0)
    ct = jnp.asarray(rng.standard_normal((2048, 256)), jnp.bfloat16)

    def grads(impl):
        loss = lambda x, w: (jax_ep.grouped_matmul(x, w, sizes, impl=impl).astype(jnp.float32)  # noqa: E731
                             * ct.astype(jnp.float32)).sum()
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)

    (l_m, (dx_m, dw_m)), (l_x, (dx_x, dw_x)) = grads("mosaic"), grads("xla")
    scale = float(jnp.abs(jax_ep.grouped_matmul(x, w, sizes, impl="xla").astype(jnp.float32)
                          * ct.astype(jnp.float32)).sum())  # the loss cancels: compare to |terms|
    np.testing.assert_allclose(float(l_m), float(l_x), atol=1e-2 * scale)
    np.testing.assert_allclose(np.asarray(dx_m, np.float32), np.asarray(dx_x, np.float32),
                               rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(dw_m, np.float32), np.asarray(dw_x, np.float32),
                               rtol=3e-2, atol=1e-1)


def test_custom_vjp_types_inside_shard_map(monkeypatch):
    """The Mosaic path's custom VJP on a (dp, ep) mesh: w is replicated over dp, so its
    cotangent is summed over dp; every cotangent has its primal's varying axes. The
    kernels are replaced by XLA ops here (CPU); the VJP wiring is what is tested."""
    from conftest import cpu_mesh
    from jax.sharding import NamedSharding, PartitionSpec as P

    def fake_gmm(x, w, sizes, *, transpose_w, config=None):
        return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if transpose_w else w, sizes)

    def fake_tgmm(x, dy, sizes, *, config=None):
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(x, dy, sizes, dims)

    monkeypatch.setattr(mosaic_kernels, "gmm", fake_gmm)
    monkeypatch.setattr(mosaic_kernels, "tgmm", fake_tgmm)
    mesh = cpu_mesh((2, 4), ("dp", "ep"))
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((8 * 32, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4 * 3, 16, 8)), jnp.float32)
    sizes = jnp.tile(jnp.asarray([10, 0, 20], jnp.int32), 8)

    def loss(impl):
        def per_shard(x, w, sizes):
            y = jax_ep.grouped_matmul(x, w, sizes, impl=impl)
            return jax.lax.psum((y * y).sum(), ("dp", "ep"))
        fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(("dp", "ep")), P("ep"), P(("dp", "ep"))),
                           out_specs=P())
        return jax.jit(jax.grad(fn, (0, 1)))

    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    args = (put(x, P(("dp", "ep"))), put(w, P("ep")), put(sizes, P(("dp", "ep"))))
    module = importlib.import_module("jax_ep.grouped_matmul")  # (the package exports the function)
    monkeypatch.setattr(module, "_resolve", lambda impl, x, w: impl)
    got = loss("mosaic")(*args)
    want = loss("xla")(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_work_list_never_addresses_rows_past_m():
    """Group sizes are device values: a sum past M or a negative size is cut off, never
    turned into stores past row M."""
    for sizes in ([300, 500, 400], [-5, 700, 90]):
        items = np.asarray(mosaic_kernels.work_list(jnp.asarray(sizes, jnp.int32), 1000, 128))
        used = items[:, items[0] != mosaic_kernels.SKIP]
        assert (used[1] * 128 + used[3] <= 1000).all()
        assert (used[2] <= used[3]).all()
