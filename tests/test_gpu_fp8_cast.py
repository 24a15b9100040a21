"""The low-latency kernels' FP8 cast: the conversion instruction they use from sm_89 on gives,
for every float32 bit pattern, the bits of the documented arithmetic that the reference
backend also follows (tests/cuda/e4m3_exhaustive.cu; built here with nvcc).

Run on a GPU machine with `python -m pytest -m gpu tests/test_gpu_fp8_cast.py`."""

import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc():
    for path in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if path and os.path.exists(path):
            return path
    pytest.skip("nvcc not found (set CUDACXX)")


def test_conversion_instruction_matches_the_documented_cast_on_every_float(tmp_path):
    exe = tmp_path / "e4m3_exhaustive"
    subprocess.run([_nvcc(), "-std=c++17", "-O3", "-arch=sm_90a", "--expt-relaxed-constexpr",
                    "-I", ROOT, "-o", str(exe), os.path.join(ROOT, "tests", "cuda", "e4m3_exhaustive.cu")],
                   check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "mismatches 0" in run.stdout, run.stdout + run.stderr
