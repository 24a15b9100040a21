"""Low-latency ops of an internode Buffer over NVSHMEM, on the GPUs of this host split into 2
"virtual nodes", nodes of 2 GPUs or nodes of one GPU each (one process per GPU; the layouts of
tests/test_gpu_multiprocess.py).

Launches N = min(8, GPUs) processes of tests/mp_worker_internode_ll.py (as
tests/test_gpu_multiprocess.py launches its workers); each checks its own shard against the
reference backend and numpy oracles, then the last rank goes silent (mask=True masks it,
mask=False fails naming it), and exits non-zero on a mismatch. Run on a GPU machine
with `python -m pytest -m gpu tests/test_gpu_internode_low_latency.py`
(JAX_EP_MP_TIMEOUT_S raises the time limit of the whole run, 300 s by default).
"""

import pytest

from test_gpu_multiprocess import NODE_LAYOUTS, _run_workers, ranks_per_node

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("nodes", list(NODE_LAYOUTS))
def test_internode_low_latency_matches_reference(tmp_path, nodes):
    _run_workers(tmp_path, "--num-ranks-per-node", str(ranks_per_node(nodes)),
                 worker="mp_worker_internode_ll.py")
