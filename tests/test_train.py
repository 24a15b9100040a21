"""examples/train_moe.py end to end: a small MoE transformer LM trained with jax_ep.

CPU: the expert-parallel run (reference backend, 8 EP ranks) follows the loss curve of a
dense single-device oracle of the same model (same parameters, every expert computed on
every token) and of a (dp=4, ep=2) mesh, and its loss goes down. GPU: the CUDA backend
follows the reference backend's curve.
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("tqdm")

from jax_ep.moe import route  # noqa: E402
from jax_ep.nnx import MoE  # noqa: E402

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_moe.py"
_spec = importlib.util.spec_from_file_location("train_moe", _PATH)
train_moe = importlib.util.module_from_spec(_spec)
sys.modules["train_moe"] = train_moe
_spec.loader.exec_module(train_moe)

STEPS = 20
# 2 sequences per shard on 8 CPU devices; one layer (compile time), a shared expert, bf16 experts.
TINY = dict(steps=STEPS, batch=16, seq=32, hidden=128, layers=1, experts=8, topk=2, ffn=128,
            shared_ffn=64, vocab=64, lr=1e-2, warmup=2, quiet=True)
NUM_SHARDS = 8
BF16_RTOL = 2e-2


class DenseMoE(MoE):
    """`jax_ep.nnx.MoE` computed densely on one device: the same parameters and routing
    (`jax_ep.moe.route`), every expert applied to every token and masked by its gate weight,
    rounding where the EP layer rounds. aux_loss is the mean over NUM_SHARDS groups of tokens,
    as the EP layer averages its shards' losses."""

    def __call__(self, x):  # x [B, S, H] -> ([B, S, H], aux)
        p = self.params()
        hidden = x.shape[-1]
        num_experts = p.router.shape[1]
        xt = x.reshape(-1, hidden)                                                  # [N, H]
        idx, weights, logits, probs = route(
            xt, p.router, top_k=self.top_k, score_func=self.score_func,
            normalize_topk=self.normalize_topk, routed_scaling=self.routed_scaling)
        onehot = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32)               # [N, K, E]
        gates = jnp.einsum("nk,nke->en", weights, onehot)                           # [E, N]
        h = jnp.einsum("nh,ehf->enf", xt, p.w_gate_up.astype(x.dtype),
                       preferred_element_type=jnp.float32).astype(x.dtype)         # [E, N, 2F]
        gate, up = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        act = (jax.nn.silu(gate) * up * gates[..., None]).astype(x.dtype)
        rows = jnp.einsum("enf,efh->enh", act, p.w_down.astype(x.dtype),
                          preferred_element_type=jnp.float32).astype(x.dtype)      # [E, N, H]
        y = rows.astype(jnp.float32).sum(0)
        if p.shared_gate_up is not None:
            hs = jnp.dot(xt, p.shared_gate_up.astype(x.dtype), preferred_element_type=jnp.float32)
            gs, us = jnp.split(hs, 2, axis=-1)
            act_s = (jax.nn.silu(gs) * us).astype(x.dtype)
            y = y + jnp.dot(act_s, p.shared_down.astype(x.dtype),
                            preferred_element_type=jnp.float32).astype(x.dtype)
        # Per-shard load-balancing loss, averaged over shards; z-loss over all tokens.
        counts = onehot.sum(1).reshape(NUM_SHARDS, -1, num_experts).sum(1)         # [G, E]
        fraction = counts / (counts.sum(-1, keepdims=True))
        mean_prob = probs.reshape(NUM_SHARDS, -1, num_experts).mean(1)
        aux_loss = (num_experts * (fraction * mean_prob).sum(-1)).mean()
        z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
        aux = {"aux_loss": aux_loss, "z_loss": z_loss, "num_dropped": jnp.int32(0),
               "tokens_per_expert": counts.sum(0).astype(jnp.int32)}
        return y.astype(x.dtype).reshape(x.shape), aux


