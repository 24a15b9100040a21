"""jax_ep.launch: the multi-process launcher and `initialize()`, on CPU.

The launcher runs as `python -m jax_ep.launch` in a subprocess, with children that are tiny
scripts written to tmp_path; only `test_two_processes_initialize_jax_distributed` imports JAX
in its children (jax.distributed over 127.0.0.1 with XLA:CPU). The bad-input tests call
`launch.main` in this process (argparse errors: SystemExit 2 and a message on stderr).
"""

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import jax_ep
from jax_ep import launch

REPO = Path(jax_ep.__file__).resolve().parents[1]
RUN_TIMEOUT_S = 120  # upper bound on one launcher run, so that a broken launcher fails the test


def _env(**extra):
    """This environment for the launcher and its children: the jax_ep under test first on
    PYTHONPATH (as in tests/test_gpu_multiprocess.py), CPU only, no Slurm variables."""
    paths = [str(REPO)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and not k.startswith("JAX_EP_")}
    env.update(PYTHONPATH=os.pathsep.join(paths), JAX_PLATFORMS="cpu")
    env.update(extra)
    return env


def _script(tmp_path, name, code):
    """Write `code` (dedented) to tmp_path/name and return its path as a string."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def _launch(args, env=None, cwd=None, timeout=RUN_TIMEOUT_S):
    """Run `python -m jax_ep.launch *args`; CompletedProcess (text) and its duration in s."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "jax_ep.launch", *args], env=env or _env(),
                            cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start


def _report(result):
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


PRINT_ENV = """
    import os, sys
    names = ("JAX_EP_COORDINATOR", "JAX_EP_NUM_PROCESSES", "JAX_EP_PROCESS_ID",
             "JAX_EP_LOCAL_RANK", "JAX_EP_LOCAL_DEVICE_IDS", "PYTHONUNBUFFERED")
    print("env", *(f"{n}={os.environ.get(n)!r}" for n in names), "args", sys.argv[1:])
    print("to stderr", file=sys.stderr)
"""


def _env_lines(stdout):
    """{label: the "env ..." line after it} of PRINT_ENV children's prefixed output."""
    lines = {}
    for line in stdout.splitlines():
        label, _, rest = line.partition("] ")
        if rest.startswith("env "):
            lines[label + "]"] = rest
    return lines


# (1) jax.distributed through the launcher.

def test_two_processes_initialize_jax_distributed(tmp_path):
    script = _script(tmp_path, "child.py", """
        import jax_ep.launch
        assert jax_ep.launch.initialize() is True
        assert jax_ep.launch.initialize() is True  # a second call does nothing
        import jax
        assert jax.process_count() == 2, jax.process_count()
        assert jax.device_count() == 2 * jax.local_device_count()
        print(f"process {jax.process_index()} of {jax.process_count()}")
    """)
    result, _ = _launch(["-n", "2", "--", script])
    assert result.returncode == 0, _report(result)
    lines = result.stdout.splitlines()
    assert "[rank 0] process 0 of 2" in lines, _report(result)
    assert "[rank 1] process 1 of 2" in lines, _report(result)


def test_module_form_environment_and_prefixes(tmp_path):
    _script(tmp_path, "envchild.py", PRINT_ENV)
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), _env()["PYTHONPATH"]]))
    env.pop("PYTHONUNBUFFERED", None)
    result, _ = _launch(["-n", "3", "--port", "23456", "--", "-m", "envchild", "a", "--b"],
                        env=env)
    assert result.returncode == 0, _report(result)
    got = _env_lines(result.stdout)
    assert sorted(got) == ["[rank 0]", "[rank 1]", "[rank 2]"], _report(result)
    for rank in range(3):
        assert got[f"[rank {rank}]"] == (
            f"env JAX_EP_COORDINATOR='127.0.0.1:23456' JAX_EP_NUM_PROCESSES='3' "
            f"JAX_EP_PROCESS_ID='{rank}' JAX_EP_LOCAL_RANK='{rank}' JAX_EP_LOCAL_DEVICE_IDS='' "
            f"PYTHONUNBUFFERED='1' args ['a', '--b']")
    assert sorted(result.stderr.splitlines()) == [f"[rank {r}] to stderr" for r in range(3)]


def test_free_port_and_no_prefix(tmp_path):
    script = _script(tmp_path, "envchild.py", PRINT_ENV)
    result, _ = _launch(["-n", "2", "--no-prefix", "--", script])
    assert result.returncode == 0, _report(result)
    # Unprefixed, the children share the launcher's stdout unbuffered: their lines can
    # interleave mid-line, so the values are searched for, not read line by line.
    coordinators = re.findall(r"JAX_EP_COORDINATOR=('[^']*')", result.stdout)
    assert len(coordinators) == 2, _report(result)
    assert len(set(coordinators)) == 1, _report(result)  # the same free port for both
    assert coordinators[0].startswith("'127.0.0.1:"), coordinators
    ids = sorted(re.findall(r"JAX_EP_PROCESS_ID='(\d+)'", result.stdout))
    assert ids == ["0", "1"], _report(result)
    assert result.stderr.count("to stderr") == 2, _report(result)


