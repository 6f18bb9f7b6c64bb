"""Benchmark helpers: pin to N cores before JAX starts, time jitted calls, measure the matmul peak."""
import os
import time


def pin_cores(cores: int):
    """Restrict this process (and XLA's thread pools) to `cores` CPUs. Call before importing jax."""
    avail = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, avail[:cores])
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "force_host_platform_device_count" not in f)
    if cores == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()


def time_call(fn, *args, repeats=10, warmup=2):
    """Best and median wall seconds of fn(*args) (jax outputs blocked on)."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0], times[len(times) // 2]


def matmul_peak_gflops(n=1024, repeats=10, dtype="float32"):
    """Best fp32 GFLOP/s of a jitted n x n matmul (the roofline denominator)."""
    import jax
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    best, _ = time_call(f, a, b, repeats=repeats)
    return 2 * n ** 3 / best / 1e9
