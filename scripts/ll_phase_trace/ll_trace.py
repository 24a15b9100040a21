"""Loop of low-latency round trips for the phase trace (scripts/ll_phase_trace/instrument.py).

    python scripts/ll_phase_trace/ll_trace.py NUM_SMS bf16|fp8

Every local GPU is one EP rank; T=128 tokens per GPU, H=7168, top-8 of E=256. One jitted
call runs 41 dispatch (FP8: then dequantize) -> combine round trips; four calls, each
printed as wall microseconds per round trip (launch included; the first compiles). With
the instrumented build the kernels print their TRACE lines."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax_ep
from jax_ep.demo import random_routing

num_sms = int(sys.argv[1]); fp8 = sys.argv[2] == "fp8"; iters = 41
devices = jax.devices(); mesh = Mesh(np.array(devices), ("ep",))
r, t, h = len(devices), 128, 7168
buf = jax_ep.Buffer(mesh, "ep", num_experts=256, hidden=h, backend="cuda",
                    max_tokens_per_rank=t, low_latency_num_sms=num_sms)
rng = np.random.default_rng(0)
shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
x = shard(jnp.asarray(rng.standard_normal((r * t, h)), jnp.bfloat16))
idx = shard(jnp.asarray(random_routing(rng, r * t, 256, 8)))
w = shard(jnp.asarray(rng.random((r * t, 8)), jnp.float32))
def body(x, idx, w):
    acc = x
    for i in range(iters):
        xi = jax.lax.optimization_barrier((acc, jnp.int32(i)))[0]
        out = buf.low_latency_dispatch(xi, idx, fp8=fp8)
        y = jax_ep.dequantize_fp8(out.recv_x, out.recv_scales, jnp.bfloat16) if fp8 else out.recv_x
        acc = buf.low_latency_combine(y, idx, w, out.handle)
    return acc
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
for k in range(4):
    t0 = time.perf_counter(); jax.block_until_ready(f(x, idx, w)); dt = time.perf_counter() - t0
    print(f"sms={num_sms} fp8={fp8} run {k}: {dt*1e6/iters:.1f} us per dispatch+combine (incl launch)", flush=True)
buf.check()
