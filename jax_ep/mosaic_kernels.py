"""Hopper (sm_90a) grouped-matmul kernels in Pallas Mosaic GPU, for `jax_ep.grouped_matmul`.

`gmm(x [M, K], w [G, K, N] (or [G, N, K] with transpose_w), group_sizes [G]) -> [M, N]`
is a warp-specialized, persistent kernel: one memory warpgroup streams tiles of x and w
through a ring of shared-memory stages with TMA, two compute warpgroups run wgmma into
float32 accumulators. Its work list is built on the host side of the trace (a few tiny XLA
ops): one item per (group, block of `block_m` rows) that the group touches, then one item
per block of the unused tail [sum(group_sizes), M), which the kernel fills with zeros
without computing. A block shared by two groups is computed once per group and each
computation stores only its own rows (TMA stores of power-of-two row counts). So the work
is sum(group_sizes) rows plus at most one block per group boundary, whatever M is.

`tgmm(x [M, K], dy [M, N], group_sizes [G]) -> [G, K, N]` (the weight gradient) is jax's
`transposed_ragged_dot` Mosaic GPU kernel: it reads only the rows of each group (rows past
sum(group_sizes) must be finite: they are masked by multiplication at the last block).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tiling of `gmm` (defaults: the best of scripts/gmm_sweep.py on one H200 at the MoE
    layer's shapes, docs/benchmarks.md). Each compute warpgroup owns a [tile_m, tile_n]
    float32 accumulator; the two warpgroups split the block along M ("m") or N ("n"), so a
    block is [block_m, block_n] = [2 tile_m, tile_n] or [tile_m, 2 tile_n]. Shared memory:
    stages x (block_m + block_n) x tile_k x 2 bytes + 2 x tile_m x epi_n x 2 bytes."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 3
    wg_split: str = "n"
    epi_n: int = 128          # output columns stored per epilogue step
    snake_width: int = 8      # planar-snake tile width over (block, column-block)

    @property
    def block_m(self) -> int:
        return self.tile_m * (2 if self.wg_split == "m" else 1)

    @property
    def block_n(self) -> int:
        return self.tile_n * (2 if self.wg_split == "n" else 1)


@dataclasses.dataclass(frozen=True)
class TgmmConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    snake_width: int = 4


NUM_COMPUTE_WGS = 2
ZERO_FILL = -2   # work-list group id: fill the rows with zeros
SKIP = -1        # work-list group id: padding item, nothing to do


def work_list(group_sizes: jax.Array, num_rows: int, block_m: int) -> jax.Array:
    """int32 [4, W] work items (group, block, first row, end row), rows within the block.

    Segments are the G groups and then the tail [sum(group_sizes), num_rows); each touches
    blocks first..last of `block_m` rows, one item per touched block. W = cdiv(num_rows,
    block_m) + G bounds the count (each segment adds at most one shared block); unused
    items are SKIP and come last."""
    num_groups = group_sizes.shape[0]
    # Sizes are device values: negative ones count as 0 and rows past num_rows are never
    # addressed (as in jax.lax.ragged_dot, groups past the rows are cut off).
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
    total = ends[-1]
    starts = jnp.concatenate([starts, total[None]])
    ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    sizes = ends - starts
    first = starts // block_m
    blocks = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
    item_end = jnp.cumsum(blocks)
    item_start = item_end - blocks
    num_items = -(-num_rows // block_m) + num_groups
    item = jnp.arange(num_items, dtype=jnp.int32)
    segment = jnp.sum(item_end[None, :] <= item[:, None], axis=1)      # [W], G+1 = none
    valid = segment <= num_groups
    seg = jnp.minimum(segment, num_groups)
    block = first[seg] + item - item_start[seg]
    lo = jnp.clip(starts[seg] - block * block_m, 0, block_m)
    hi = jnp.clip(ends[seg] - block * block_m, 0, block_m)
    group = jnp.where(seg == num_groups, ZERO_FILL, seg)
    group = jnp.where(valid, group, SKIP)
    items = jnp.stack([group, jnp.where(valid, block, 0), lo, hi]).astype(jnp.int32)
    # Spread the zero-fill items evenly among the matmul items (in their order), so the
    # SMs' stores of zeros overlap other SMs' math instead of forming a tail of their own.
    is_zero = group == ZERO_FILL
    num_zero = jnp.maximum(is_zero.sum(), 1)
    num_math = jnp.maximum((group >= 0).sum(), 1)
    rank_zero = jnp.cumsum(is_zero) - 1
    rank_math = jnp.cumsum(group >= 0) - 1
    position = jnp.where(is_zero, (rank_zero + 0.5) / num_zero,
                         jnp.where(group >= 0, (rank_math + 0.25) / num_math, 2.0))
    return items[:, jnp.argsort(position, stable=True)]


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", 132)  # 132 (H100 / H200) when lowering on CPU


def _store_rows(smem, smem_row0, gmem, gmem_row0, count, max_rows):
    """TMA-store smem rows [smem_row0, +count) to gmem rows [gmem_row0, +count), as a sum
    of power-of-two row counts (a TMA box has a static shape); count <= max_rows."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    done = jnp.int32(0)
    size = 1 << (max_rows.bit_length() - 1)
    while size >= 1:
        take = count & size
        plgpu.copy_smem_to_gmem(smem.at[pl.ds(smem_row0 + done, size)],
                                gmem.at[pl.ds(gmem_row0 + done, size)],
                                predicate=take != 0, commit_group=False)
        done = done + take
        size //= 2
    plgpu.commit_smem_to_gmem_group()


