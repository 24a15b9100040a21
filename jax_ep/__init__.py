"""jax_ep: DeepEP-class expert-parallel dispatch/combine for JAX.

    buf = jax_ep.Buffer(mesh, "ep", num_experts=256, hidden=7168)
    # inside jax.shard_map(..., mesh=mesh), per shard:
    out = buf.dispatch(x, topk_idx, topk_weights)
    y = buf.combine(expert_fn(out.recv_x) * out.recv_topk_weights.sum(-1, keepdims=True),
                    out.handle)
"""

from jax_ep.buffer import Buffer, check_topk_idx, overlap, region_bytes
from jax_ep.grouped_matmul import grouped_matmul
from jax_ep.moe import (MoEOutput, MoEParams, init_moe_params, moe, moe_partition_specs,
                        shard_moe_params)
from jax_ep.reference import dequantize_fp8, quantize_fp8
from jax_ep.types import (DispatchLayout, DispatchOutput, EPConfig, Handle,
                          LowLatencyDispatchOutput, LowLatencyHandle, LowLatencyPending, Pending)

__all__ = [
    "Buffer", "check_topk_idx", "grouped_matmul", "DispatchLayout", "DispatchOutput", "EPConfig", "Handle",
    "LowLatencyDispatchOutput", "LowLatencyHandle", "LowLatencyPending", "Pending", "overlap", "region_bytes",
    "quantize_fp8", "dequantize_fp8",
    "moe", "MoEParams", "MoEOutput", "init_moe_params", "moe_partition_specs", "shard_moe_params",
]
__version__ = "0.1.0"
