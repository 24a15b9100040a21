"""Start one process per local GPU with `jax.distributed` set up: the multi-process launcher.

    python -m jax_ep.launch -n 4 -- train.py --steps 100
    python -m jax_ep.launch -n 4 -- -m my_package.train --steps 100

starts 4 processes of `python train.py --steps 100` (or `python -m my_package.train ...`, with
the Python that runs the launcher) on this host. The script calls, before anything else that
uses JAX devices:

    import jax_ep.launch
    jax_ep.launch.initialize()   # jax.distributed.initialize(...) from the launcher's variables

after which `jax.devices()` lists the devices of every process and `jax.local_devices()` this
process's own. `initialize()` does nothing (returns False) when the script runs without the
launcher, so the same script also runs as a single process. JAX reads none of the launcher's
variables by itself: a script that does not call `initialize()` (nor
`jax.distributed.initialize` with the values below) runs N independent single processes.

Every child gets the launcher's environment unchanged, plus:

- JAX_EP_COORDINATOR: host:port of the jax.distributed coordinator (process 0 serves it).
- JAX_EP_NUM_PROCESSES: the number of processes in all (num_nodes * n).
- JAX_EP_PROCESS_ID: this process's global index, node_rank * n + local_rank.
- JAX_EP_LOCAL_RANK: this process's index on this host, 0 .. n-1.
- JAX_EP_LOCAL_DEVICE_IDS: the local GPU(s) this process drives, e.g. "2" (passed to
  `jax.distributed.initialize(local_device_ids=...)`); empty when the host has no GPU (each
  process then gets XLA's CPU devices) or with --all-devices (each process drives every local
  GPU).
- PYTHONUNBUFFERED=1, unless it is set already (so that the output arrives line by line).

GPUs: process `local_rank` drives GPU `local_rank` of those CUDA_VISIBLE_DEVICES shows (all of
them if it is unset). The launcher does not narrow CUDA_VISIBLE_DEVICES: JAX restricts itself
to the process's GPU through `local_device_ids` (as tests/mp_worker.py does), and every process
still sees every GPU of the host at the CUDA level, which backend="cuda" needs to map the other
processes' buffers (CUDA IPC). The host counts as having no GPU when JAX_PLATFORMS is set
without "cuda"/"gpu" (e.g. JAX_PLATFORMS=cpu), or when `nvidia-smi -L` lists none.

Several hosts: run the launcher once per host, with the same -n everywhere:

    # on every host, I = 0 .. N-1; HOST0 = the host of node rank 0 (it serves the coordinator)
    python -m jax_ep.launch -n 4 --num-nodes N --node-rank I --coordinator HOST0:PORT -- train.py

    # Slurm: one launcher per node; --slurm takes the node rank from SLURM_NODEID, the number of
    # nodes from SLURM_STEP_NUM_NODES (SLURM_JOB_NUM_NODES outside a step), and the coordinator
    # host from the first host of SLURM_STEP_NODELIST (SLURM_JOB_NODELIST); the port is --port,
    # else 61440 + SLURM_JOB_ID % 4096 (the port JAX's own Slurm detection picks).
    srun --nodes=2 --ntasks-per-node=1 python -m jax_ep.launch --slurm -n 4 -- train.py

On one host without --coordinator, the coordinator is 127.0.0.1 on --port, or on a free port.

Output: each line a child writes is printed with "[rank I] " in front (I = global process id;
stdout to stdout, stderr to stderr), or as is with --no-prefix. A line is printed when it ends
(text rewritten with carriage returns, like progress bars, shows at the next newline).

Exit: when every child exited 0, the launcher exits 0. When a child exits non-zero or is killed,
the launcher stops the others (SIGTERM; SIGKILL to those still running --grace seconds later,
default 10) and exits with that child's exit code (128 + N for a child killed by signal N).
--timeout SECONDS stops every child the same way after SECONDS and exits 124. Ctrl-C (SIGINT)
or SIGTERM to the launcher is forwarded to every child (SIGKILL --grace seconds later, or at a
second Ctrl-C), and the launcher exits 128 + the signal's number. Each child runs in its own
process group (so a terminal's Ctrl-C reaches it once, through the launcher), and a signal the
launcher sends reaches the processes the child started too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

COORDINATOR = "JAX_EP_COORDINATOR"
NUM_PROCESSES = "JAX_EP_NUM_PROCESSES"
PROCESS_ID = "JAX_EP_PROCESS_ID"
LOCAL_RANK = "JAX_EP_LOCAL_RANK"
LOCAL_DEVICE_IDS = "JAX_EP_LOCAL_DEVICE_IDS"

TIMEOUT_EXIT_CODE = 124  # like coreutils' timeout
POLL_INTERVAL_S = 0.05  # how often the launcher checks its children


# ---------------------------------------------------------------------------------------------
# In the child: jax.distributed from the launcher's variables.
# ---------------------------------------------------------------------------------------------

def initialize(**kwargs) -> bool:
    """Call `jax.distributed.initialize` with the values the launcher set in the environment.

    Reads JAX_EP_COORDINATOR, JAX_EP_NUM_PROCESSES, JAX_EP_PROCESS_ID and
    JAX_EP_LOCAL_DEVICE_IDS (see the module docstring) and calls
    `jax.distributed.initialize(coordinator_address=..., num_processes=..., process_id=...)`,
    with `local_device_ids=[...]` when JAX_EP_LOCAL_DEVICE_IDS is not empty, and with JAX's
    cluster auto-detection turned off (under Slurm it would otherwise replace the launcher's
    device choice with SLURM_LOCALID). Call it before anything that uses JAX devices.

    Args:
      **kwargs: more keyword arguments of `jax.distributed.initialize`, e.g.
        `initialization_timeout=60`.

    Returns:
      True when jax.distributed is initialised: by this call, or already (then this call does
      nothing); False, doing nothing, when the launcher's variables are absent (the script was
      not started by the launcher).

    Raises:
      RuntimeError: some of the launcher's variables are set but not all of them.
      ValueError: a variable is not a number where one is expected.
    """
    names = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
    present = [name for name in names if name in os.environ]
    if not present:
        return False
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"jax_ep.launch.initialize: {', '.join(present)} set but {', '.join(missing)} not; "
            "start the script with `python -m jax_ep.launch -n N -- script.py`, or unset them "
            "to run it as a single process.")
    import jax  # not at the top: the launcher itself does not need JAX

    if jax.distributed.is_initialized():
        return True
    coordinator = os.environ[COORDINATOR]
    num_processes = _int_variable(NUM_PROCESSES)
    process_id = _int_variable(PROCESS_ID)
    device_ids = os.environ.get(LOCAL_DEVICE_IDS, "").strip()
    if device_ids:
        try:
            kwargs.setdefault("local_device_ids", [int(i) for i in device_ids.split(",")])
        except ValueError:
            raise ValueError(f"jax_ep.launch.initialize: {LOCAL_DEVICE_IDS}={device_ids!r} is "
                             "not a comma-separated list of integers") from None
    kwargs.setdefault("cluster_detection_method", "deactivate")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    return True


def _int_variable(name):
    """The integer value of environment variable `name`; ValueError naming it otherwise."""
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"jax_ep.launch.initialize: {name}={value!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------
# In the launcher: the command line.
# ---------------------------------------------------------------------------------------------

def make_parser():
    """The launcher's argparse parser (the options before `--`)."""
    parser = argparse.ArgumentParser(
        prog="python -m jax_ep.launch",
        usage="python -m jax_ep.launch -n N [options] -- (script.py | -m module) [args ...]",
        description="Start N processes on this host, one per local GPU (on a host without "
                    "GPUs: N processes with CPU devices), with jax.distributed set up through "
                    "jax_ep.launch.initialize().",
        epilog="Everything after `--` is the program each process runs, as `python` takes it.")
    parser.add_argument("-n", "--nproc", type=int, required=True, metavar="N",
                        help="number of processes on this host (one per GPU)")
    parser.add_argument("--port", type=int,
                        help="coordinator port (default: a free port on one host; with --slurm "
                             "on several hosts, 61440 + SLURM_JOB_ID %% 4096)")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="coordinator address, the host of node rank 0 (required with "
                             "--num-nodes > 1 unless --slurm; default on one host: "
                             "127.0.0.1 and --port)")
    parser.add_argument("--num-nodes", type=int, metavar="N",
                        help="number of hosts, each running this launcher with the same -n "
                             "(default 1)")
    parser.add_argument("--node-rank", type=int, metavar="I",
                        help="index of this host, 0 .. num-nodes - 1 (default 0)")
    parser.add_argument("--slurm", action="store_true",
                        help="take --num-nodes, --node-rank and the coordinator host from "
                             "Slurm's variables (run one launcher per node, e.g. srun "
                             "--ntasks-per-node=1)")
    parser.add_argument("--all-devices", action="store_true",
                        help="every process drives every local GPU (default: process i drives "
                             "GPU i)")
    parser.add_argument("--no-prefix", action="store_true",
                        help="pass the children's output through without the '[rank i] ' prefix")
    parser.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between SIGTERM and SIGKILL when stopping the children "
                             "(default 10)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="stop every child after SECONDS and exit 124")
    return parser


