"""Varying-manual-axes (vma) types inside `shard_map`.

Inside `jax.shard_map` every value records the mesh axes along which it varies. A custom
VJP must return each cotangent with its primal's type, and a Pallas kernel's result carries
no vma of its own; these helpers give values the type they need. Outside shard_map every
vma is empty and both are no-ops.
"""

from __future__ import annotations

import jax


def vma(a) -> frozenset:
    """The mesh axes `a` varies along (empty outside shard_map)."""
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def varying_like(a, *likes):
    """`a` marked varying along every axis that one of `likes` varies along."""
    missing = tuple(sorted(set().union(*(vma(b) for b in likes)) - vma(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def cotangent_like(ct, primal):
    """A cotangent with `primal`'s vma: summed over the axes ct varies along but primal
    does not (the primal is replicated there, so its gradient is the sum of the shards'),
    marked varying along the axes primal varies along and ct does not."""
    extra = tuple(sorted(vma(ct) - vma(primal)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return varying_like(ct, primal)
