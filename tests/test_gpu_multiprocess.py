"""The CUDA backend with one process per GPU (jax.distributed, CUDA IPC between processes).

Launches N = min(8, GPUs) processes of tests/mp_worker.py, each driving one GPU; each checks
its own shard against the reference backend and exits non-zero on a mismatch. Run on a GPU
machine with `python -m pytest -m gpu tests/test_gpu_multiprocess.py`.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

import jax_ep

pytestmark = pytest.mark.gpu

# Start, compile and run of all workers (JAX_EP_MP_TIMEOUT_S to change it).
TIMEOUT_S = float(os.environ.get("JAX_EP_MP_TIMEOUT_S", "300"))
# A command that runs each worker, e.g. "compute-sanitizer --tool memcheck" (gpu_suite.sh).
WRAPPER = shlex.split(os.environ.get("JAX_EP_MP_WRAPPER", ""))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env():
    """This environment, plus the settings of the workers and the import path of the jax_ep
    (with its extension jax_ep._cuda) this process uses."""
    paths = [str(Path(jax_ep.__file__).resolve().parents[1])]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    # Each worker takes half of its GPU up front (conftest turns that off for this process).
    # NVSHMEM on one host: its bootstrap over loopback, no network transport.
    return dict(os.environ, NCCL_NVLS_ENABLE="0", NVSHMEM_DISABLE_NVLS="1",
                NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo", NVSHMEM_REMOTE_TRANSPORT="none",
                XLA_PYTHON_CLIENT_PREALLOCATE="true", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5",
                PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(paths))


def test_one_process_per_gpu_matches_reference(tmp_path):
    _run_workers(tmp_path)


# Virtual node layouts of the internode tests: GPUs per node as a function of the workers.
NODE_LAYOUTS = {"2 nodes": lambda n: n // 2, "nodes of 2 GPUs": lambda n: 2,
                "1 GPU per node": lambda n: 1}


def ranks_per_node(nodes):
    """GPUs per virtual node for the layout `nodes` (a key of NODE_LAYOUTS) on this machine;
    skips a layout that is an earlier one's on this GPU count (on 4 GPUs "nodes of 2 GPUs" is
    "2 nodes") or that does not split the workers into several nodes."""
    num = _num_workers()
    per_node = NODE_LAYOUTS[nodes](num)
    first = next(name for name, f in NODE_LAYOUTS.items() if f(num) == per_node)
    if first != nodes:
        pytest.skip(f"with {num} GPUs, {nodes} is the layout {first!r}")
    if per_node < 1 or per_node >= num or num % per_node:
        pytest.skip(f"{nodes} does not split {num} GPUs into several nodes")
    return per_node


@pytest.mark.parametrize("nodes", list(NODE_LAYOUTS))
def test_internode_virtual_nodes_match_reference(tmp_path, nodes):
    """The internode mode over NVSHMEM, with the GPUs of this host split into 2 nodes, into
    nodes of 2 GPUs, or into nodes of one GPU each (every rank's peers across the
    "network"): 2 x 2 and 4 x 1 on 4 GPUs; 2 x 4, 4 x 2 and 8 x 1 on 8."""
    _run_workers(tmp_path, "--internode", "--num-ranks-per-node", str(ranks_per_node(nodes)))


def test_internode_puts_match_reference(tmp_path):
    """2 virtual nodes with every network-leg row sent by NVSHMEM put with signal
    (JAX_EP_INTERNODE_PUTS=1), the path of nodes that NVSHMEM cannot map (a real network);
    without it the virtual nodes of one host write into each other's staging over NVLink."""
    _run_workers(tmp_path, "--internode", "--num-ranks-per-node", str(ranks_per_node("2 nodes")),
                 extra_env={"JAX_EP_INTERNODE_PUTS": "1"})


def test_internode_dead_rank_is_reported_and_close_does_not_hang(tmp_path):
    """A rank that dies in internode mode: the others' next dispatch fails after timeout_s
    naming the op; close() leaves NVSHMEM's memory allocated instead of waiting forever in
    the collective nvshmem_free; a Buffer the dead rank never creates fails after timeout_s
    naming it; the workers finish (JAX's shutdown abort as above)."""
    _run_workers(tmp_path, "--internode", "--failures", jax_shutdown_abort_ok=True)


def test_late_and_dead_rank_are_waited_for_then_reported(tmp_path):
    """A rank 5 s late is waited for; a rank that died is reported (op and rank) after
    timeout_s by the others, which then close their Buffers within seconds, fail to create a
    Buffer without it within timeout_s (naming it) and finish ("worker I: ok"). At exit JAX itself may end a survivor: jax.distributed's shutdown
    barrier fails for want of the dead process and its coordination service aborts the
    process (SIGABRT, "Shutdown barrier has failed"); that, and only that, is accepted."""
    _run_workers(tmp_path, "--failures", jax_shutdown_abort_ok=True)


def _num_workers():
    """min(8, GPUs) (8: one NVLink domain); skips the test with fewer than 2 GPUs."""
    num_gpus = len([d for d in jax.devices() if d.platform == "gpu"])
    if num_gpus < 2:
        pytest.skip(f"needs 2 GPUs, found {num_gpus}")
    return min(8, num_gpus)


def _run_workers(tmp_path, *extra, jax_shutdown_abort_ok=False, worker="mp_worker.py",
                 extra_env=None):
    """Runs N processes of tests/`worker` (--rank I --num N --port P, then `extra`), with
    `extra_env` added to their environment."""
    num = _num_workers()
    port = _free_port()
    worker = Path(__file__).with_name(worker)
    env = dict(_worker_env(), **(extra_env or {}))
    logs = [tmp_path / f"worker{i}.log" for i in range(num)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [*WRAPPER, sys.executable, str(worker), "--rank", str(i), "--num", str(num),
                     "--port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:  # until all exit, one fails, or time is up
            codes = [p.poll() for p in procs]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(1)
    finally:
        killed = [i for i, p in enumerate(procs) if p.poll() is None]
        for i in killed:
            procs[i].kill()
            procs[i].wait()
    codes = [p.returncode for p in procs]
    report = "\n".join(f"===== worker {i} (exit code {code}) =====\n{log.read_text()}"
                       for i, (code, log) in enumerate(zip(codes, logs)))
    if jax_shutdown_abort_ok:
        codes = [0 if code == -signal.SIGABRT and f"worker {i}: ok" in log.read_text()
                 and "Shutdown barrier has failed" in log.read_text() else code
                 for i, (code, log) in enumerate(zip(codes, logs))]
    assert codes == [0] * num, (
        f"worker exit codes {codes}; killed: {killed} (after another worker failed, or still "
        f"running after {TIMEOUT_S} s). Outputs:\n{report}")
