"""What this jax_ep installation can run on this machine.

    python -m jax_ep.info                  # versions, devices, backends and why not
    python -m jax_ep.info --require-built  # also exit 1 unless _cuda and _nvshmem were built

`report()` returns the same as a dict. Nothing here initialises NVSHMEM or a GPU context:
it imports jax_ep's extension modules (which only loads their shared libraries) and asks JAX
for its devices.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys


def _version(distribution: str):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _built(module: str) -> bool:
    return importlib.util.find_spec(f"jax_ep.{module}") is not None


def _load(module: str):
    """None when jax_ep.<module> imports, else why not."""
    try:
        importlib.import_module(f"jax_ep.{module}")
        return None
    except ImportError as err:
        return str(err)


def report() -> dict:
    """jax_ep's and JAX's versions, JAX's devices, and for each backend whether its module was
    built ("built") and imports ("loads"), whether it can run here ("available") and if not
    why ("reason"); "auto" is what `Buffer(backend="auto")` picks for a mesh of
    `jax.devices()`."""
    import jax

    import jax_ep
    from jax_ep import cuda_backend

    try:
        devices = jax.devices()
        device_error = None
    except Exception as err:  # e.g. JAX_PLATFORMS=cuda without a usable GPU
        devices, device_error = [], f"jax.devices() failed: {type(err).__name__} {err}".strip()
    platforms = sorted({d.platform for d in devices})
    gpus = platforms == ["gpu"]
    plugin = _version("jax-cuda13-plugin") or _version("jax-cuda12-plugin")
    no_gpu = (f"JAX sees no GPU (devices: {', '.join(platforms) or 'none'}"
              + (f"; {device_error}" if device_error else "")
              + ("" if plugin else '; no JAX CUDA plugin is installed: pip install "jax[cuda13]"')
              + ")")

    cuda_built = _built("_cuda")
    if not cuda_built:
        cuda_reason = ("jax_ep._cuda was not built (no nvcc when jax_ep was installed; "
                       "reinstall with nvcc on PATH)")
    elif not cuda_backend.is_available():  # cuda_backend imports it, and that failed
        cuda_reason = f"jax_ep._cuda is built but does not load ({cuda_backend.unavailable_reason()})"
    elif not gpus:
        cuda_reason = f"jax_ep._cuda is built, but {no_gpu}"
    else:
        cuda_reason = ""

    nvshmem_built = _built("_nvshmem")
    # Importing loads libnvshmem_host; NVSHMEM is initialised only by an internode Buffer.
    nvshmem_error = _load("_nvshmem") if nvshmem_built else None
    if not nvshmem_built:
        nvshmem_reason = "jax_ep._nvshmem was not built (" + (
            "nvidia-nvshmem-cu13 was not installed before jax_ep was built)" if cuda_built
            else "no nvcc when jax_ep was installed)")
    elif nvshmem_error:
        nvshmem_reason = (f"jax_ep._nvshmem is built but does not load ({nvshmem_error}); "
                          "is libnvshmem_host loadable (pip install nvidia-nvshmem-cu13)?")
    elif cuda_reason:
        nvshmem_reason = "jax_ep._nvshmem is built, but the cuda backend is not available (above)"
    else:
        nvshmem_reason = ""

    return {
        "jax_ep": jax_ep.__version__,
        "jax_ep_path": os.path.dirname(jax_ep.__file__),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "python": platform.python_version(),
        "nvshmem_wheel": _version("nvidia-nvshmem-cu13") or _version("nvidia-nvshmem-cu12"),
        "devices": dict(collections.Counter(d.device_kind for d in devices)),  # kind: count
        "platforms": platforms,
        "backends": {
            "reference": {"built": True, "loads": True, "available": True, "reason": ""},
            "cuda": {"built": cuda_built, "loads": cuda_built and cuda_backend.is_available(),
                     "available": not cuda_reason, "reason": cuda_reason},
            "internode": {"built": nvshmem_built, "loads": nvshmem_built and not nvshmem_error,
                          "available": not nvshmem_reason, "reason": nvshmem_reason},
        },
        # buffer._make_backend: "cuda" for a mesh of GPUs when the extension imports.
        "auto": "cuda" if gpus and cuda_backend.is_available() else "reference",
    }


def format_report(r: dict) -> str:
    labels = {"reference": "reference", "cuda": "cuda", "internode": "internode (NVSHMEM)"}
    lines = [
        f"jax_ep {r['jax_ep']} at {r['jax_ep_path']}",
        f"jax {r['jax']}, jaxlib {r['jaxlib']}, python {r['python']}, "
        f"nvidia-nvshmem wheel {r['nvshmem_wheel'] or 'not installed'}",
        "devices: " + (", ".join(f"{n} x {k}" for k, n in r["devices"].items()) or "none"),
        "backends:",
    ]
    for name, b in r["backends"].items():
        status = "available" if b["available"] else f"not available: {b['reason']}"
        lines.append(f"  {labels[name]:<20} {status}")
    lines.append(f'backend="auto" chooses: {r["auto"]}')
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_ep.info", description=__doc__.split("\n")[0])
    parser.add_argument("--require-built", action="store_true",
                        help="exit 1 unless jax_ep._cuda and jax_ep._nvshmem were built (and load)")
    args = parser.parse_args(argv)
    r = report()
    print(format_report(r))
    if args.require_built:
        missing = [f"{name}: {b['reason']}" for name, b in r["backends"].items() if not b["loads"]]
        if missing:
            print("--require-built: " + "; ".join(missing), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
