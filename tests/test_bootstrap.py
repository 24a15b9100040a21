"""jax_ep.bootstrap on CPU: processes simulated by threads, with an in-memory key-value client
and a fake CUDA extension that records its calls."""

import threading
import time
import warnings
from collections import namedtuple

import pytest

import jax_ep
from jax_ep import bootstrap

Device = namedtuple("Device", "id process_index local_hardware_id")
SIZES = dict(max_tokens=128, hidden=7168, max_topk=16, num_experts=64, timeout_s=30.0)
LOW_LATENCY_MAX_TOKENS = 128
TIMEOUT_S = 2.0  # waits that succeed
SHORT_S = 0.3  # waits that are meant to time out


class FakeStore:
    """The coordination service: key-values and barriers shared by every FakeClient."""

    def __init__(self):
        self.cond = threading.Condition()
        self.values = {}
        self.barriers = {}  # barrier id -> processes that arrived
        self.log = []  # (process, event, details) of every client and cuda call, in time order

    def record(self, process, event, *details):
        with self.cond:
            self.log.append((process, event, details))

    def events(self, process):
        return [(event, details) for p, event, details in self.log if p == process]


class FakeClient:
    """The jax.distributed client of one process (the subset jax_ep uses)."""

    def __init__(self, store, process_index):
        self.store = store
        self.process_index = process_index

    def _set(self, key, value):
        with self.store.cond:
            if key in self.store.values:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.store.values[key] = value
            self.store.cond.notify_all()

    def _get(self, key, timeout_ms):
        with self.store.cond:
            if not self.store.cond.wait_for(lambda: key in self.store.values, timeout_ms / 1000):
                raise TimeoutError(f"DEADLINE_EXCEEDED: key {key}")
            return self.store.values[key]

    def key_value_set(self, key, value):
        assert isinstance(value, str)
        self._set(key, value)

    def key_value_set_bytes(self, key, value):
        assert isinstance(value, bytes)
        self._set(key, value)

    def blocking_key_value_get(self, key, timeout_ms):
        return self._get(key, timeout_ms)

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        return self._get(key, timeout_ms)

    def wait_at_barrier(self, barrier_id, timeout_ms, process_ids):
        assert self.process_index in process_ids
        with self.store.cond:
            arrived = self.store.barriers.setdefault(barrier_id, set())
            arrived.add(self.process_index)
            self.store.cond.notify_all()
            if not self.store.cond.wait_for(lambda: arrived >= set(process_ids),
                                            timeout_ms / 1000):
                raise TimeoutError(f"DEADLINE_EXCEEDED: barrier {barrier_id}")
            self.store.log.append((self.process_index, "barrier", (barrier_id,)))


class FakeCuda:
    """jax_ep_cuda's multi-process subset, for one process; calls go to the store's log."""

    def __init__(self, store, process_index, fail_create=False, close_delay_s=0.0):
        self.store = store
        self.process_index = process_index
        self.fail_create = fail_create
        self.close_delay_s = close_delay_s

    def create_local(self, buffer_id, group_key, device_ordinal, rank, num_ranks, max_tokens,
                     hidden, max_topk, num_experts, timeout_s):
        if self.fail_create:
            raise RuntimeError("cudaMalloc: out of memory")
        self.store.record(self.process_index, "create_local", buffer_id, group_key,
                          device_ordinal, rank, num_ranks,
                          dict(max_tokens=max_tokens, hidden=hidden, max_topk=max_topk,
                               num_experts=num_experts, timeout_s=timeout_s))
        return handle_of(buffer_id, group_key, rank)

    def connect_peers(self, buffer_id, device_ordinal, handles, local_ordinals):
        self.store.record(self.process_index, "connect_peers", buffer_id, device_ordinal,
                          list(handles), list(local_ordinals))

    def close_peers(self, buffer_id):
        time.sleep(self.close_delay_s)
        self.store.record(self.process_index, "close_peers", buffer_id)

    def destroy(self, buffer_id):
        self.store.record(self.process_index, "destroy", buffer_id)


def handle_of(buffer_id, group_key, rank):
    return f"ipc {buffer_id} {group_key} {rank}".encode().ljust(64, b"\0")


