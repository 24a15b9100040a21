"""jax_ep.internode on CPU: the process-model check, NVSHMEM's initialisation over the
key-value store, `connect` and `close`, with an in-memory key-value client and a fake NVSHMEM
extension that records its calls; processes are simulated by threads."""

import json
import os
import threading
from collections import namedtuple

import pytest

from jax_ep import internode

Device = namedtuple("Device", "id process_index local_hardware_id")
SIZES = dict(max_tokens=128, low_latency_max_tokens=128, hidden=7168, max_topk=8,
             num_experts=64, timeout_s=30.0)
TIMEOUT_S = 2.0  # waits that succeed
SHORT_S = 0.05  # waits that are meant to time out
REGION = 1 << 30


class FakeClient:
    """The jax.distributed key-value client (the subset internode uses); instances made with
    the same `store` share the values, like the processes of one program."""

    def __init__(self, store=None):
        self.store = store if store is not None else {}
        self.cond = self.store.setdefault("__cond__", threading.Condition())
        self.gets = []  # (key, timeout_ms) of every blocking get

    def _set(self, key, value):
        with self.cond:
            if key in self.store:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.store[key] = value
            self.cond.notify_all()

    def _get(self, key, timeout_ms):
        self.gets.append((key, timeout_ms))
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.store, timeout_ms / 1000):
                raise TimeoutError(f"DEADLINE_EXCEEDED: key {key}")
            return self.store[key]

    def key_value_set(self, key, value):
        assert isinstance(value, str)
        self._set(key, value)

    def key_value_set_bytes(self, key, value):
        assert isinstance(value, bytes)
        self._set(key, value)

    def blocking_key_value_get(self, key, timeout_ms):
        value = self._get(key, timeout_ms)
        assert isinstance(value, str)
        return value

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        value = self._get(key, timeout_ms)
        assert isinstance(value, bytes)
        return value

    def wait_at_barrier(self, barrier_id, timeout_ms, process_ids):
        """Returns once as many threads (one per simulated process, by name) arrived as
        `process_ids` has; TimeoutError after timeout_ms."""
        me = threading.current_thread().name
        with self.cond:
            arrived = self.store.setdefault(("barrier", barrier_id), set())
            arrived.add(me)
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: len(arrived) >= len(process_ids), timeout_ms / 1000):
                raise TimeoutError(f"DEADLINE_EXCEEDED: barrier {barrier_id}")


class FakeNvshmem:
    """jax_ep._nvshmem's bootstrap subset, for one process. `turn`, when given, is an Event
    that `region_bytes` waits for (lets a test run the processes' allocations in order)."""

    def __init__(self, process_index, turn=None):
        self.process_index = process_index
        self.turn = turn
        self.calls = []

    def unique_id(self):
        self.calls.append(("unique_id",))
        return bytes([self.process_index + 1]) * 128  # differs between processes

    def initialize(self, pe, num_pes, unique_id, ordinal):
        self.calls.append(("initialize", pe, num_pes, unique_id, ordinal))

    def region_bytes(self, num_ranks, num_ranks_per_node, max_tokens, low_latency_max_tokens,
                     hidden, max_topk, num_experts):
        if self.turn is not None:
            assert self.turn.wait(10), "never got its turn"
        self.calls.append(("region_bytes", num_ranks, num_ranks_per_node, max_tokens,
                           low_latency_max_tokens, hidden, max_topk, num_experts))
        return REGION + num_ranks

    def create_group(self, buffer_id, ordinal, rank, num_ranks, num_ranks_per_node, pes,
                     puts_only, **sizes):
        self.puts_only = puts_only
        self.low_latency_max_tokens = sizes["low_latency_max_tokens"]
        self.calls.append(("create_group", buffer_id, ordinal, rank, num_ranks,
                           num_ranks_per_node, list(pes), sizes))

    def destroy(self, buffer_id, free_region):
        self.calls.append(("destroy", buffer_id, free_region))

    def finalize(self):
        self.calls.append(("finalize",))
        return True

    def names(self):
        return [call[0] for call in self.calls]


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """A process that has not initialised NVSHMEM and whose environment has no
    NVSHMEM_SYMMETRIC_SIZE (whatever the code sets is undone after the test)."""
    monkeypatch.setattr(internode, "_initialized", False)
    monkeypatch.setattr(internode, "_session", None)
    monkeypatch.setattr(internode, "_open_buffers", set())
    monkeypatch.setattr(internode.atexit, "register", lambda handler: None)
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "recorded so that monkeypatch restores it")
    monkeypatch.delenv("NVSHMEM_SYMMETRIC_SIZE")