def gmm(x, w, group_sizes, *, transpose_w: bool, config: GmmConfig | None = None):
    """x bf16 [M, K]; w bf16 [G, K, N] ([G, N, K] if transpose_w); group_sizes int32 [G].
    Returns bf16 [M, N]: rows of group g times w[g] (w[g]^T), zero past sum(group_sizes)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config or GmmConfig()
    m, k = x.shape
    n = w.shape[1] if transpose_w else w.shape[2]
    bm, bn, tm, tn, tk = cfg.block_m, cfg.block_n, cfg.tile_m, cfg.tile_n, cfg.tile_k
    if k % tk or n % bn or tn % cfg.epi_n:
        raise ValueError(f"gmm: K={k} must be a multiple of {tk}, N={n} of {bn}.")
    padded_m = -(-m // bm) * bm
    if padded_m != m:  # whole blocks only: TMA loads of the last block stay in bounds
        x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    items = work_list(group_sizes, m, bm)
    num_items = items.shape[1]
    n_blocks = n // bn
    dtype = x.dtype
    swizzle = plgpu.find_swizzle(tk * jnp.dtype(dtype).itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    split_m = cfg.wg_split == "m"

    def pipeline(body, compute_context):
        b_spec = (plgpu.BlockSpec((bn, tk), lambda kk: (0, kk), transforms=transforms)
                  if transpose_w else
                  plgpu.BlockSpec((tk, bn), lambda kk: (kk, 0), transforms=transforms))
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // tk,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((bm, tk), lambda kk: (0, kk), transforms=transforms),
                      b_spec],
            wg_axis="wg", num_compute_wgs=NUM_COMPUTE_WGS, max_concurrent_steps=cfg.stages,
            compute_context=compute_context)

    def kernel(items_gmem, x_gmem, w_gmem, o_gmem):
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem.at[0]),
            o_smem=plgpu.SMEM((NUM_COMPUTE_WGS, tm, cfg.epi_n), dtype),
            collective_axes="wg")
        def scope(allocs, o_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((num_items * n_blocks,), collective_axes="sm")
            def item_loop(info):
                item, nb = plgpu.planar_snake(info.index[0], (num_items, n_blocks), 1,
                                              cfg.snake_width)
                group = items_gmem[0, item]
                block = items_gmem[1, item]
                lo = items_gmem[2, item]
                hi = items_gmem[3, item]
                # This warpgroup's part of the block: rows [wg_row0, +tm), cols [wg_col0, +tn).
                wg_row0 = wg * tm if split_m else 0
                wg_col0 = nb * bn + (0 if split_m else wg * tn)
                row_lo = jnp.clip(lo - wg_row0, 0, tm)
                row_hi = jnp.clip(hi - wg_row0, 0, tm)
                out_row0 = block * bm + wg_row0 + row_lo

                def store(acc_cols):
                    """acc_cols(c) -> [tm, epi_n] values of columns chunk c; store rows."""
                    for c in range(tn // cfg.epi_n):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        o_smem[wg] = acc_cols(c)
                        plgpu.commit_smem()
                        _store_rows(o_smem.at[wg], row_lo,
                                    o_gmem.at[:, pl.ds(wg_col0 + c * cfg.epi_n, cfg.epi_n)],
                                    out_row0, row_hi - row_lo, tm)

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped,
                                       acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                    def acc_scope(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...].astype(dtype)
                        store(lambda c: acc[:, c * cfg.epi_n:(c + 1) * cfg.epi_n])

                def mma(_, x_smem, w_smem, acc_ref):
                    a = x_smem.at[pl.ds(wg * tm, tm)] if split_m else x_smem
                    if transpose_w:
                        b = w_smem if split_m else w_smem.at[pl.ds(wg * tn, tn)]
                        b = b.transpose((1, 0))
                    else:
                        b = w_smem if split_m else w_smem.at[:, pl.ds(wg * tn, tn)]
                    plgpu.wgmma(acc_ref, a, b)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                @pl.when(group >= 0)
                def _compute():
                    w_g = w_gmem.at[group]
                    w_cols = (w_g.at[pl.ds(nb * bn, bn), :] if transpose_w
                              else w_g.at[:, pl.ds(nb * bn, bn)])
                    pipeline(mma, compute_context)(
                        x_gmem.at[pl.ds(block * bm, bm), :], w_cols, allocations=allocs)

                @pl.when((group == ZERO_FILL) & (wg < NUM_COMPUTE_WGS))
                def _zero_fill():
                    zeros = jnp.zeros((tm, cfg.epi_n), dtype)
                    store(lambda c: zeros)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((padded_m, n), dtype),
        grid=(_num_sms(),), grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    out = call(items, x, w)
    return out[:m] if padded_m != m else out


def tgmm(x, dy, group_sizes, *, config: TgmmConfig | None = None):
    """x bf16 [M, K], dy bf16 [M, N], group_sizes int32 [G] -> bf16 [G, K, N]:
    dw[g] = x_g^T dy_g over the rows of group g."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    cfg = config or TgmmConfig()
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy, group_sizes=group_sizes, block_m=cfg.block_m, block_n=cfg.block_n,
        block_k=cfg.block_k, max_concurrent_steps=cfg.stages, grid_block_n=cfg.snake_width)