def split_argv(argv):
    """(launcher arguments, program) of `argv`: the parts before and after the first `--`
    (program [] when there is no `--`)."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return list(argv), []


def program_command(parser, program):
    """The command of each child, [sys.executable, script, args...] or
    [sys.executable, "-m", module, args...]; `parser.error` (exit 2) on a bad program."""
    if not program:
        parser.error("nothing to run after `--`: give the program, e.g. "
                     "`python -m jax_ep.launch -n 2 -- script.py` or `... -- -m package.module`")
    if program[0] == "-m":
        if len(program) < 2 or not program[1] or program[1].startswith("-"):
            parser.error("`-m` after `--` needs a module name, e.g. `-- -m jax_ep.demo`")
        return [sys.executable] + program
    if program[0].startswith("-"):
        parser.error(f"expected a script or `-m module` after `--`, got {program[0]!r}")
    if not os.path.isfile(program[0]):
        parser.error(f"script not found: {program[0]!r} (the program after `--`)")
    return [sys.executable] + program


def parse_coordinator(parser, address):
    """`address` ("host:port") checked; `parser.error` if it is not host:port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"--coordinator must be HOST:PORT with a port in 1..65535, got {address!r}")
    return address


def first_slurm_host(nodelist):
    """The first host name of a Slurm node list, e.g. "gpu[003-004,010],cpu1" -> "gpu003"."""
    host, rest = "", nodelist.strip()
    while rest:
        if rest[0] == ",":
            break
        if rest[0] == "[":
            close = rest.find("]")
            if close < 0:
                raise ValueError(f"unbalanced '[' in the Slurm node list {nodelist!r}")
            first = rest[1:close].split(",")[0].split("-")[0]
            host += first
            rest = rest[close + 1:]
        else:
            host += rest[0]
            rest = rest[1:]
    if not host:
        raise ValueError(f"no host name in the Slurm node list {nodelist!r}")
    return host


