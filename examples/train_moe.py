"""Train a small decoder-only MoE transformer LM with jax_ep expert parallelism.

    python examples/train_moe.py --steps 300            # every GPU, or 8 virtual CPU devices
    python examples/train_moe.py --steps 30 --backend reference --dp 2 --log-json /tmp/l.json

The model: token + learned position embeddings, `--layers` blocks of [RMSNorm, causal
multi-head self-attention (head dim 64), RMSNorm, jax_ep MoE FFN (`jax_ep.nnx.MoE`: top-k
routed SwiGLU experts, expert-parallel)], a final RMSNorm and a separate unembedding.

Parallelism: a (dp, ep) mesh over all local devices (`--dp 1`: one "ep" axis). The batch is
split over every device; the experts over the "ep" axis (replicated over "dp"); the
attention and embedding weights are replicated (plain data parallelism, XLA all-reduces
their gradients).

The data is synthetic and learnable: every sequence is an arithmetic progression modulo the
vocabulary, x_t = (a + t * d) mod V, with a random start a and stride d in [1, 8]. After two
tokens the rest is predictable from context, so the loss falls well below ln(V).

Loss = cross-entropy + aux_coef * aux_loss (load balancing) + z_coef * z_loss (router).
`train(config)` runs in-process and returns the per-step losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Optional

try:
    import jax_ep  # noqa: F401  (imports jax; XLA reads its flags later, when it starts)
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from jax_ep.demo import _configure_cpu_devices

_configure_cpu_devices()  # 8 virtual CPU devices when there is no GPU (before JAX starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jax_ep  # noqa: E402
import jax_ep.nnx  # noqa: E402


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    backend: str = "auto"           # jax_ep.Buffer backend: auto, cuda, reference
    batch: int = 32                 # sequences per step (global); a multiple of the devices
    seq: int = 64                   # tokens per sequence
    hidden: int = 256               # model width; a multiple of 128
    layers: int = 2
    experts: int = 8                # a multiple of the ep axis size
    topk: int = 2
    ffn: int = 256                  # each expert's intermediate width
    shared_ffn: int = 0             # shared expert width (0: none)
    vocab: int = 64
    head_dim: int = 64
    dp: int = 1                     # mesh (dp, ep) with ep = devices / dp
    devices: int = 0                # use the first N devices (0: all)
    lr: float = 3e-3
    warmup: int = 20
    aux_coef: float = 1e-2
    z_coef: float = 1e-3
    expert_dtype: str = "bfloat16"  # parameter dtype of the experts (and the MoE input)
    seed: int = 0
    log_json: Optional[str] = None
    quiet: bool = False


# ------------------------------------------------------------------ data
def make_batch(config: TrainConfig, step: int) -> np.ndarray:
    """int32 [batch, seq + 1]: arithmetic progressions mod vocab (deterministic per step)."""
    rng = np.random.default_rng([config.seed, step])
    start = rng.integers(0, config.vocab, (config.batch, 1))
    stride = rng.integers(1, 9, (config.batch, 1))
    return ((start + stride * np.arange(config.seq + 1)) % config.vocab).astype(np.int32)


# ------------------------------------------------------------------ model
class Attention(nnx.Module):
    """Causal multi-head self-attention: [B, S, H] -> [B, S, H] (heads of head_dim)."""

    def __init__(self, hidden: int, head_dim: int, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = hidden // head_dim, head_dim
        self.qkv = nnx.Linear(hidden, 3 * hidden, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, s, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3 * self.num_heads, self.head_dim), 3, axis=2)
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(self.head_dim)
        causal = jnp.tril(jnp.ones((s, s), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        return self.out(jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, -1))


class Block(nnx.Module):
    """x + attn(norm(x)), then x + moe(norm(x)). Returns ([B, S, H], MoE aux dict)."""

    def __init__(self, buf, config: TrainConfig, *, moe_layer=jax_ep.nnx.MoE, rngs: nnx.Rngs):
        h = config.hidden
        self.attn_norm = nnx.RMSNorm(h, rngs=rngs)
        self.attn = Attention(h, config.head_dim, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(h, rngs=rngs)
        self.moe = moe_layer(buf, ffn=config.ffn, top_k=config.topk, shared_ffn=config.shared_ffn,
                             dtype=jnp.dtype(config.expert_dtype), rngs=rngs)
        self.moe_dtype = jnp.dtype(config.expert_dtype)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        y, aux = self.moe(self.moe_norm(x).astype(self.moe_dtype))
        return x + y.astype(x.dtype), aux


class MoETransformer(nnx.Module):
    """tokens int32 [B, S] -> (logits float32 [B, S, vocab], aux dict averaged over layers)."""

    def __init__(self, buf, config: TrainConfig, *, moe_layer=jax_ep.nnx.MoE, rngs: nnx.Rngs):
        self.embed = nnx.Embed(config.vocab, config.hidden, rngs=rngs)
        self.pos = nnx.Embed(config.seq, config.hidden, rngs=rngs)
        blocks = [Block(buf, config, moe_layer=moe_layer, rngs=rngs) for _ in range(config.layers)]
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks  # Flax >= 0.12: List
        self.norm = nnx.RMSNorm(config.hidden, rngs=rngs)
        self.unembed = nnx.Linear(config.hidden, config.vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
        auxes = []
        for block in self.blocks:
            x, aux = block(x)
            auxes.append(aux)
        aux = {"aux_loss": sum(a["aux_loss"] for a in auxes) / len(auxes),
               "z_loss": sum(a["z_loss"] for a in auxes) / len(auxes),
               "num_dropped": sum(a["num_dropped"] for a in auxes)}
        return self.unembed(self.norm(x)).astype(jnp.float32), aux


# ------------------------------------------------------------------ training
def make_mesh(config: TrainConfig) -> Mesh:
    """A (dp, ep) mesh over the first `config.devices` local devices (GPUs if any)."""
    devices = jax.devices()
    if devices[0].platform not in ("gpu", "tpu"):
        devices = jax.devices("cpu")
    if config.devices:
        devices = devices[:config.devices]
    if len(devices) % config.dp:
        raise ValueError(f"--dp {config.dp} must divide the {len(devices)} devices.")
    return Mesh(np.array(devices).reshape(config.dp, -1), ("dp", "ep"))


def build_model(config: TrainConfig, *, moe_layer=jax_ep.nnx.MoE):
    """The mesh, its jax_ep.Buffer and the model, with its parameters placed on the mesh.

    moe_layer: the class of each block's MoE FFN, called like `jax_ep.nnx.MoE` (tests pass a
    dense single-device stand-in with the same parameters as an oracle).
    """
    mesh = make_mesh(config)
    num_shards = mesh.devices.size
    if config.batch % num_shards:
        raise ValueError(f"--batch {config.batch} must be a multiple of the {num_shards} devices.")
    tokens_per_rank = config.batch * config.seq // num_shards
    buf = jax_ep.Buffer(mesh, "ep", num_experts=config.experts, hidden=config.hidden,
                        backend=config.backend, max_tokens_per_rank=tokens_per_rank)
    model = MoETransformer(buf, config, moe_layer=moe_layer, rngs=nnx.Rngs(config.seed))
    # Experts are split over "ep" (their annotation); unannotated weights are replicated.
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    return mesh, buf, model


def lm_loss(model: MoETransformer, tokens, config: TrainConfig):
    """tokens int32 [B, S + 1] -> (loss f32 [], (cross-entropy f32 [], MoE aux dict)):
    next-token cross-entropy + aux_coef * aux_loss + z_coef * z_loss."""
    logits, aux = model(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss = ce + config.aux_coef * aux["aux_loss"] + config.z_coef * aux["z_loss"]
    return loss, (ce, aux)


def train(config: TrainConfig, *, moe_layer=jax_ep.nnx.MoE) -> list[float]:
    """Train for config.steps steps; returns the loss (CE + aux terms) of every step.
    moe_layer: as for `build_model`."""
    mesh, buf, model = build_model(config, moe_layer=moe_layer)
    graphdef, params = nnx.split(model)

    warmup = min(config.warmup, config.steps // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                                  max(config.steps, warmup + 1), config.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01,
                                 mu_dtype=jnp.float32))
    # Adam moments sit with their parameters; scalars (the step count) are replicated.
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(
        lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated),
        jax.jit(tx.init)(params))
    # Every step returns the state where it found it, so the step compiles once.
    state_shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
    data_sharding = NamedSharding(mesh, P(("dp", "ep")))

    def loss_fn(params, tokens):
        return lm_loss(nnx.merge(graphdef, params), tokens, config)

    @functools.partial(jax.jit, donate_argnums=(0, 1),
                       out_shardings=(*state_shardings, None, None, None))
    def train_step(params, opt_state, tokens):
        (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, ce, aux

    if not config.quiet:
        device = mesh.devices.flat[0]
        print(f"MoE LM: {config.layers} layers, hidden {config.hidden}, {config.experts} experts "
              f"top-{config.topk}, ffn {config.ffn}; mesh dp={mesh.shape['dp']} x "
              f"ep={mesh.shape['ep']} of {device.platform} ({device.device_kind}); "
              f"backend={buf.backend}; {config.batch}x{config.seq} tokens/step")
    losses, ces = [], []
    tokens_per_step = config.batch * config.seq
    rate = None
    bar = tqdm(range(config.steps), disable=config.quiet, dynamic_ncols=True)
    for step in bar:
        tokens = jax.device_put(make_batch(config, step), data_sharding)
        start = time.perf_counter()
        params, opt_state, loss, ce, aux = train_step(params, opt_state, tokens)
        loss, ce = float(loss), float(ce)  # waits for the step
        elapsed = time.perf_counter() - start
        if step > 0:  # the first step compiles
            rate = tokens_per_step / elapsed if rate is None else 0.9 * rate + 0.1 * tokens_per_step / elapsed
        losses.append(loss)
        ces.append(ce)
        bar.set_postfix(loss=f"{loss:.4f}", ce=f"{ce:.4f}",
                        tok_s=f"{rate:,.0f}" if rate else "-", refresh=False)
    buf.check()
    if config.log_json:
        with open(config.log_json, "w") as f:
            json.dump({"config": dataclasses.asdict(config), "loss": losses, "ce": ces}, f)
    if not config.quiet and losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (cross-entropy {ces[-1]:.4f}, "
              f"ln(vocab) = {np.log(config.vocab):.4f})")
    return losses


def parse_args(argv=None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--backend", default=defaults.backend, choices=("auto", "cuda", "reference"))
    parser.add_argument("--batch", type=int, default=defaults.batch, help="sequences per step")
    parser.add_argument("--seq", type=int, default=defaults.seq)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--experts", type=int, default=defaults.experts)
    parser.add_argument("--topk", type=int, default=defaults.topk)
    parser.add_argument("--ffn", type=int, default=defaults.ffn)
    parser.add_argument("--shared-ffn", type=int, default=defaults.shared_ffn)
    parser.add_argument("--dp", type=int, default=defaults.dp,
                        help="data-parallel mesh axis size (ep = devices / dp)")
    parser.add_argument("--devices", type=int, default=defaults.devices, help="0: all")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--expert-dtype", default=defaults.expert_dtype,
                        choices=("bfloat16", "float32"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--log-json", default=None, metavar="PATH",
                        help="write the per-step losses to this JSON file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    return TrainConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
