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


def time_call(fn, *args, repeats=10, warmup=2, clock=time.perf_counter):
    """Best and median seconds of fn(*args) (jax outputs blocked on); `clock` wall by default
    (time.process_time: this process's CPU time, which a shared core does not inflate)."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = clock()
        jax.block_until_ready(fn(*args))
        times.append(clock() - t)
    times.sort()
    return times[0], times[len(times) // 2]


def matmul_peak_gflops(n=1024, repeats=10, dtype="float32", device=None, clock=time.perf_counter):
    """Best fp32 GFLOP/s of a jitted n x n matmul (the roofline denominator), on `device` (default:
    JAX's default device)."""
    import jax
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype), device)
    f = jax.jit(lambda x, y: x @ y)
    best, _ = time_call(f, a, b, repeats=repeats, clock=clock)
    return 2 * n ** 3 / best / 1e9


def plain_plan_flops(cfg, pcfg) -> float:
    """FLOPs of one official MPPI action: every iteration values all samples, task emb concatenated."""
    L, T, A, M = cfg.latent_dim, cfg.task_dim, cfg.action_dim, cfg.mlp_dim
    lin = lambda i, o: 2 * i * o
    head = lambda i, out: lin(i, M) + lin(M, M) + lin(M, out)
    reward, nxt, pi = head(L + T + A, cfg.num_bins), head(L + T + A, L), head(L + T, 2 * A)
    q2 = 2 * head(L + T + A, cfg.num_bins)
    per_sample = pcfg.horizon * (reward + nxt) + pi + q2
    enc = sum(lin(i, o) for i, o in zip((cfg.obs_dim + T,) + cfg.enc_hidden, cfg.enc_hidden + (L,)))
    pi_rollout = pcfg.num_pi_trajs * (pcfg.horizon * pi + (pcfg.horizon - 1) * nxt)
    return enc + pi_rollout + pcfg.iterations * pcfg.num_samples * per_sample
