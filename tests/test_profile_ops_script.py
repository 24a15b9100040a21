"""scripts/profile_ops.py's summary across GPUs, on a made-up trace (no GPU needed)."""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "profile_ops.py"
_spec = importlib.util.spec_from_file_location("profile_ops", _PATH)
profile_ops = sys.modules["profile_ops"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_ops)


def _kernel(name, ts, dur):
    return {"name": name, "ts": ts, "dur": dur}


def test_latency_is_the_duration_on_the_gpu_that_started_last():
    dispatch = "void jax_ep::low_latency_dispatch_kernel<bf16, 3>"
    # Launch 0: GPU 1 starts 30 us late; GPU 0 waits for it (50 us), GPU 1 takes 20 us.
    # Launch 1: GPU 0 starts 10 us late and takes 25 us.
    gpus = {
        "/device:GPU:0": [_kernel(dispatch, 0, 50), _kernel("fusion_1", 60, 5),
                          _kernel(dispatch, 110, 25)],
        "/device:GPU:1": [_kernel(dispatch, 30, 20), _kernel(dispatch, 100, 35)],
    }
    summary = profile_ops.across_gpus(gpus)
    assert list(summary) == [dispatch]  # XLA's kernels are left out
    n, skew, latency = summary[dispatch]
    assert n == 2
    assert skew == (30 + 10) / 2
    assert latency == (20 + 25) / 2


def test_a_kernel_missing_on_one_gpu_is_left_out():
    gpus = {"/device:GPU:0": [_kernel("jax_ep::a", 0, 5)], "/device:GPU:1": []}
    assert profile_ops.across_gpus(gpus) == {}


def test_kernel_names_are_short_and_keep_the_function():
    mangled = ("__nv_static_34__a7d86ece_12_internode_cu_94f0ff47__ZN6jax_ep45_GLOBAL__N__a7d86ece"
               "_12_internode_cu_94f0ff4718plan_totals_kernelENS_12InternodeViewENS0_8PlanArgsE")
    assert profile_ops.kernel_name(mangled) == "jax_ep::plan_totals_kernel"
    template = "_ZN6jax_ep45_GLOBAL__N__a7d86ece_12_internode_cu_94f0ff4721combine_reduce_kernelI13__nv_bfloat16EEvv"
    assert profile_ops.kernel_name(template) == "jax_ep::combine_reduce_kernel<>"
    demangled = "void jax_ep::low_latency_dispatch_kernel<__nv_bfloat16, 3>(jax_ep::View)" * 2
    assert profile_ops.kernel_name(demangled) == demangled[:70]
