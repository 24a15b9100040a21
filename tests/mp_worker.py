"""One process of tests/test_gpu_multiprocess.py: one GPU per process, jax.distributed.

    python tests/mp_worker.py --rank I --num N --port P

Builds a mesh over the N global GPUs (EP rank = process index), runs dispatch + combine
(both layouts), a gradient through them and the low-latency round trip (FP8, fused and
hooked) with the CUDA and the reference backends on the same random data, and compares this
process's shard of every output. Then the last rank goes silent (check_silent_rank): the
others' low-latency ops mask it or fail naming it. With --failures, the last rank joins late
and then dies (check_late_and_dead_rank); with --internode, the internode mode (fused and
hooked) over virtual nodes of --num-ranks-per-node GPUs, and with both, a rank that dies in
internode mode (check_internode_dead_rank). Prints "ok" and exits
0 when all match; otherwise prints the mismatch and exits 1 at once (without waiting for the
other processes at jax.distributed's shutdown barrier).
"""

import hashlib
import os
import time
import warnings

import jax
import jax.numpy as jnp
import jax_ep
import numpy as np
from jax._src import distributed
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import mp_common
from mp_common import (check_silent_rank_results, local, silent_rank_round_trip,
                       unmasked_recv_count)

NUM_TOKENS, HIDDEN, NUM_EXPERTS, TOPK = 127, 2048, 64, 4
OUTPUTS = ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens",
           "num_recv_tokens_per_expert", "num_dropped", "send_pos", "num_tokens_matrix",
           "pair_expert_rows", "combined")


def global_inputs(num_ranks):
    """The same in every process: x [R*T, H] bf16, topk_idx [R*T, K] int32 (distinct experts,
    1/8 of the slots -1), topk_weights [R*T, K] f32, ct [R*T, H] bf16 (the loss cotangent)."""
    rng = np.random.default_rng(0)
    total = num_ranks * NUM_TOKENS
    x = rng.standard_normal((total, HIDDEN)).astype(jnp.bfloat16)
    idx = np.argsort(rng.random((total, NUM_EXPERTS)), axis=1)[:, :TOPK].astype(np.int32)
    idx[rng.random(idx.shape) < 1 / 8] = -1
    w = rng.random((total, TOPK)).astype(np.float32)
    ct = rng.standard_normal((total, HIDDEN)).astype(jnp.bfloat16)
    return x, idx, w, ct


def round_trip(buf, mesh, layout, hook=False, bias=False):
    """jit-able global function (x, topk_idx, topk_weights) -> the 10 OUTPUTS, each split
    over "ep": dispatch, gate the rows by their summed weights, combine. With hook, the
    hooked halves, with a matmul of x placed between each send and its receive. With bias,
    combine adds x with its hidden dimension reversed."""
    def body(x, idx, w):
        if hook:
            pending, mixed = jax_ep.overlap(buf.dispatch_send(x, idx, w, layout=layout),
                                            lambda x: x @ x[:HIDDEN // 16].T, x)
            out = buf.dispatch_recv(pending)
        else:
            out = buf.dispatch(x, idx, w, layout=layout)
        gate = out.recv_topk_weights.sum(-1, keepdims=True)
        y = (out.recv_x.astype(jnp.float32) * gate).astype(x.dtype)
        if hook:
            pending, mixed = jax_ep.overlap(buf.combine_send(y, out.handle),
                                            lambda m: m @ m.T, mixed)
            combined = buf.combine_recv(pending) + 0 * mixed.sum().astype(x.dtype)
        else:
            combined = buf.combine(y, out.handle, bias=jnp.flip(x, -1) if bias else None)
        return (out.recv_x, out.recv_topk_idx, out.recv_topk_weights, out.num_recv_tokens[None],
                out.num_recv_tokens_per_expert, out.num_dropped[None], out.handle.send_pos,
                out.handle.num_tokens_matrix, out.handle.pair_expert_rows, combined)
    return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 10)


def gradients(buf, mesh, layout):
    """jit-able (x, topk_weights, topk_idx, ct) -> d/dx, d/dtopk_weights of sum(combined * ct)."""
    def loss(x, w, idx, ct):
        combined = round_trip(buf, mesh, layout)(x, idx, w)[-1]
        return jnp.sum(combined.astype(jnp.float32) * ct.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))