def test_multi_node_process_ids(tmp_path):
    script = _script(tmp_path, "envchild.py", PRINT_ENV)
    result, _ = _launch(["-n", "2", "--num-nodes", "3", "--node-rank", "1",
                         "--coordinator", "node0.example:1234", "--", script])
    assert result.returncode == 0, _report(result)
    got = _env_lines(result.stdout)
    assert sorted(got) == ["[rank 2]", "[rank 3]"], _report(result)
    for local_rank, rank in enumerate((2, 3)):
        assert (f"JAX_EP_COORDINATOR='node0.example:1234' JAX_EP_NUM_PROCESSES='6' "
                f"JAX_EP_PROCESS_ID='{rank}' JAX_EP_LOCAL_RANK='{local_rank}'"
                in got[f"[rank {rank}]"]), _report(result)


def test_slurm_settings_from_the_environment(tmp_path):
    script = _script(tmp_path, "envchild.py", PRINT_ENV)
    env = _env(SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_JOB_ID="4097",
               SLURM_JOB_NODELIST="gpu[003-004],cpu1")
    result, _ = _launch(["-n", "2", "--slurm", "--", script], env=env)
    assert result.returncode == 0, _report(result)
    got = _env_lines(result.stdout)
    assert sorted(got) == ["[rank 2]", "[rank 3]"], _report(result)
    assert ("JAX_EP_COORDINATOR='gpu003:61441' JAX_EP_NUM_PROCESSES='4' JAX_EP_PROCESS_ID='3'"
            in got["[rank 3]"]), _report(result)


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"), ("node01,node02", "node01"), ("gpu[003-004,010],cpu1", "gpu003"),
    ("gpu[7,9]", "gpu7"), ("rack1-n[12-13]-ib", "rack1-n12-ib"), ("a[1-2]b[3-4]", "a1b3"),
])
def test_first_slurm_host(nodelist, host):
    assert launch.first_slurm_host(nodelist) == host


def _fake_nvidia_smi(tmp_path, num_gpus):
    """A directory with an `nvidia-smi` that lists `num_gpus` GPUs, to put first on PATH."""
    directory = tmp_path / "bin"
    directory.mkdir()
    tool = directory / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: Fake GPU (UUID: GPU-{i})'\n"
                                             for i in range(num_gpus)))
    tool.chmod(0o755)
    return str(directory)


@pytest.mark.parametrize("environ, count", [
    ({}, 4), ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2), ({"CUDA_VISIBLE_DEVICES": "0,-1,2"}, 1),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0), ({"JAX_PLATFORMS": "cpu"}, 0),
    ({"JAX_PLATFORMS": "cuda,cpu"}, 4),
])
def test_count_local_gpus(environ, count, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, 4) + os.pathsep + os.environ["PATH"])
    assert launch.count_local_gpus(environ) == count


def test_one_gpu_per_process(tmp_path):
    """With GPUs, process i gets local device id i and CUDA_VISIBLE_DEVICES as it was."""
    script = _script(tmp_path, "envchild.py", PRINT_ENV + """
    print("visible", repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
    """)
    env = _env(PATH=_fake_nvidia_smi(tmp_path, 4) + os.pathsep + os.environ["PATH"])
    env.pop("JAX_PLATFORMS")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result, _ = _launch(["-n", "2", "--", script], env=env)
    assert result.returncode == 0, _report(result)
    got = _env_lines(result.stdout)
    for rank in range(2):
        assert f"JAX_EP_LOCAL_DEVICE_IDS='{rank}'" in got[f"[rank {rank}]"], _report(result)
        assert f"[rank {rank}] visible None" in result.stdout, _report(result)
    result, _ = _launch(["-n", "2", "--all-devices", "--", script], env=env)
    assert result.returncode == 0, _report(result)
    assert all("JAX_EP_LOCAL_DEVICE_IDS=''" in line
               for line in _env_lines(result.stdout).values()), _report(result)
    result, _ = _launch(["-n", "5", "--", script], env=env)
    assert result.returncode == 2, _report(result)
    assert "-n 5 but this host has 4 usable GPU(s)" in result.stderr, _report(result)


# (2) A failing child stops the others; (3) --timeout.

def test_failing_child_exit_code_and_sibling_stopped(tmp_path):
    script = _script(tmp_path, "fail.py", """
        import os, sys, time
        ready = sys.argv[1]  # rank 1 creates it once it is sleeping
        if os.environ["JAX_EP_PROCESS_ID"] == "0":
            while not os.path.exists(ready):
                time.sleep(0.01)
            print("failing", flush=True)
            sys.exit(3)
        print("sleeping", flush=True)
        open(ready, "w").close()
        time.sleep(60)
        print("not stopped")
    """)
    result, seconds = _launch(["-n", "2", "--", script, str(tmp_path / "ready")])
    assert result.returncode == 3, _report(result)
    assert seconds < 10, f"took {seconds:.1f} s: the sleeping sibling was not stopped at once"
    assert "[rank 0] failing" in result.stdout and "[rank 1] sleeping" in result.stdout
    assert "not stopped" not in result.stdout
    assert "[rank 0] exited with status 3" in result.stderr, _report(result)


