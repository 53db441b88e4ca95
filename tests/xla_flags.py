"""XLA_FLAGS for test processes (this one, xdist workers, and every subprocess a test starts).

Tests compile far more than they run, so the CPU backend compiles at LLVM -O1 rather than -O2:
measured on the 2-core machine, the toy pretraining command of test_toyworld 64 s -> 48 s, and the
SeFi method test plus the layout-guidance test (which run longer) 84 s -> 75 s. -O0 compiles
slightly faster still but made those two tests run 149 s: its code is too slow.
"""


def xla_flags(devices: int) -> str:
    """``devices`` host-platform devices, compiled at LLVM -O1."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1"