def gpus(num):
    """num processes of one GPU each; 2 processes (GPUs) per host, so ordinals 0, 1, 0, 1..."""
    return [Device(id=10 + p, process_index=p, local_hardware_id=p % 2) for p in range(num)]


# check_process_model


def test_process_with_two_devices_of_the_mesh_is_refused():
    d = gpus(3)
    crowded = Device(id=20, process_index=1, local_hardware_id=1)  # a second GPU of process 1
    with pytest.raises(ValueError) as err:
        internode.check_process_model([[d[0], d[1]], [d[2], crowded]], 0, 3, 1)
    message = str(err.value)
    assert "num_ranks_per_node=1 makes this an internode Buffer" in message
    assert "one process per GPU" in message
    assert "process(es) 1 (with 2 GPUs) drive several GPUs" in message
    assert "0 (with" not in message and "2 (with" not in message
    assert "python -m jax_ep.launch" in message


def test_every_crowded_process_is_named():
    devices = [Device(id=i, process_index=i // 2, local_hardware_id=i % 2) for i in range(6)]
    with pytest.raises(ValueError, match=r"process\(es\) 0 \(with 2 GPUs\), 1 \(with 2 GPUs\), "
                                         r"2 \(with 2 GPUs\) drive"):
        internode.check_process_model([devices[:3], devices[3:]], 0, 3, 2)


def test_processes_without_a_device_of_the_mesh_are_refused():
    with pytest.raises(ValueError) as err:
        internode.check_process_model([gpus(2)], 0, 4, 1)
    assert str(err.value).startswith("process(es) [2, 3] hold no device of the mesh")
    assert "cover every process" in str(err.value)


@pytest.mark.parametrize("groups", [[gpus(4)], [gpus(4)[:2], gpus(4)[2:]],
                                    [gpus(4)[::2], gpus(4)[1::2]], [gpus(1)]],
                         ids=["1x4", "2x2", "2x2-strided", "1x1"])
def test_one_device_per_process_passes(groups):
    num_processes = sum(len(group) for group in groups)
    for p in range(num_processes):
        assert internode.check_process_model(groups, p, num_processes, 2) is None


# puts_setting


@pytest.mark.parametrize("value, expected", [(None, "0"), ("0", "0"), ("1", "1")])
def test_puts_setting_reads_jax_ep_internode_puts(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("JAX_EP_INTERNODE_PUTS", raising=False)
    else:
        monkeypatch.setenv("JAX_EP_INTERNODE_PUTS", value)
    assert internode.puts_setting() == expected


def test_puts_setting_refuses_other_values(monkeypatch):
    monkeypatch.setenv("JAX_EP_INTERNODE_PUTS", "yes")
    with pytest.raises(ValueError, match=r"JAX_EP_INTERNODE_PUTS='yes' must be 1 .* or 0"):
        internode.puts_setting()


# initialize_nvshmem


def test_symmetric_size_fits_two_regions_and_nvshmem_own():
    assert internode.symmetric_size(0) == 512 << 20
    assert internode.symmetric_size(REGION) == 2684354560  # 2 GiB + 512 MiB


def test_process_0_publishes_the_unique_id_and_every_process_uses_it(monkeypatch):
    store = {}
    nvshmems = [FakeNvshmem(p) for p in range(3)]
    clients = [FakeClient(store) for _ in range(3)]
    for p in range(3):  # 3 processes, one after the other (process 0 first)
        monkeypatch.setattr(internode, "_initialized", False)
        internode.initialize_nvshmem(clients[p], nvshmems[p], p, 3, p % 2, REGION, 1.5)
        assert internode._initialized is True
    unique_id = bytes([1]) * 128  # process 0's
    assert store[internode.UNIQUE_ID_KEY] == unique_id
    assert internode.UNIQUE_ID_KEY == "jax_ep/nvshmem/unique_id"
    assert nvshmems[0].calls == [("unique_id",), ("initialize", 0, 3, unique_id, 0)]
    assert nvshmems[1].calls == [("initialize", 1, 3, unique_id, 1)]
    assert nvshmems[2].calls == [("initialize", 2, 3, unique_id, 0)]
    for client in clients:
        assert client.gets == [(internode.UNIQUE_ID_KEY, 1500)]


def test_other_process_waits_for_process_0():
    store = {}
    results = {}
    nvshmem1 = FakeNvshmem(1)
    thread = threading.Thread(target=lambda: results.update(r=internode.initialize_nvshmem(
        FakeClient(store), nvshmem1, 1, 2, 0, REGION, TIMEOUT_S)))
    thread.start()  # process 1 first: it blocks on the unique id
    thread.join(0.1)
    assert thread.is_alive() and nvshmem1.calls == []
    FakeClient(store).key_value_set_bytes(internode.UNIQUE_ID_KEY, b"\x07" * 128)
    thread.join(5)
    assert not thread.is_alive()
    assert nvshmem1.calls == [("initialize", 1, 2, b"\x07" * 128, 0)]


def test_second_call_does_nothing():
    client, nvshmem = FakeClient(), FakeNvshmem(0)
    internode.initialize_nvshmem(client, nvshmem, 0, 2, 0, REGION, TIMEOUT_S)
    store_before = dict(client.store)
    internode.initialize_nvshmem(client, nvshmem, 0, 2, 0, 2 * REGION, TIMEOUT_S)
    assert nvshmem.names() == ["unique_id", "initialize"]
    assert client.store == store_before
    assert len(client.gets) == 1


def test_symmetric_size_is_set_when_absent():
    internode.initialize_nvshmem(FakeClient(), FakeNvshmem(0), 0, 1, 0, REGION, TIMEOUT_S)
    assert os.environ["NVSHMEM_SYMMETRIC_SIZE"] == "2684354560"


def test_symmetric_size_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "8G")
    internode.initialize_nvshmem(FakeClient(), FakeNvshmem(0), 0, 1, 0, REGION, TIMEOUT_S)
    assert os.environ["NVSHMEM_SYMMETRIC_SIZE"] == "8G"


def test_timeout_waiting_for_process_0_names_it():
    client, nvshmem = FakeClient(), FakeNvshmem(1)
    with pytest.raises(RuntimeError, match=r"^process 0 did not publish NVSHMEM's unique id "
                                           r"within 0.05 s") as err:
        internode.initialize_nvshmem(client, nvshmem, 1, 2, 0, REGION, SHORT_S)
    assert isinstance(err.value.__cause__, TimeoutError)
    assert client.gets == [(internode.UNIQUE_ID_KEY, 50)]
    assert nvshmem.calls == []
    assert internode._initialized is False  # not marked initialised


# connect


def run_connect(monkeypatch, groups, num_processes, num_ranks_per_node, sizes=lambda p: SIZES,
                buffer_id=3):
    """connect in one thread per process, over one store. The processes publish and check
    their configurations concurrently; each then allocates in turn (process order), as a
    process of its own: `_initialized` is reset before each turn.
    Returns ({process: result or exception}, {process: FakeNvshmem}, store)."""
    store = {}
    turns = {p: threading.Event() for p in range(num_processes)}
    nvshmems = {p: FakeNvshmem(p, turns[p]) for p in range(num_processes)}
    results, done = {}, {p: threading.Event() for p in range(num_processes)}

    def main(p):
        try:
            results[p] = internode.connect(FakeClient(store), nvshmems[p], buffer_id, p,
                                           num_processes, groups, "ep", sizes(p),
                                           num_ranks_per_node, TIMEOUT_S)
        except Exception as err:
            results[p] = err
        done[p].set()

    threads = [threading.Thread(target=main, args=(p,)) for p in range(num_processes)]
    for thread in threads:
        thread.start()
    for p in range(num_processes):
        monkeypatch.setattr(internode, "_initialized", False)
        turns[p].set()
        assert done[p].wait(10), f"process {p} hangs"
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    return results, nvshmems, store


@pytest.mark.parametrize("value, puts_only", [(None, False), ("0", False), ("1", True)])
def test_connect_passes_the_puts_setting_to_the_group(monkeypatch, value, puts_only):
    """The network legs' choice (JAX_EP_INTERNODE_PUTS, read and checked once in Python)
    reaches the C++ group as an argument."""
    if value is None:
        monkeypatch.delenv("JAX_EP_INTERNODE_PUTS", raising=False)
    else:
        monkeypatch.setenv("JAX_EP_INTERNODE_PUTS", value)
    results, nvshmems, _ = run_connect(monkeypatch, [gpus(2)], 2, 1)
    assert results == {0: None, 1: None}
    assert [nvshmems[p].puts_only for p in range(2)] == [puts_only, puts_only]


@pytest.mark.parametrize("cap", [128, 32, 0])
def test_connect_passes_the_low_latency_cap_to_the_group(monkeypatch, cap):
    """The low-latency staging's tokens per rank (0: none) reach the C++ group and size the
    region NVSHMEM_SYMMETRIC_SIZE is set for."""
    results, nvshmems, _ = run_connect(monkeypatch, [gpus(2)], 2, 1,
                                       sizes=lambda p: dict(SIZES, low_latency_max_tokens=cap))
    assert results == {0: None, 1: None}
    assert [nvshmems[p].low_latency_max_tokens for p in range(2)] == [cap, cap]
    for p in range(2):
        assert nvshmems[p].calls[0] == ("region_bytes", 2, 1, 128, cap, 7168, 8, 64)


def test_connect_with_different_low_latency_caps_names_the_field(monkeypatch):
    results, nvshmems, _ = run_connect(
        monkeypatch, [gpus(2)], 2, 1,
        sizes=lambda p: dict(SIZES, low_latency_max_tokens=0) if p == 1 else SIZES)
    for p in (0, 1):
        assert isinstance(results[p], ValueError), results[p]
        assert nvshmems[p].calls == []  # checked before allocating or initialising
    assert ("process 1 created Buffer 3 with low_latency_max_tokens=0 but process 0 with "
            "low_latency_max_tokens=128") in str(results[0])


@pytest.mark.parametrize("num_groups", [1, 2])
def test_connect_creates_each_rank_with_the_pes_of_its_group(monkeypatch, num_groups):
    devices = gpus(4)
    # groups strided over the processes, so that a group's PEs are not its ranks
    groups = [devices[g::num_groups] for g in range(num_groups)]
    results, nvshmems, store = run_connect(monkeypatch, groups, 4, 1)
    assert results == {p: None for p in range(4)}
    unique_id = bytes([1]) * 128
    assert store[internode.UNIQUE_ID_KEY] == unique_id
    for p in range(4):
        group = groups[p % num_groups]
        rank = [d.process_index for d in group].index(p)
        pes = [d.process_index for d in group]
        assert nvshmems[p].calls == [
            ("region_bytes", len(group), 1, 128, 128, 7168, 8, 64),
            *([("unique_id",)] if p == 0 else []),
            ("initialize", p, 4, unique_id, p % 2),
            ("create_group", 3, p % 2, rank, len(group), 1, pes, SIZES)]
    if num_groups == 2:
        assert [call[6] for p in range(4) for call in nvshmems[p].calls
                if call[0] == "create_group"] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    config = json.loads(store["jax_ep/3/config/2"])["config"]
    assert config["mode"] == "internode" and config["num_ranks_per_node"] == 1
    assert config["ep_groups"] == [[d.id for d in group] for group in groups]


def test_connect_checks_a_record_published_before():
    """Process 1's (wrong) record is in the store already; process 0 reads and checks it."""
    groups = [gpus(2)]
    store = {}
    FakeClient(store).key_value_set("jax_ep/5/config/1",
                                    json.dumps({"config": {"axis_name": "tp"}, "host": "node1"}))
    with pytest.raises(ValueError, match="process 1 created Buffer 5 with axis_name='tp' but "
                                         "process 0 with axis_name='ep'"):
        internode.connect(FakeClient(store), FakeNvshmem(0), 5, 0, 2, groups, "ep", SIZES, 1,
                          TIMEOUT_S)


def test_connect_with_different_configuration_names_the_field(monkeypatch):
    results, nvshmems, _ = run_connect(
        monkeypatch, [gpus(2)], 2, 1, sizes=lambda p: dict(SIZES, hidden=4096) if p == 1 else SIZES)
    for p in (0, 1):
        assert isinstance(results[p], ValueError), results[p]
        assert nvshmems[p].calls == []  # checked before allocating or initialising
    assert ("process 1 created Buffer 3 with hidden=4096 but process 0 with hidden=7168"
            in str(results[0]))
    assert ("process 0 created Buffer 3 with hidden=7168 but process 1 with hidden=4096"
            in str(results[1]))
    assert "max_tokens" not in str(results[0])
    assert internode._initialized is False


def test_connect_with_different_nodes_names_num_ranks_per_node(monkeypatch):
    store = {}
    results = {}

    def main(p, num_ranks_per_node):
        try:
            results[p] = internode.connect(FakeClient(store), FakeNvshmem(p), 3, p, 2, [gpus(2)],
                                           "ep", SIZES, num_ranks_per_node, TIMEOUT_S)
        except Exception as err:
            results[p] = err

    threads = [threading.Thread(target=main, args=(p, p + 1)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert isinstance(results[0], ValueError), results[0]
    assert ("process 1 created Buffer 3 with num_ranks_per_node=2 but process 0 with "
            "num_ranks_per_node=1") in str(results[0])


def test_connect_refuses_a_wrong_process_model_before_publishing():
    client, nvshmem = FakeClient(), FakeNvshmem(0)
    two_per_process = [[Device(id=i, process_index=i // 2, local_hardware_id=i % 2)
                        for i in range(4)]]
    with pytest.raises(ValueError, match="one process per GPU"):
        internode.connect(client, nvshmem, 3, 0, 2, two_per_process, "ep", SIZES, 2, TIMEOUT_S)
    assert [key for key in client.store if key != "__cond__"] == []
    assert nvshmem.calls == []


def test_connect_times_out_naming_missing_processes():
    with pytest.raises(RuntimeError, match=r"process\(es\) 1 of the mesh did not create "
                                           r"Buffer 3 within 0.05 s"):
        internode.connect(FakeClient(), FakeNvshmem(0), 3, 0, 2, [gpus(2)], "ep", SIZES, 1,
                          SHORT_S)


# close


def test_close_frees_the_region_once_every_process_closes():
    store = {}
    nvshmems = [FakeNvshmem(p) for p in range(3)]
    threads = [threading.Thread(target=internode.close, name=f"process {p}",
                                args=(FakeClient(store), nvshmems[p], 4, p, 3, TIMEOUT_S))
               for p in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [n.calls for n in nvshmems] == [[("destroy", 4, True)]] * 3


def test_close_without_a_peer_warns_and_leaves_the_region_allocated():
    """A dead or failed peer never reaches the barrier: nvshmem_free would wait for it
    forever, so the region stays allocated and a warning says so."""
    nvshmem = FakeNvshmem(0)
    with pytest.warns(RuntimeWarning, match=r"internode Buffer 4: not every process closed it"):
        internode.close(FakeClient(), nvshmem, 4, 0, 2, SHORT_S)
    assert nvshmem.calls == [("destroy", 4, False)]


# shutdown (the exit handler)


def shutdown_process_0(monkeypatch, num_processes, open_buffers, timeout_s):
    """internode.shutdown() in process 0 of num_processes (the others never arrive), with
    `open_buffers` still open; (its result, the FakeNvshmem's calls)."""
    nvshmem = FakeNvshmem(0)
    monkeypatch.setattr(internode, "_session", (FakeClient(), nvshmem, 0, num_processes))
    monkeypatch.setattr(internode, "_open_buffers", set(open_buffers))
    return internode.shutdown(timeout_s), nvshmem.calls


def test_shutdown_closes_open_buffers_newest_first_then_finalizes(monkeypatch):
    """One process (num_processes=1): every barrier passes at once."""
    assert shutdown_process_0(monkeypatch, 1, {3, 7}, TIMEOUT_S) == (
        True, [("destroy", 7, True), ("destroy", 3, True), ("finalize",)])
    assert internode._session is None


def test_shutdown_without_a_peer_does_not_finalize(monkeypatch):
    """The other process never arrives (it died): the Buffer is left allocated and NVSHMEM
    is not finalised (nvshmem_finalize would wait for the dead process forever)."""
    with pytest.warns(RuntimeWarning, match="not every process closed it"):
        result = shutdown_process_0(monkeypatch, 2, {5}, SHORT_S)
    assert result == (False, [("destroy", 5, False)])


def test_shutdown_without_a_peer_and_no_open_buffer_does_not_finalize(monkeypatch):
    with pytest.warns(RuntimeWarning, match="exits without it"):
        result = shutdown_process_0(monkeypatch, 2, set(), SHORT_S)
    assert result == (False, [])


def test_shutdown_before_initialisation_does_nothing():
    assert internode.shutdown() is False


def _nvshmem_or_skip():
    """jax_ep._nvshmem (sizes need the built extensions), or skip the test."""
    from jax_ep import cuda_backend
    if not cuda_backend.is_available():
        pytest.skip(cuda_backend.unavailable_reason())
    try:
        from jax_ep import _nvshmem
    except ImportError as err:
        pytest.skip(f"jax_ep._nvshmem does not import: {err}")
    return _nvshmem


def test_region_bytes_of_an_internode_buffer_is_its_symmetric_region():
    """jax_ep.region_bytes with num_ranks_per_node < num_ranks sizes the internode Buffer's
    NVSHMEM region, which holds a whole batch: it grows with the ranks and the tokens."""
    import jax_ep
    from jax_ep import cuda_backend
    _nvshmem = _nvshmem_or_skip()
    sizes = dict(num_experts=256, hidden=7168, max_tokens_per_rank=4096)
    two_by_two = jax_ep.region_bytes(4, num_ranks_per_node=2, **sizes)
    assert two_by_two == _nvshmem.region_bytes(4, 2, 4096, 4096, 7168, cuda_backend.MAX_TOPK,
                                               256)
    assert jax_ep.region_bytes(8, num_ranks_per_node=4, **sizes) > two_by_two
    assert jax_ep.region_bytes(4, num_ranks_per_node=2, **dict(sizes, max_tokens_per_rank=128)) \
        < two_by_two
    assert jax_ep.region_bytes(4, num_ranks_per_node=4, **sizes) == jax_ep.region_bytes(4, **sizes)


@pytest.mark.parametrize("num_ranks, num_ranks_per_node", [(4, 2), (16, 8)])
def test_region_bytes_with_a_low_latency_cap(num_ranks, num_ranks_per_node):
    """low_latency_max_tokens_per_rank sizes an internode Buffer's low-latency staging: None is
    max_tokens_per_rank (the figures before the argument existed), 0 none at all. A one-host
    Buffer's figure does not depend on it."""
    import jax_ep
    from jax_ep import cuda_backend
    _nvshmem = _nvshmem_or_skip()
    sizes = dict(num_experts=256, hidden=7168, max_tokens_per_rank=4096)

    def internode(cap):
        return jax_ep.region_bytes(num_ranks, num_ranks_per_node=num_ranks_per_node,
                                   low_latency_max_tokens_per_rank=cap, **sizes)
    assert internode(None) == internode(4096)
    assert internode(4096) > internode(128) > internode(0)
    assert internode(0) == _nvshmem.region_bytes(num_ranks, num_ranks_per_node, 4096, 0, 7168,
                                                 cuda_backend.MAX_TOPK, 256)
    assert internode(128) == _nvshmem.region_bytes(num_ranks, num_ranks_per_node, 4096, 128,
                                                   7168, cuda_backend.MAX_TOPK, 256)
    one_host = jax_ep.region_bytes(num_ranks_per_node, **sizes)
    for cap in (0, 128):
        assert jax_ep.region_bytes(num_ranks_per_node, low_latency_max_tokens_per_rank=cap,
                                   **sizes) == one_host