def low_latency_round_trip(buf, mesh, hook):
    """jit-able (x, topk_idx, topk_weights) -> (recv_x, recv_count, row_of_slot, combined):
    low-latency dispatch (FP8) -> dequantize -> combine, fused or hooked."""
    def body(x, idx, w):
        if hook:
            out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, idx, fp8=True))
        else:
            out = buf.low_latency_dispatch(x, idx, fp8=True)
        y = jax_ep.dequantize_fp8(out.recv_x, out.recv_scales, x.dtype)
        if hook:
            combined = buf.low_latency_combine_recv(buf.low_latency_combine_send(y, idx, w, out.handle))
        else:
            combined = buf.low_latency_combine(y, idx, w, out.handle)
        return out.recv_x.astype(jnp.float32), out.recv_count, out.handle.row_of_slot, combined
    return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 4)


def check(num_ranks):

    print(f"process {jax.process_index()}: {jax.local_devices()} of {jax.device_count()}", flush=True)
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    cuda = jax_ep.Buffer(mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN, backend="cuda",
                         max_tokens_per_rank=128)
    ref = jax_ep.Buffer(mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN, backend="reference",
                        max_tokens_per_rank=128)
    sharding = NamedSharding(mesh, P("ep"))
    x, idx, w, ct = (jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
                     for a in global_inputs(num_ranks))
    for layout in ("rank", "expert"):
        print(f"{layout} layout: dispatch + combine", flush=True)
        got = jax.jit(round_trip(cuda, mesh, layout))(x, idx, w)
        want = jax.jit(round_trip(ref, mesh, layout))(x, idx, w)
        for name, g, v in zip(OUTPUTS[:-1], got[:-1], want[:-1]):
            np.testing.assert_array_equal(local(g), local(v), err_msg=f"{layout} layout: {name}")
        np.testing.assert_array_equal(local(got[-1]), local(want[-1]),
                                      err_msg=f"{layout} layout: combine")
        print(f"{layout} layout: gradients", flush=True)
        got = jax.jit(gradients(cuda, mesh, layout))(x, w, idx, ct)
        want = jax.jit(gradients(ref, mesh, layout))(x, w, idx, ct)
        for name, g, v in zip(("d x", "d topk_weights"), got, want):
            g, v = local(g), local(v)
            assert np.linalg.norm(g - v) <= 1e-2 * np.linalg.norm(v), (
                f"{layout} layout: {name} differs: |cuda - reference| = {np.linalg.norm(g - v)}, "
                f"|reference| = {np.linalg.norm(v)}")
    want = jax.jit(low_latency_round_trip(ref, mesh, False))(x, idx, w)
    for hook in (False, True):
        print(f"low latency (hook={hook})", flush=True)
        got = jax.jit(low_latency_round_trip(cuda, mesh, hook))(x, idx, w)
        count = local(got[1])
        np.testing.assert_array_equal(count, local(want[1]), err_msg="recv_count")
        np.testing.assert_array_equal(local(got[2]), local(want[2]), err_msg="row_of_slot")
        valid = np.arange(got[0].shape[1])[None, :] < count[:, None]
        np.testing.assert_array_equal(local(got[0])[valid], local(want[0])[valid], err_msg="recv_x")
        # FP8 rows: XLA:GPU rounds some FP8 subnormal ties unlike the kernels (see
        # tests/test_gpu_low_latency.py), so the combined rows may differ in the last bit.
        np.testing.assert_allclose(local(got[3]), local(want[3]), rtol=2 ** -6, atol=1e-2,
                                   err_msg="low-latency combine")
    cuda.check()