def slurm_settings(parser, environ):
    """(num_nodes, node_rank, coordinator host, default port) from Slurm's variables in
    `environ`; `parser.error` naming the missing ones. The step's variables
    (SLURM_STEP_NUM_NODES, SLURM_STEP_NODELIST) win over the job's (SLURM_JOB_NUM_NODES,
    SLURM_JOB_NODELIST)."""
    num_nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    node_rank = environ.get("SLURM_NODEID")
    job_id = environ.get("SLURM_JOB_ID")
    missing = [name for name, value in (("SLURM_JOB_NUM_NODES", num_nodes),
                                        ("SLURM_NODEID", node_rank),
                                        ("SLURM_JOB_NODELIST", nodelist),
                                        ("SLURM_JOB_ID", job_id)) if not value]
    if missing:
        parser.error(f"--slurm: {', '.join(missing)} not set; run the launcher inside a Slurm "
                     "job step (`srun --ntasks-per-node=1 python -m jax_ep.launch --slurm ...`) "
                     "or give --num-nodes, --node-rank and --coordinator instead")
    for name, value in (("SLURM_JOB_NUM_NODES", num_nodes), ("SLURM_NODEID", node_rank),
                        ("SLURM_JOB_ID", job_id)):
        if not value.isdigit():
            parser.error(f"--slurm: {name}={value!r} is not a number")
    try:
        host = first_slurm_host(nodelist)
    except ValueError as err:
        parser.error(f"--slurm: {err}")
    return int(num_nodes), int(node_rank), host, 61440 + int(job_id) % 4096