def test_sibling_ignoring_sigterm_is_killed_after_grace(tmp_path):
    script = _script(tmp_path, "stubborn.py", """
        import os, signal, sys, time
        ready = sys.argv[1]  # rank 1 creates it once it ignores SIGTERM
        if os.environ["JAX_EP_PROCESS_ID"] == "1":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ignoring SIGTERM", flush=True)
            open(ready, "w").close()
            time.sleep(60)
        while not os.path.exists(ready):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result, seconds = _launch(["-n", "2", "--grace", "1", "--", script,
                               str(tmp_path / "ready")])
    assert result.returncode == 128 + signal.SIGKILL, _report(result)
    assert "[rank 1] ignoring SIGTERM" in result.stdout, _report(result)
    assert "killing (SIGKILL) [rank 1]" in result.stderr, _report(result)
    assert seconds < 10, f"took {seconds:.1f} s"


def test_timeout_exits_124(tmp_path):
    script = _script(tmp_path, "sleep.py", "import time\ntime.sleep(60)\n")
    result, seconds = _launch(["-n", "2", "--timeout", "1", "--", script])
    assert result.returncode == 124, _report(result)
    assert seconds < 10, f"took {seconds:.1f} s"
    assert "timeout" in result.stderr


def test_sigint_is_forwarded(tmp_path):
    script = _script(tmp_path, "wait.py", """
        import time
        print("ready", flush=True)
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "jax_ep.launch", "-n", "2", "--", script],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                              daemon=True)
    reader.start()
    try:
        ready = set()
        while len(ready) < 2:
            line = lines.get(timeout=RUN_TIMEOUT_S)
            if line.endswith("] ready\n"):
                ready.add(line)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=RUN_TIMEOUT_S)
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    reader.join(timeout=RUN_TIMEOUT_S)  # until the end of the launcher's stdout
    out = []
    while not lines.empty():
        out.append(lines.get())
    assert code == 128 + signal.SIGINT, f"exit {code}\n{stderr}"
    assert seconds < 10, f"took {seconds:.1f} s"
    assert sorted(out) == ["[rank 0] interrupted\n", "[rank 1] interrupted\n"], (out, stderr)
    assert "got SIGINT" in stderr


# (4) Bad input: exit status 2 and a message naming the option.

@pytest.mark.parametrize("argv, message", [
    (["-n", "0", "--", "SCRIPT"], "-n/--nproc must be at least 1"),
    (["-n", "2"], "nothing to run after `--`"),
    (["-n", "2", "--"], "nothing to run after `--`"),
    (["-n", "2", "--", "-m"], "`-m` after `--` needs a module name"),
    (["-n", "2", "--", "does/not/exist.py"], "script not found: 'does/not/exist.py'"),
    (["-n", "2", "--num-nodes", "2", "--node-rank", "2", "--coordinator", "h:1", "--",
      "SCRIPT"], "--node-rank must be in 0..1"),
    (["-n", "2", "--node-rank", "-1", "--", "SCRIPT"], "--node-rank must be in 0..0"),
    (["-n", "2", "--num-nodes", "2", "--node-rank", "0", "--", "SCRIPT"],
     "--num-nodes 2 needs --coordinator"),
    (["-n", "2", "--num-nodes", "0", "--", "SCRIPT"], "--num-nodes must be at least 1"),
    (["-n", "2", "--slurm", "--", "SCRIPT"], "--slurm: SLURM_JOB_NUM_NODES, SLURM_NODEID"),
    (["-n", "2", "--coordinator", "nohost", "--", "SCRIPT"], "--coordinator must be HOST:PORT"),
    (["-n", "2", "--port", "1", "--coordinator", "h:1", "--", "SCRIPT"],
     "give --port or --coordinator"),
    (["-n", "2", "--timeout", "0", "--", "SCRIPT"], "--timeout must be > 0"),
])
def test_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    script = _script(tmp_path, "ok.py", "pass\n")
    with pytest.raises(SystemExit) as exit_info:
        launch.main([script if arg == "SCRIPT" else arg for arg in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input_from_the_command_line():
    result, _ = _launch(["-n", "0", "--", "x.py"])
    assert result.returncode == 2
    assert "-n/--nproc must be at least 1" in result.stderr


# (5) initialize() without the launcher.

def test_initialize_without_launcher_variables_is_a_noop(monkeypatch):
    for name in (launch.COORDINATOR, launch.NUM_PROCESSES, launch.PROCESS_ID, launch.LOCAL_RANK,
                 launch.LOCAL_DEVICE_IDS):
        monkeypatch.delenv(name, raising=False)
    assert launch.initialize() is False


def test_initialize_with_some_variables_missing_says_which(monkeypatch):
    monkeypatch.setenv(launch.COORDINATOR, "127.0.0.1:1")
    monkeypatch.delenv(launch.NUM_PROCESSES, raising=False)
    monkeypatch.setenv(launch.PROCESS_ID, "0")
    with pytest.raises(RuntimeError, match="JAX_EP_NUM_PROCESSES not"):
        launch.initialize()