def test_nnx_moe_parameters_carry_sharding_annotations():
    from flax import nnx
    from conftest import cpu_mesh

    import jax_ep

    mesh = cpu_mesh((2, 4), ("dp", "ep"))
    buf = jax_ep.Buffer(mesh, "ep", num_experts=8, hidden=128, backend="reference")
    layer = MoE(buf, ffn=64, top_k=2, shared_ffn=32, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    shapes = {"router": (128, 8), "w_gate_up": (8, 128, 128), "w_down": (8, 64, 128),
              "shared_gate_up": (128, 64), "shared_down": (32, 128)}
    for name, shape in shapes.items():
        value = getattr(layer, name)[...]
        want = ("ep", None, None) if name.startswith("w_") else (None, None)
        assert value.shape == shape, name
        spec = specs[name].get_value() if hasattr(specs[name], "get_value") else specs[name].value
        assert tuple(spec) == want, name
        assert value.sharding.spec == jax.sharding.PartitionSpec(*want), name


@pytest.fixture(scope="module")
def ep_losses():
    """The expert-parallel run: reference backend, mesh dp=1 x ep=8."""
    return np.array(train_moe.train(train_moe.TrainConfig(backend="reference", **TINY)))


def test_ep_training_matches_dense_oracle_and_learns(ep_losses):
    dense = np.array(train_moe.train(train_moe.TrainConfig(backend="reference", devices=1, **TINY),
                                     moe_layer=DenseMoE))
    assert np.all(np.isfinite(ep_losses))
    np.testing.assert_allclose(ep_losses, dense, rtol=BF16_RTOL)
    # The loss falls well below its start (about ln(64) = 4.2) within STEPS steps.
    assert ep_losses[-3:].mean() < ep_losses[:3].mean() - 0.5, ep_losses


def test_ep_gradients_match_dense_oracle():
    """The first step's gradients, every parameter (Adam would hide a wrong scale of one)."""
    from flax import nnx

    def grads(config, moe_layer):
        mesh, _, model = train_moe.build_model(config, moe_layer=moe_layer)
        tokens = jax.device_put(train_moe.make_batch(config, 0),
                                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("dp", "ep"))))
        grad = nnx.jit(nnx.grad(lambda m, t: train_moe.lm_loss(m, t, config)[0]))(model, tokens)
        return jax.tree.map(lambda g: np.asarray(g, np.float32), nnx.state(grad))

    ep = grads(train_moe.TrainConfig(backend="reference", **TINY), MoE)
    dense = grads(train_moe.TrainConfig(backend="reference", devices=1, **TINY), DenseMoE)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(ep), jax.tree.leaves(dense)):
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < BF16_RTOL, (jax.tree_util.keystr(path), err)


def test_mesh_shape_does_not_change_training(ep_losses):
    """dp=4 x ep=2 (4 experts per rank) splits the tokens as dp=1 x ep=8 does."""
    losses = np.array(train_moe.train(train_moe.TrainConfig(backend="reference", dp=4, **TINY)))
    np.testing.assert_allclose(losses, ep_losses, rtol=BF16_RTOL)


@pytest.mark.gpu
def test_cuda_training_matches_reference():
    """Every local GPU: the CUDA backend's loss curve follows the reference backend's."""
    config = dict(steps=30, batch=8 * jax.device_count(), seq=128, hidden=256, layers=2,
                  experts=4 * jax.device_count(), topk=2, ffn=256, shared_ffn=256, quiet=True)
    cuda = np.array(train_moe.train(train_moe.TrainConfig(backend="cuda", **config)))
    ref = np.array(train_moe.train(train_moe.TrainConfig(backend="reference", **config)))
    assert np.all(np.isfinite(cuda))
    np.testing.assert_allclose(cuda, ref, rtol=BF16_RTOL)
    assert cuda[-3:].mean() < cuda[:3].mean() - 0.5, cuda