def run_processes(processes, target):
    """target(p) in one thread per process p; {p: result or the exception it raised}."""
    results = {}

    def main(p):
        try:
            results[p] = target(p)
        except Exception as err:
            results[p] = err

    threads = [threading.Thread(target=main, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive(), "a simulated process hangs"
    return results


def connect_all(store, groups, processes, sizes=lambda p: SIZES, hosts=lambda p: "host0",
                cudas=None, buffer_id=1, timeout_s=TIMEOUT_S,
                low_latency_max_tokens=lambda p: LOW_LATENCY_MAX_TOKENS):
    cudas = cudas or {p: FakeCuda(store, p) for p in processes}
    return run_processes(processes, lambda p: bootstrap.connect_processes(
        FakeClient(store, p), cudas[p], buffer_id, p, groups, "ep", sizes(p),
        timeout_s=timeout_s, host=hosts(p), low_latency_max_tokens=low_latency_max_tokens(p)))


def one_group_per_gpu(num):
    """num processes with one GPU each (ordinal 0), one EP group over all of them."""
    return [[Device(id=p, process_index=p, local_hardware_id=0) for p in range(num)]]


def two_groups_two_gpus_per_process():
    """(dp=2, ep=2) over 2 processes of 2 GPUs: each EP group has a GPU in each process."""
    devices = [Device(id=i, process_index=i // 2, local_hardware_id=i % 2) for i in range(4)]
    return [[devices[0], devices[2]], [devices[1], devices[3]]]


@pytest.mark.parametrize("groups", [one_group_per_gpu(4), one_group_per_gpu(2),
                                    two_groups_two_gpus_per_process()],
                         ids=["4x1", "2x1", "2x2"])
def test_connect_connects_every_local_device_with_every_rank_handle(groups):
    store = FakeStore()
    processes = sorted({d.process_index for group in groups for d in group})
    results = connect_all(store, groups, processes)
    assert results == {p: processes for p in processes}
    for p in processes:
        events = store.events(p)
        created = [details for event, details in events if event == "create_local"]
        connected = [details for event, details in events if event == "connect_peers"]
        expected_created, expected_connected = [], []
        for index, group in enumerate(groups):
            local_ordinals = [d.local_hardware_id if d.process_index == p else -1 for d in group]
            handles = [handle_of(1, index, rank) for rank in range(len(group))]
            for rank, d in enumerate(group):
                if d.process_index == p:
                    expected_created.append((1, index, d.local_hardware_id, rank, len(group),
                                             SIZES))
                    expected_connected.append((1, d.local_hardware_id, handles, local_ordinals))
        assert created == expected_created
        assert sorted(connected) == sorted(expected_connected)
        assert events[-1] == ("barrier", ("jax_ep/1/connected/" + "-".join(map(str, processes)),))
        assert not [event for event, _ in events if event in ("close_peers", "destroy")]


def test_process_without_device_in_mesh_creates_nothing():
    store = FakeStore()
    results = connect_all(store, one_group_per_gpu(2), [0, 1, 2])
    assert results == {0: [0, 1], 1: [0, 1], 2: []}
    assert store.events(2) == []


def test_config_mismatch_names_field_values_and_processes():
    store = FakeStore()
    results = connect_all(store, one_group_per_gpu(3), [0, 1, 2],
                          sizes=lambda p: dict(SIZES, hidden=4096) if p == 1 else SIZES)
    for p in (0, 1, 2):
        assert isinstance(results[p], ValueError), results[p]
    assert str(results[0]) == (
        "process 1 created Buffer 1 with hidden=4096 but process 0 with hidden=7168; every "
        "process must create its Buffers with the same arguments, in the same order.")
    assert "process 0 created Buffer 1 with hidden=7168 but process 1 with hidden=4096" \
        in str(results[1])
    assert "process 2 created Buffer 1 with hidden=7168 but process 1 with hidden=4096" \
        in str(results[1])
    assert not [e for e in store.log if e[1] == "create_local"]  # checked before allocating


def test_config_mismatch_in_the_low_latency_cap_names_it():
    """The one-host staging does not depend on it, but every process must cap low-latency ops
    alike (or one refuses an op its peers wait for)."""
    store = FakeStore()
    results = connect_all(store, one_group_per_gpu(2), [0, 1],
                          low_latency_max_tokens=lambda p: 0 if p == 1 else 128)
    assert isinstance(results[0], ValueError), results[0]
    assert str(results[0]).startswith(
        "process 1 created Buffer 1 with low_latency_max_tokens=0 but process 0 with "
        "low_latency_max_tokens=128")
    assert not [e for e in store.log if e[1] == "create_local"]


def test_config_mismatch_in_groups_and_version(monkeypatch):
    store = FakeStore()
    groups = one_group_per_gpu(2)
    swapped = [groups[0][::-1]]
    monkeypatch.setattr(jax_ep, "__version__", "0.0.1")
    results = {}
    process1 = threading.Thread(target=lambda: results.update({1: pytest.raises(
        ValueError, bootstrap.connect_processes, FakeClient(store, 1), FakeCuda(store, 1), 1, 1,
        swapped, "ep", SIZES, timeout_s=TIMEOUT_S, host="host0",
        low_latency_max_tokens=LOW_LATENCY_MAX_TOKENS)}))
    process1.start()
    FakeClient(store, 0).blocking_key_value_get("jax_ep/1/config/1", 1000)  # it published
    monkeypatch.setattr(jax_ep, "__version__", "0.0.2")
    with pytest.raises(ValueError) as err:
        bootstrap.connect_processes(FakeClient(store, 0), FakeCuda(store, 0), 1, 0, groups, "ep",
                                    SIZES, timeout_s=TIMEOUT_S, host="host0",
                                    low_latency_max_tokens=LOW_LATENCY_MAX_TOKENS)
    process1.join()
    assert ("process 1 created Buffer 1 with ep_groups=[[1, 0]] but process 0 with "
            "ep_groups=[[0, 1]]") in str(err.value)
    assert ("process 1 created Buffer 1 with jax_ep_version='0.0.1' but process 0 with "
            "jax_ep_version='0.0.2'") in str(err.value)
    assert ("process 0 created Buffer 1 with jax_ep_version='0.0.2' but process 1 with "
            "jax_ep_version='0.0.1'") in str(results[1].value)


def test_missing_processes_time_out_naming_them():
    store = FakeStore()
    start = time.monotonic()
    results = connect_all(store, one_group_per_gpu(4), [0, 1], timeout_s=SHORT_S)
    assert time.monotonic() - start < 3 * SHORT_S  # one timeout for all missing processes
    for p in (0, 1):
        assert isinstance(results[p], RuntimeError), results[p]
        assert str(results[p]).startswith(
            "Buffer 1: process(es) 2, 3 of the mesh did not create Buffer 1 within 0.3 s.")
    assert not [e for e in store.log if e[1] == "create_local"]


def test_group_spanning_hosts_is_not_implemented():
    store = FakeStore()
    results = connect_all(store, one_group_per_gpu(2), [0, 1], hosts=lambda p: f"node{p}")
    for p in (0, 1):
        assert isinstance(results[p], NotImplementedError), results[p]
        assert "EP group 0 of mesh axis 'ep' spans several hosts (process 0 on node0, " \
               "process 1 on node1)" in str(results[p])
    assert not [e for e in store.log if e[1] == "create_local"]


def test_failure_after_allocating_frees_this_process_memory():
    store = FakeStore()
    cudas = {0: FakeCuda(store, 0), 1: FakeCuda(store, 1, fail_create=True)}
    results = connect_all(store, one_group_per_gpu(2), [0, 1], cudas=cudas, timeout_s=SHORT_S)
    assert str(results[1]) == "cudaMalloc: out of memory"
    assert str(results[0]).startswith("Buffer 1: process 1 did not publish the CUDA IPC handle "
                                      "of rank 1 of EP group 0 within 0.3 s")
    assert [event for event, _ in store.events(0)] == ["create_local", "close_peers", "destroy"]
    assert store.events(1) == []


def test_close_unmaps_everywhere_before_any_process_frees():
    store = FakeStore()
    processes = [0, 1, 2]
    cudas = {p: FakeCuda(store, p, close_delay_s=0.05 * (2 - p)) for p in processes}
    for buffer_id in (1, 2):
        assert connect_all(store, one_group_per_gpu(3), processes, cudas=cudas,
                           buffer_id=buffer_id) == {p: processes for p in processes}
    del store.log[:]
    for buffer_id in (1, 2):
        results = run_processes(processes, lambda p: bootstrap.close_processes(
            FakeClient(store, p), cudas[p], buffer_id, p, processes, TIMEOUT_S))
        assert results == {p: None for p in processes}
        barrier = f"jax_ep/{buffer_id}/closed/0-1-2"
        for p in processes:
            assert store.events(p)[-3:] == [("close_peers", (buffer_id,)), ("barrier", (barrier,)),
                                             ("destroy", (buffer_id,))]
        order = [event for _, event, details in store.log if details[0] == buffer_id]
        assert order.index("destroy") > max(i for i, e in enumerate(order) if e == "close_peers")
    assert set(store.barriers) == {f"jax_ep/{b}/{step}/0-1-2" for b in (1, 2)
                                   for step in ("connected", "closed")}


def test_close_with_dead_peer_warns_and_still_frees():
    store = FakeStore()
    cuda = FakeCuda(store, 0)
    with pytest.warns(RuntimeWarning, match=r"jax_ep Buffer 7: process\(es\) \[1\] did not "
                                            r"confirm within 0.3 s"):
        bootstrap.close_processes(FakeClient(store, 0), cuda, 7, 0, [0, 1], SHORT_S)
    assert store.events(0) == [("close_peers", (7,)), ("destroy", (7,))]


@pytest.fixture
def registry(monkeypatch):
    """An empty registry of open Buffers; the atexit registrations it would make, recorded."""
    registered = []
    monkeypatch.setattr(bootstrap, "_open_buffers", {})
    monkeypatch.setattr(bootstrap, "_atexit_registered", False)
    monkeypatch.setattr(bootstrap.atexit, "register", registered.append)
    return registered


def test_exit_closes_open_buffers_newest_first(registry):
    store = FakeStore()
    client, cuda = FakeClient(store, 0), FakeCuda(store, 0)
    for buffer_id in (1, 2, 3, 4):
        bootstrap.register_buffer(buffer_id, client, cuda, 0, [0])
    assert registry == [bootstrap.close_registered_buffers]  # once, on first registration
    assert bootstrap.unregister_buffer(2) is True
    assert bootstrap.unregister_buffer(2) is False
    bootstrap.close_registered_buffers()
    assert [(event, details) for event, details in store.events(0) if event != "barrier"] == [
        ("close_peers", (4,)), ("destroy", (4,)), ("close_peers", (3,)), ("destroy", (3,)),
        ("close_peers", (1,)), ("destroy", (1,))]
    assert bootstrap.unregister_buffer(1) is False  # closed buffers leave the registry


def test_exit_with_dead_peer_is_bounded_and_closes_every_buffer(registry):
    class FailingCuda(FakeCuda):
        def close_peers(self, buffer_id):
            if buffer_id == 2:
                raise RuntimeError("an illegal memory access was encountered")
            super().close_peers(buffer_id)

    store = FakeStore()
    client, cuda = FakeClient(store, 0), FailingCuda(store, 0)
    for buffer_id in (1, 2, 3):
        bootstrap.register_buffer(buffer_id, client, cuda, 0, [0, 1])  # process 1 is gone
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bootstrap.close_registered_buffers(timeout_s=SHORT_S)
    assert time.monotonic() - start < 3 * SHORT_S  # the buffers share one timeout
    messages = [str(w.message) for w in caught]
    assert sum("did not confirm" in m for m in messages) == 3
    assert "jax_ep: closing Buffer 2 at exit failed: an illegal memory access was encountered" \
        in messages
    assert [details for event, details in store.events(0) if event == "destroy"] == [
        (3,), (2,), (1,)]


def test_after_a_failed_op_closing_waits_for_peers_only_briefly(monkeypatch):
    """Once an op of this process failed (a peer may be dead), a close waits
    FAILED_CLOSE_TIMEOUT_S at most, not the full timeout."""
    monkeypatch.setattr(bootstrap, "_failure_seen", False)
    assert bootstrap.close_timeout(60.0) == 60.0
    bootstrap.record_failure()
    assert bootstrap.close_timeout(60.0) == bootstrap.FAILED_CLOSE_TIMEOUT_S
    assert bootstrap.close_timeout(0.5) == 0.5
