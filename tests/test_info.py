"""python -m jax_ep.info and jax_ep.info.report() (CPU), and the README's install commands
that CI runs."""

import pathlib
import re
import subprocess
import sys

import jax

import jax_ep
from jax_ep import cuda_backend, info, internode

ROOT = pathlib.Path(__file__).parent.parent


def _gpus() -> bool:
    return {d.platform for d in jax.devices()} == {"gpu"}


def test_cli_reports_backends():
    # Run it on the jax_ep this process imported (the checkout or site-packages).
    proc = subprocess.run([sys.executable, "-m", "jax_ep.info"], capture_output=True, text=True,
                          cwd=pathlib.Path(jax_ep.__file__).parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"jax_ep {jax_ep.__version__}" in out and f"jax {jax.__version__}" in out
    assert re.search(r"^  reference +available$", out, re.M), out
    cuda = re.search(r"^  cuda +(.*)$", out, re.M).group(1)
    if not cuda_backend.is_available():
        assert cuda.startswith("not available: jax_ep._cuda"), cuda
    elif _gpus():
        assert cuda == "available", cuda
    else:
        assert cuda.startswith("not available: jax_ep._cuda is built, but JAX sees no GPU"), cuda
    assert re.search(r"^  internode \(NVSHMEM\) +(available|not available: .+)$", out, re.M), out
    auto = "cuda" if cuda == "available" else "reference"
    assert f'backend="auto" chooses: {auto}' in out


def test_report_dict():
    r = info.report()
    assert (r["jax_ep"], r["jax"]) == (jax_ep.__version__, jax.__version__)
    assert sum(r["devices"].values()) == len(jax.devices())
    backends = r["backends"]
    assert backends["reference"] == {"built": True, "loads": True, "available": True, "reason": ""}
    cuda = backends["cuda"]
    assert cuda["loads"] == cuda_backend.is_available()
    assert cuda["available"] == (cuda_backend.is_available() and _gpus())
    assert cuda["available"] == (cuda["reason"] == "")
    assert r["auto"] == ("cuda" if cuda["available"] else "reference")
    nvshmem = backends["internode"]
    assert not nvshmem["available"] or cuda["available"]
    assert nvshmem["available"] == (nvshmem["reason"] == "")
    assert not internode._initialized  # report() never initialises NVSHMEM


def test_reasons_without_modules(monkeypatch):
    """A pure-Python install: neither module built."""
    monkeypatch.setattr(info, "_built", lambda module: False)
    backends = info.report()["backends"]
    assert not backends["cuda"]["built"] and not backends["cuda"]["available"]
    assert "jax_ep._cuda was not built" in backends["cuda"]["reason"]
    assert "jax_ep._nvshmem was not built" in backends["internode"]["reason"]
    assert backends["reference"]["available"]
    out = info.format_report(info.report())
    assert "jax_ep._cuda was not built" in out and 'backend="auto" chooses' in out


def test_reason_nvshmem_not_loadable(monkeypatch):
    monkeypatch.setattr(info, "_built", lambda module: True)

    monkeypatch.setattr(info, "_load", lambda module: "libnvshmem_host.so.3: cannot open shared "
                        "object file: No such file or directory")
    nvshmem = info.report()["backends"]["internode"]
    assert nvshmem["built"] and not nvshmem["loads"] and not nvshmem["available"]
    assert "does not load" in nvshmem["reason"] and "libnvshmem_host" in nvshmem["reason"]


def test_ci_installs_as_readme():
    """.ci/run runs the README's commands for a machine with nvcc verbatim, and its test command."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"CI \(`\.ci/run`\) runs exactly these:\n\n```bash\n(.*?)```", readme, re.S)
    commands = block.group(1).strip().splitlines()
    assert any("nvidia-nvshmem-cu13" in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in ["python -m jax_ep.demo", "python -m pytest tests"]:
        assert f"```bash\n{command}\n```" in readme, command
    for command in commands + ["python -m jax_ep.demo", "python -m pytest tests"]:
        assert command in ci, command
