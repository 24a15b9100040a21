"""Low-latency ops of an internode Buffer over NVSHMEM, on the GPUs of this host split into 2
"virtual nodes", or into nodes of one GPU each (one process per GPU).

Launches N = min(4, GPUs) processes of tests/mp_worker_internode_ll.py (as
tests/test_gpu_multiprocess.py launches its workers); each checks its own shard against the
reference backend and numpy oracles and exits non-zero on a mismatch. Run on a GPU machine
with `python -m pytest -m gpu tests/test_gpu_internode_low_latency.py`
(JAX_EP_MP_TIMEOUT_S raises the time limit of the whole run, 300 s by default).
"""

import pytest

from test_gpu_multiprocess import _num_workers, _run_workers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("nodes", ["2 nodes", "1 GPU per node"])
def test_internode_low_latency_matches_reference(tmp_path, nodes):
    if nodes == "1 GPU per node" and _num_workers() == 2:
        pytest.skip("with 2 GPUs, 2 nodes are nodes of 1 GPU each")
    per_node = _num_workers() // 2 if nodes == "2 nodes" else 1
    _run_workers(tmp_path, "--num-ranks-per-node", str(per_node),
                 worker="mp_worker_internode_ll.py")