def check_silent_rank(num_ranks):
    """The last rank makes its Buffers and compiles the programs (XLA may share autotuning
    between the processes that compile a program), then runs none of them. The others'
    low-latency ops with mask=True mask it after timeout_s, report it in masked_ranks() and
    keep going without it (fused, then hooked, without waiting again); with mask=False an op
    fails: poisoned outputs and an error naming the op and the rank."""
    silent, me = num_ranks - 1, jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    local_experts = NUM_EXPERTS // num_ranks
    make = lambda: jax_ep.Buffer(mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN,  # noqa: E731
                                 backend="cuda", max_tokens_per_rank=128, timeout_s=3.0)
    sync("silent_rank")
    masking, failing = make(), make()
    client = distributed.global_state.client
    x, idx, w, _ = global_inputs(num_ranks)
    sharding = NamedSharding(mesh, P("ep"))
    args = [jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
            for a in (x, idx, w)]
    masked = [(name, jax.jit(silent_rank_round_trip(masking, mesh, hook)))
              for name, hook in (("fused", False), ("hooked", True))]
    unmasked = unmasked_recv_count(failing, mesh)
    if me == silent:
        for _, f in masked:
            f.lower(*args).compile()
        unmasked.lower(*args[:2]).compile()
    else:
        live = (np.arange(num_ranks * NUM_TOKENS) // NUM_TOKENS) != silent  # source of a token
        owner = np.where(idx >= 0, idx // local_experts, -1)
        mine = slice(me * NUM_TOKENS, (me + 1) * NUM_TOKENS)
        want_count = np.bincount(idx[live][owner[live] == me] - me * local_experts,
                                 minlength=local_experts)
        held = (owner[mine] >= 0) & (owner[mine] != silent)
        want = x[mine].astype(np.float32) * (w[mine] * held).sum(1, keepdims=True)
        check_silent_rank_results(masked, args, unmasked, masking, failing, silent=silent,
                                  want_count=want_count, want=want, op="low-latency dispatch")
    client.wait_at_barrier("mp_worker/silent_rank_checked", 300_000)
    masking.close()
    failing.close()


def check_late_and_dead_rank(num_ranks):
    """Normal mode, no hangs. (1) The last rank runs its first dispatch + combine 5 s after
    the others (timeout_s=60): they wait for it, and every output equals the reference.
    (2) The last rank then exits abruptly (os._exit, no close): the others' next dispatch
    gives up after timeout_s=3 s, with poisoned outputs and a Buffer.check() error that names
    the op and the rank, within the limit; closing waits for the dead peer only briefly
    (a warning names it). (3) A Buffer the dead rank never creates fails within its
    timeout_s, naming the process; the worker finishes ("ok"). JAX's own shutdown barrier at
    exit then fails for want of the dead process (see test_gpu_multiprocess.py)."""
    late, me = num_ranks - 1, jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    make = lambda backend, timeout_s: jax_ep.Buffer(  # noqa: E731
        mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN, backend=backend,
        max_tokens_per_rank=128, timeout_s=timeout_s)
    patient, quick, ref = make("cuda", 60.0), make("cuda", 3.0), make("reference", 60.0)
    sharding = NamedSharding(mesh, P("ep"))
    x, idx, w, _ = (jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
                    for a in global_inputs(num_ranks))
    late_round_trip = jax.jit(round_trip(patient, mesh, "expert")).lower(x, idx, w).compile()
    doomed = jax.jit(jax.shard_map(lambda x, i, w: dispatch_outputs(quick, x, i, w), mesh=mesh,
                                   in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 2))
    doomed = doomed.lower(x, idx, w).compile()  # every rank compiles what the others run
    if me == late:
        time.sleep(5.0)
    print(f"rank {late} joins late", flush=True)
    got = late_round_trip(x, idx, w)
    want = jax.jit(round_trip(ref, mesh, "expert"))(x, idx, w)
    for name, g, v in zip(OUTPUTS, got, want):
        np.testing.assert_array_equal(local(g), local(v), err_msg=f"late rank: {name}")
    patient.check()
    client = distributed.global_state.client
    client.wait_at_barrier("mp_worker/late_rank_checked", 300_000)
    message = die_then_fail(me, late, lambda: doomed(x, idx, w), quick)
    assert f"rank {late}" in message, message
    close_after_failure(quick, patient)
    ref.close()
    check_never_joins(mesh, late)


def die_then_fail(me, dead, doomed_dispatch, buf):
    """Rank `dead` exits at once (os._exit, no close); every other rank runs
    doomed_dispatch() -> (recv_x, num_recv_tokens), which must come back poisoned (NaN, -1)
    within 30 s (the Buffer's timeout_s is 3 s), and `buf.check()` must raise a dispatch
    error. Returns the error's message."""
    if me == dead:
        print(f"rank {dead} dies", flush=True)
        os._exit(0)
    start = time.monotonic()
    recv_x, num_recv = doomed_dispatch()
    assert np.all(np.isnan(local(recv_x))) and np.all(local(num_recv) == -1), "poisoned outputs"
    try:
        buf.check()
        raise AssertionError("Buffer.check() must report the dead rank")
    except RuntimeError as err:
        message = str(err)
    assert "dispatch" in message, message
    elapsed = time.monotonic() - start
    print(f"the failure was reported after {elapsed:.1f} s: {message}", flush=True)
    assert elapsed < 30, f"the dead rank was reported after {elapsed:.1f} s (timeout_s=3)"
    return message


def check_never_joins(mesh, dead, **kwargs):
    """After rank `dead` died: a Buffer(mesh, ..., timeout_s=3, **kwargs) that it can never
    create fails in the others within 30 s with a RuntimeError naming its process."""
    start = time.monotonic()
    try:
        jax_ep.Buffer(mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN, backend="cuda",
                      max_tokens_per_rank=128, timeout_s=3.0, **kwargs)
        raise AssertionError("a Buffer that a dead process never creates must fail")
    except RuntimeError as err:
        message = str(err)
    elapsed = time.monotonic() - start
    print(f"a Buffer without rank {dead} failed after {elapsed:.1f} s: {message}", flush=True)
    assert f"process(es) {dead} " in message and "did not create" in message, message
    assert elapsed < 30, f"creating a Buffer without a dead rank took {elapsed:.1f} s"


def sync(name):
    """A barrier of every process (before a Buffer whose short timeout_s also bounds its
    creation, so that start-up skew cannot fail it)."""
    distributed.global_state.client.wait_at_barrier(f"mp_worker/{name}", 300_000)


def close_after_failure(*buffers):
    """Close `buffers` (a dead peer never closes its side): within 10 s. Returns the
    warnings the closes emitted."""
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for buf in buffers:
            buf.close()
    elapsed = time.monotonic() - start
    print(f"closed after {elapsed:.1f} s: {[str(w.message)[:160] for w in caught]}", flush=True)
    assert elapsed < 10, f"closing after a failure took {elapsed:.1f} s"
    return caught


def dispatch_outputs(buf, x, idx, w):
    out = buf.dispatch(x, idx, w)
    return out.recv_x.astype(jnp.float32), out.num_recv_tokens[None]


def check_internode(num_ranks, per_node):
    """Internode mode: the EP ranks split into "virtual nodes" of `per_node` GPUs of this host
    (NVSHMEM between them, NVLink inside). Every output, the combine included (the reference
    sums in the same hierarchical order), equals the reference bit for bit; then the
    gradients, the hooked halves, node-limited routing, a bias, repeated identical calls, an
    FP8 dispatch and back-to-back calls with changing routing."""
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    make = lambda backend: jax_ep.Buffer(mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN,  # noqa: E731
                                         backend=backend, max_tokens_per_rank=128,
                                         num_ranks_per_node=per_node)
    cuda, ref = make("cuda"), make("reference")
    sharding = NamedSharding(mesh, P("ep"))
    put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])  # noqa: E731
    x, idx, w, ct = (put(a) for a in global_inputs(num_ranks))
    for layout in ("rank", "expert"):
        print(f"internode, {layout} layout: dispatch + combine", flush=True)
        got = jax.block_until_ready(jax.jit(round_trip(cuda, mesh, layout))(x, idx, w))
        cuda.check()
        want = jax.jit(round_trip(ref, mesh, layout))(x, idx, w)
        for name, g, v in zip(OUTPUTS, got, want):
            np.testing.assert_array_equal(local(g), local(v), err_msg=f"internode {layout}: {name}")
        print(f"internode, {layout} layout: gradients", flush=True)
        got = jax.jit(gradients(cuda, mesh, layout))(x, w, idx, ct)
        want = jax.jit(gradients(ref, mesh, layout))(x, w, idx, ct)
        for name, g, v in zip(("d x", "d topk_weights"), got, want):
            np.testing.assert_array_equal(local(g), local(v), err_msg=f"internode {layout}: {name}")
    print("internode: the hooked halves (send, matmul, receive) in both layouts", flush=True)
    for layout in ("rank", "expert"):
        got = jax.block_until_ready(jax.jit(round_trip(cuda, mesh, layout, hook=True))(x, idx, w))
        cuda.check()
        want = jax.jit(round_trip(ref, mesh, layout))(x, idx, w)
        for name, g, v in zip(OUTPUTS, got, want):
            np.testing.assert_array_equal(local(g), local(v), err_msg=f"hooked {layout}: {name}")
    check_hook_misuse(make, mesh, x, idx, w)
    check_internode_routings(cuda, ref, mesh, put, num_ranks, per_node, x, w)
    print("internode: FP8 dispatch", flush=True)
    def fp8_dispatch(buf):
        def body(x, idx, w):
            q, scales = jax_ep.quantize_fp8(x)
            out = buf.dispatch((q, scales), idx, w)
            return out.recv_x[0].astype(jnp.float32), out.recv_x[1], out.num_recv_tokens[None]
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 3))
    got = jax.block_until_ready(fp8_dispatch(cuda)(x, idx, w))
    cuda.check()
    for g, v in zip(got, fp8_dispatch(ref)(x, idx, w)):
        np.testing.assert_array_equal(local(g), local(v), err_msg="internode FP8 dispatch")
    print("internode: 20 calls with changing routing, bf16 and f32 in turn, fused and hooked",
          flush=True)
    xs = (x, x.astype(jnp.float32))
    steps_cuda = [jax.jit(round_trip(cuda, mesh, "expert", hook=hook)) for hook in (False, True)]
    step_ref = jax.jit(round_trip(ref, mesh, "expert"))
    rng = np.random.default_rng(1)
    for i in range(20):
        idx_i = put(np.argsort(rng.random((num_ranks * NUM_TOKENS, NUM_EXPERTS)), axis=1)[:, :TOPK]
                    .astype(np.int32))
        got = jax.block_until_ready(steps_cuda[i // 2 % 2](xs[i % 2], idx_i, w))
        cuda.check()
        want = step_ref(xs[i % 2], idx_i, w)
        np.testing.assert_array_equal(local(got[-1]), local(want[-1]), err_msg=f"call {i}: combine")
        np.testing.assert_array_equal(local(got[0]), local(want[0]), err_msg=f"call {i}: recv_x")
    cuda.check()
    cuda.close()


def check_internode_dead_rank(num_ranks, per_node):
    """Internode mode, no hangs: after a first round trip, the last rank exits abruptly
    (os._exit, no close). The others' next dispatch gives up after timeout_s=3 s with
    poisoned outputs and a Buffer.check() error naming the dispatch and a rank (the dead one,
    or a peer that failed waiting for it); closing does not wait for the dead process in
    NVSHMEM (a warning says the memory stays allocated); an internode Buffer the dead rank
    never creates fails within its timeout_s, naming the process; the worker finishes ("ok").
    """
    dead, me = num_ranks - 1, jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    sync("internode_dead_rank")
    buf = jax_ep.Buffer(mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN, backend="cuda",
                        max_tokens_per_rank=128, num_ranks_per_node=per_node, timeout_s=3.0)
    sharding = NamedSharding(mesh, P("ep"))
    x, idx, w, _ = (jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
                    for a in global_inputs(num_ranks))
    step = jax.jit(jax.shard_map(lambda x, i, w: dispatch_outputs(buf, x, i, w), mesh=mesh,
                                 in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 2))
    recv_x, _ = jax.block_until_ready(step(x, idx, w))
    buf.check()
    assert not np.any(np.isnan(local(recv_x))), "the first dispatch is complete"
    sync("internode_first_dispatch")
    message = die_then_fail(me, dead, lambda: step(x, idx, w), buf)
    assert "waited more than 3" in message, message
    caught = close_after_failure(buf)
    assert any("stays allocated" in str(w.message) for w in caught), caught
    check_never_joins(mesh, dead, num_ranks_per_node=per_node)


def node_limited_routing(rng, num_ranks, per_node, max_nodes):
    """topk_idx [R*T, K] int32 whose every token selects distinct experts of at most
    `max_nodes` nodes (DeepEP's node-limited routing), 1/8 of the slots -1."""
    num_nodes = num_ranks // per_node
    per_node_experts = NUM_EXPERTS // num_nodes
    idx = np.empty((num_ranks * NUM_TOKENS, TOPK), np.int32)
    for t in range(idx.shape[0]):
        nodes = rng.choice(num_nodes, size=min(max_nodes, num_nodes), replace=False)
        pool = np.concatenate([np.arange(n * per_node_experts, (n + 1) * per_node_experts)
                               for n in nodes])
        idx[t] = rng.choice(pool, size=TOPK, replace=False)
    idx[rng.random(idx.shape) < 1 / 8] = -1
    return idx


def check_internode_routings(cuda, ref, mesh, put, num_ranks, per_node, x, w):
    """Internode round trips against the reference, bit for bit: node-limited routing (every
    token to one node, then to at most two), combine with a bias, and the same call three
    times with identical outputs (sha256 of every output of this shard)."""
    rng = np.random.default_rng(2)
    for max_nodes in (1, 2):
        print(f"internode: node-limited routing (at most {max_nodes} node(s) per token)",
              flush=True)
        idx = put(node_limited_routing(rng, num_ranks, per_node, max_nodes))
        for layout in ("rank", "expert"):
            got = jax.block_until_ready(jax.jit(round_trip(cuda, mesh, layout))(x, idx, w))
            cuda.check()
            want = jax.jit(round_trip(ref, mesh, layout))(x, idx, w)
            for name, g, v in zip(OUTPUTS, got, want):
                np.testing.assert_array_equal(
                    local(g), local(v), err_msg=f"{max_nodes} node(s), {layout}: {name}")
    print("internode: combine with a bias; three identical calls", flush=True)
    idx = put(node_limited_routing(rng, num_ranks, per_node, num_ranks))
    step = jax.jit(round_trip(cuda, mesh, "rank", bias=True))
    want = jax.jit(round_trip(ref, mesh, "rank", bias=True))(x, idx, w)
    digests = set()
    for _ in range(3):
        got = jax.block_until_ready(step(x, idx, w))
        cuda.check()
        for name, g, v in zip(OUTPUTS, got, want):
            np.testing.assert_array_equal(local(g), local(v), err_msg=f"bias: {name}")
        digests.add(hashlib.sha256(b"".join(local(g).tobytes() for g in got)).hexdigest())
    assert len(digests) == 1, f"three identical calls gave {len(digests)} different outputs"


def check_hook_misuse(make, mesh, x, idx, w):
    """An op between a hooked send and its receive is refused at run time, naming the rule
    (never run on the send's staging); the Buffer is closed then (its send never finished)."""
    print("internode: an op between a hooked send and its receive", flush=True)
    buf = make("cuda")
    def body(x, idx, w):
        pending, x = jax.lax.optimization_barrier((buf.dispatch_send(x, idx, w), x))
        other = buf.dispatch(x, idx, w).recv_x  # after the send, before its receive: refused
        pending, other = jax.lax.optimization_barrier((pending, other))
        return buf.dispatch_recv(pending).recv_x + other
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
    try:
        jax.block_until_ready(fn(x, idx, w))
    except Exception as err:  # XLA's runtime error carries the handler's message
        assert "hooked dispatch_send of Buffer" in str(err) and "in flight" in str(err), str(err)
    else:
        raise AssertionError("an op between a hooked send and its receive ran")
    buf.close()


def main():
    def add_arguments(parser):
        parser.add_argument("--internode", action="store_true",
                            help="check the internode mode (virtual nodes) instead")
        parser.add_argument("--failures", action="store_true",
                            help="check a late and a dead rank in normal mode instead (with "
                                 "--internode: a dead rank in internode mode)")

    args = mp_common.parse_args(add_arguments)
    per_node = mp_common.ranks_per_node(args)

    def body():
        if args.internode and args.failures:
            check_internode_dead_rank(args.num, per_node)
        elif args.internode:
            check_internode(args.num, per_node)
        elif args.failures:
            check_late_and_dead_rank(args.num)
        else:
            check(args.num)
            check_silent_rank(args.num)

    mp_common.run(args, body)


if __name__ == "__main__":
    main()
