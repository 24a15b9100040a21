"""scripts/sanitize.py on CPU: the reference pass saves what the cuda pass loads, the
comparison accepts it and rejects changed outputs, and no program of the cuda pass holds an
XLA collective (which would start NCCL in the sanitized process)."""

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

from jax_ep import cuda_backend

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "sanitize.py"
_spec = importlib.util.spec_from_file_location("sanitize", _PATH)
sanitize = sys.modules["sanitize"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sanitize)


def test_reference_pass_saves_inputs_and_outputs_the_comparison_accepts(tmp_path):
    names = ["normal_rank", "low_latency_fp8"]
    assert sanitize.main(["reference", "--out", str(tmp_path), "--ranks", "2", "--cases",
                          *names]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.npz" for n in names)
    by_name = {case.name: case for case in sanitize.CASES}

    normal = by_name["normal_rank"]
    num_ranks, inputs, want = sanitize.load_case(tmp_path, normal)
    assert num_ranks == 2 and set(inputs) == set(normal.inputs)
    assert np.any(inputs["idx"] == -1) and np.all(inputs["idx"] < 16)
    assert sanitize.compare(normal, want, want) == []
    changed = dict(want, combined=want["combined"] + np.float32(2 ** -7))
    assert [p.split(" ")[0] for p in sanitize.compare(normal, changed, want)] == ["combined"]

    # Low latency: rows past recv_count are not compared, rows below are, bit for bit.
    low_latency = by_name["low_latency_fp8"]
    _, _, want = sanitize.load_case(tmp_path, low_latency)
    count = want["recv_count"]
    assert count.min() < want["recv_x"].shape[1]
    past, below = want["recv_x"].copy(), want["recv_x"].copy()
    past[0, count[0]:] = np.nan
    below[0, 0, 0] += 1
    assert sanitize.compare(low_latency, dict(want, recv_x=past), want) == []
    assert len(sanitize.compare(low_latency, dict(want, recv_x=below), want)) == 1


def test_silent_rank_cases_have_no_reference_outputs(tmp_path):
    """The failure-path cases (the last rank never runs them) are checked by what the other
    ranks report, not against saved outputs: the reference pass skips them."""
    silent = [case.name for case in sanitize.CASES if case.silent]
    assert silent, "failure-path cases"
    assert sanitize.main(["reference", "--out", str(tmp_path), "--ranks", "2", "--cases",
                          *silent]) == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not cuda_backend.is_available(), reason="needs jax_ep's CUDA extension")
def test_no_program_of_the_cuda_pass_holds_a_collective():
    """Lowered (not compiled: no GPU here) with a CudaBackend in the Buffers; the reference
    backend's programs hold collectives, so the pattern finds them."""
    mesh = sanitize.make_mesh(4, "cpu")
    reference = sanitize.make_buffers(mesh, "reference")
    cuda = sanitize.make_buffers(mesh, "reference")
    for buf in cuda.values():  # internode Buffers lower to jax_ep._nvshmem's targets
        internode = cuda_backend._internode_module() if buf.config.num_nodes > 1 else None
        buf._backend = cuda_backend.CudaBackend(buf.config, buf.id, internode=internode)
    for case in sanitize.CASES:
        inputs = sanitize.make_inputs(case, 4)
        text = {name: sanitize.lower_case(case, buffers[case.buffer], mesh, inputs,
                                          case.graphs)[0].as_text()
                for name, buffers in (("reference", reference), ("cuda", cuda))}
        assert sanitize.COLLECTIVE.search(text["reference"]), case.name
        assert "jax_ep_" in text["cuda"], case.name
        found = {m.group(0) for m in sanitize.COLLECTIVE.finditer(text["cuda"])}
        assert not found, f"{case.name}: {found}"
    for buf in reference.values():
        buf.close()
    jax.clear_caches()
