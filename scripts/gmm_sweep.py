"""Tune jax_ep's grouped-matmul kernels on one GPU at the MoE layer's shapes.

    python scripts/gmm_sweep.py [--shapes all|h7168|h4096] [--capacity-factor 4]

For each matmul of the SwiGLU layer (T=4096 tokens x top-8 = 32768 routed rows per GPU,
routed group sizes): TF/s (useful FLOPs) of the dense batched einsum [G, M/G, K] x
[G, K, N] (the baseline), then jax_ep.mosaic_kernels.gmm (forward; transpose_w for dx) and
tgmm (dw) over a grid of tilings, and the best gmm again with M = capacity-factor x the
routed rows (the unused tail must cost little)."""
import argparse, itertools, statistics, time
import numpy as np
import jax, jax.numpy as jnp

from jax_ep import mosaic_kernels as mk


def timeit(f, *args, n=10):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def routed_sizes(rng, m, g):
    p = np.exp(rng.standard_normal(g) * 0.5); p /= p.sum()
    s = np.floor(p * m).astype(np.int32); s[0] += m - s.sum()
    return jnp.asarray(s)


GMM_CONFIGS = [mk.GmmConfig(), mk.GmmConfig(epi_n=64),
               mk.GmmConfig(tile_m=64, wg_split="m", stages=4),
               mk.GmmConfig(tile_m=128, wg_split="m", stages=3)]
TGMM_CONFIGS = [mk.TgmmConfig()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--capacity-factor", type=int, default=4)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    M = 32768
    shapes = [("gate_up H7168 L64", 7168, 4096, 64), ("down H7168 L64", 2048, 7168, 64),
              ("gate_up H4096 L16", 4096, 4096, 16), ("down H4096 L16", 2048, 4096, 16)]
    if a.shapes != "all":
        shapes = [s for s in shapes if a.shapes.upper() in s[0].upper()]
    for name, K, N, G in shapes:
        gs = routed_sizes(rng, M, G)
        x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
        wt = jnp.asarray(np.swapaxes(np.asarray(w), 1, 2))  # [G, N, K]: dx reads w as [G, K', N'] = this
        dy = jnp.asarray(rng.standard_normal((M, N)), jnp.bfloat16)
        tf = lambda t: 2 * M * K * N / t / 1e12
        print(f"\n== {name}: M={M} K={K} N={N} G={G} group sizes {int(gs.min())}..{int(gs.max())}", flush=True)
        ref = np.asarray(jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s, preferred_element_type=jnp.float32))(x, w, gs))
        t_e = timeit(jax.jit(lambda a, b: jnp.einsum("gmk,gkn->gmn", a, b)), x.reshape(G, M // G, K), w)
        t_dx = timeit(jax.jit(lambda a, b: jnp.einsum("gmn,gkn->gmk", a, b)), dy.reshape(G, M // G, N), w)
        t_dw = timeit(jax.jit(lambda a, b: jnp.einsum("gmk,gmn->gkn", a, b)), x.reshape(G, M // G, K), dy.reshape(G, M // G, N))
        print(f"einsum  fwd {t_e*1e3:7.3f} ms {tf(t_e):5.0f} TF/s | dx {t_dx*1e3:7.3f} ms {tf(t_dx):5.0f} | dw {t_dw*1e3:7.3f} ms {tf(t_dw):5.0f}", flush=True)
        best = {}
        for cfg in GMM_CONFIGS:
            for tw in (False, True):
                try:
                    if tw:  # dx-shaped: [M, N] x w[G, K, N]^T -> [M, K]
                        f = jax.jit(lambda a, b, s, cfg=cfg: mk.gmm(a, b, s, transpose_w=True, config=cfg))
                        args = (dy, w, gs)
                    else:
                        f = jax.jit(lambda a, b, s, cfg=cfg: mk.gmm(a, b, s, transpose_w=False, config=cfg))
                        args = (x, w, gs)
                    t = timeit(f, *args, n=5)
                    out = np.asarray(f(*args), np.float32)
                    if not tw:
                        err = float(np.abs(out - ref).max())
                    else:
                        err = float("nan")
                except Exception as e:
                    print(f"  gmm {'dx ' if tw else 'fwd'} {cfg} FAILED: {str(e).splitlines()[0][:300]}", flush=True)
                    continue
                print(f"  gmm {'dx ' if tw else 'fwd'} {t*1e3:7.3f} ms {tf(t):5.0f} TF/s  max|err| {err:.3g}  {cfg}", flush=True)
                key = "dx" if tw else "fwd"
                if t < best.get(key, (1e9,))[0]:
                    best[key] = (t, cfg)
        for cfg in TGMM_CONFIGS:
            try:
                f = jax.jit(lambda a, b, s, cfg=cfg: mk.tgmm(a, b, s, config=cfg))
                t = timeit(f, x, dy, gs, n=5)
            except Exception as e:
                print(f"  tgmm {cfg} FAILED: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            print(f"  tgmm dw  {t*1e3:7.3f} ms {tf(t):5.0f} TF/s  {cfg}", flush=True)
            if t < best.get("dw", (1e9,))[0]:
                best["dw"] = (t, cfg)
        for key, (t, cfg) in best.items():
            base = {"fwd": t_e, "dx": t_dx, "dw": t_dw}[key]
            print(f"BEST {name} {key}: {tf(t):5.0f} TF/s = {base / t:.2f} x einsum  {cfg}")
        if "fwd" in best:
            cap = a.capacity_factor * M
            xc = jnp.concatenate([x, jnp.ones((cap - M, K), x.dtype)])
            f = jax.jit(lambda a, b, s: mk.gmm(a, b, s, transpose_w=False, config=best["fwd"][1]))
            t = timeit(f, xc, w, gs, n=5)
            out = f(xc, w, gs)
            tail_zero = not bool(jnp.any(out[M:]))
            print(f"  capacity {cap} rows ({a.capacity_factor}x routed): {t*1e3:7.3f} ms "
                  f"(+{(t / best['fwd'][0] - 1) * 100:.0f}%), tail zero: {tail_zero}", flush=True)


if __name__ == "__main__":
    main()