def count_local_gpus(environ):
    """How many GPUs the children can use: 0 when JAX_PLATFORMS excludes CUDA (e.g. "cpu");
    else the GPUs `nvidia-smi -L` lists (0 without nvidia-smi), at most as many as
    CUDA_VISIBLE_DEVICES names when it is set."""
    platforms = environ.get("JAX_PLATFORMS", "").lower()
    if platforms and "cuda" not in platforms and "gpu" not in platforms:
        return 0
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 0
    if listing.returncode != 0:
        return 0
    count = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        names = [name.strip() for name in visible.split(",")]
        usable = 0
        for name in names:  # CUDA ignores the devices after an invalid one
            if not name or name.startswith("-"):
                break
            usable += 1
        count = min(count, usable)
    return count


def free_port():
    """A TCP port free on 127.0.0.1 now (the convention of tests/test_gpu_multiprocess.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_environments(environ, coordinator, nproc, num_nodes, node_rank, device_ids):
    """One environment per local process: `environ` plus the JAX_EP_* variables (see the module
    docstring) and PYTHONUNBUFFERED=1 unless set. `device_ids[i]` is local process i's
    JAX_EP_LOCAL_DEVICE_IDS value."""
    envs = []
    for local_rank in range(nproc):
        env = dict(environ)
        env[COORDINATOR] = coordinator
        env[NUM_PROCESSES] = str(num_nodes * nproc)
        env[PROCESS_ID] = str(node_rank * nproc + local_rank)
        env[LOCAL_RANK] = str(local_rank)
        env[LOCAL_DEVICE_IDS] = device_ids[local_rank]
        env.setdefault("PYTHONUNBUFFERED", "1")
        envs.append(env)
    return envs


# ---------------------------------------------------------------------------------------------
# In the launcher: running the children.
# ---------------------------------------------------------------------------------------------

def forward_output(pipe, out, prefix, lock):
    """Copy `pipe` (a child's stdout or stderr, bytes) to `out` (a binary stream) line by line,
    each line with `prefix` in front; runs in a thread until the child closes the pipe."""
    for line in iter(pipe.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with lock:
            try:
                out.write(prefix + line)
                out.flush()
            except (OSError, ValueError):  # our own output is gone (closed pipe): drop it
                pass
    pipe.close()


def signal_children(procs, signum):
    """Send `signum` to the process group of every child still running."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def exit_status(returncode):
    """A child's return code as a shell exit status: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def log(message):
    """Print one of the launcher's own messages to stderr."""
    print(f"jax_ep.launch: {message}", file=sys.stderr, flush=True)


def run_children(commands, envs, labels, prefix=True, grace=10.0, timeout=None):
    """Run one process per command, wait for them, and return the launcher's exit status.

    Each child runs `commands[i]` with environment `envs[i]` in a new process group; with
    `prefix`, two threads per child copy its stdout and stderr to ours with `labels[i]` in front
    of each line. Returns 0 when every child exits 0. When a child exits non-zero (or is
    killed), when `timeout` seconds have passed, or when the launcher gets SIGINT/SIGTERM, the
    other children are stopped: SIGTERM (the received signal, for SIGINT/SIGTERM) to each
    process group, then SIGKILL to those still running `grace` seconds later (at once on a
    second signal). Returns the first failing child's exit status, 124 on timeout, or
    128 + the signal's number.
    """
    received = []  # signals the launcher got, in order

    def on_signal(signum, frame):
        """Remember the signal; the loop below forwards it."""
        received.append(signum)

    previous = {signum: signal.signal(signum, on_signal)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    lock = threading.Lock()
    procs, threads = [], []
    try:
        for command, env, label in zip(commands, envs, labels):
            pipe = subprocess.PIPE if prefix else None
            try:
                proc = subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe,
                                        start_new_session=True)
            except OSError as err:
                log(f"could not start {label.strip()} ({command[0]}): {err}")
                signal_children(procs, signal.SIGKILL)
                for started in procs:
                    started.wait()
                return 1
            procs.append(proc)
            if prefix:
                tag = label.encode()
                for pipe_of_child, out in ((proc.stdout, sys.stdout.buffer),
                                           (proc.stderr, sys.stderr.buffer)):
                    thread = threading.Thread(target=forward_output,
                                              args=(pipe_of_child, out, tag, lock), daemon=True)
                    thread.start()
                    threads.append(thread)

        start = time.monotonic()
        status = None  # the launcher's exit status, once decided
        kill_at = None  # when to SIGKILL the children still running
        killed = False
        handled = 0  # how many of `received` were acted on
        while True:
            now = time.monotonic()
            codes = [proc.poll() for proc in procs]
            while handled < len(received):
                signum = received[handled]
                handled += 1
                name = signal.Signals(signum).name
                if kill_at is None:  # the first reason to stop: forward the signal
                    log(f"got {name}; forwarding it to the children")
                    status = 128 + signum
                    signal_children(procs, signum)
                    kill_at = now + grace
                elif not killed:  # already stopping: do not wait any longer
                    log(f"got {name} while stopping; killing the children")
                    kill_at = now
            if status is None:
                for label, code in zip(labels, codes):
                    if code is not None and code != 0:
                        status = exit_status(code)
                        running = sum(1 for c in codes if c is None)
                        log(f"{label.strip()} exited with status {status}; stopping the other "
                            f"{running} running process(es)")
                        signal_children(procs, signal.SIGTERM)
                        kill_at = now + grace
                        break
            if status is None and timeout is not None and now - start >= timeout:
                status = TIMEOUT_EXIT_CODE
                log(f"timeout: {timeout:g} s passed; stopping every process")
                signal_children(procs, signal.SIGTERM)
                kill_at = now + grace
            if all(code is not None for code in codes):
                break
            if kill_at is not None and now >= kill_at and not killed:
                running = [label.strip() for label, code in zip(labels, codes) if code is None]
                log(f"killing (SIGKILL) {', '.join(running)}")
                signal_children(procs, signal.SIGKILL)
                killed = True
            time.sleep(POLL_INTERVAL_S)
        for thread in threads:  # the rest of the output
            thread.join(timeout=5.0)
        return 0 if status is None else status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal_children(procs, signal.SIGKILL)  # only if we leave by an exception


def main(argv=None):
    """The launcher's command line (see the module docstring); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    launcher_args, program = split_argv(argv)
    args = parser.parse_args(launcher_args)

    if args.nproc < 1:
        parser.error(f"-n/--nproc must be at least 1, got {args.nproc}")
    if args.grace < 0:
        parser.error(f"--grace must be >= 0, got {args.grace:g}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout:g}")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.port is not None and args.coordinator is not None:
        parser.error("give --port or --coordinator HOST:PORT, not both")
    command = program_command(parser, program)

    num_nodes, node_rank = args.num_nodes, args.node_rank
    coordinator = args.coordinator
    if coordinator is not None:
        coordinator = parse_coordinator(parser, coordinator)
    slurm_host = slurm_port = None
    if args.slurm:
        slurm_nodes, slurm_rank, slurm_host, slurm_port = slurm_settings(parser, os.environ)
        num_nodes = slurm_nodes if num_nodes is None else num_nodes
        node_rank = slurm_rank if node_rank is None else node_rank
    num_nodes = 1 if num_nodes is None else num_nodes
    node_rank = 0 if node_rank is None else node_rank
    if num_nodes < 1:
        parser.error(f"--num-nodes must be at least 1, got {num_nodes}")
    if not 0 <= node_rank < num_nodes:
        parser.error(f"--node-rank must be in 0..{num_nodes - 1} (--num-nodes {num_nodes}), "
                     f"got {node_rank}")
    if coordinator is None:
        if num_nodes == 1:
            coordinator = f"127.0.0.1:{args.port if args.port is not None else free_port()}"
        elif args.slurm:
            coordinator = f"{slurm_host}:{args.port if args.port is not None else slurm_port}"
        else:
            parser.error(f"--num-nodes {num_nodes} needs --coordinator HOST:PORT (the host of "
                         "node rank 0, the same on every node), or --slurm")

    num_gpus = count_local_gpus(os.environ)
    if num_gpus == 0 or args.all_devices:
        device_ids = [""] * args.nproc
    else:
        if args.nproc > num_gpus:
            parser.error(f"-n {args.nproc} but this host has {num_gpus} usable GPU(s) (one "
                         "process per GPU); use -n <= the GPU count, --all-devices, or "
                         "JAX_PLATFORMS=cpu for CPU processes")
        device_ids = [str(local_rank) for local_rank in range(args.nproc)]

    envs = child_environments(os.environ, coordinator, args.nproc, num_nodes, node_rank,
                              device_ids)
    labels = [f"[rank {env[PROCESS_ID]}] " for env in envs]
    return run_children([command] * args.nproc, envs, labels, prefix=not args.no_prefix,
                        grace=args.grace, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
