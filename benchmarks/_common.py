"""What every benchmark script shares: the machine's description, percentiles, clocks and the JSON header.

The scripts run as ``python benchmarks/X.py`` (this directory is then first on sys.path) and are
imported by the tests with this directory put on sys.path, so ``import _common`` works in both.

Clocks. Every timed sample records wall time (``time.perf_counter``) and one CPU-time clock, named
in the JSON (``"cpu_clock"``) and in the README beside each table:

* ``thread``: ``time.thread_time`` (CLOCK_THREAD_CPUTIME_ID), the calling thread only. Right where
  the work is single-threaded (per-call dispatcher overhead with ``torch.set_num_threads(1)``):
  other processes on a shared machine add wall time but not thread CPU time.
* ``process``: ``time.process_time`` (CLOCK_PROCESS_CPUTIME_ID), every thread of the process. Needed
  where torch's CPU ops run on intra-op worker threads (training steps, large foreach ops): the
  calling thread's CPU time would leave the workers' share out. It includes the OpenMP workers'
  spin-waiting, which grows when they wait on each other, so it is not pure arithmetic either.
"""
import os
import platform
import statistics
import time

# The vector extensions that decide which kernels run (ATen's and ampkit's per-ISA copies).
# benchmarks/fp32_vs_amp.cpp keeps the same list.
VECTOR_FLAGS = ("avx2", "f16c", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_bf16",
                "amx_fp16")

CPU_CLOCKS = {
    "thread": (time.thread_time, "CLOCK_THREAD_CPUTIME_ID: the calling thread's CPU time"),
    "process": (time.process_time, "CLOCK_PROCESS_CPUTIME_ID: CPU time of all the process's threads"),
}


def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model():
    """The processor's model string (/proc/cpuinfo's "model name"; elsewhere platform.processor())."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags():
    """The VECTOR_FLAGS this processor has, in VECTOR_FLAGS's order ([] where /proc/cpuinfo is missing)."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [f for f in VECTOR_FLAGS if f in have]


# The old spelling in fp32_vs_amp.py.
cpu_name = cpu_model


def percentile(values, q):
    """The q-quantile (0 <= q <= 1) of values, linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(values, unit="ms", scale=1.0):
    """{"median_<unit>", "p10_<unit>", "p90_<unit>"} of values multiplied by scale."""
    return {
        f"median_{unit}": statistics.median(values) * scale,
        f"p10_{unit}": percentile(values, 0.1) * scale,
        f"p90_{unit}": percentile(values, 0.9) * scale,
    }


class Timer:
    """Wall time and one CPU-time clock of a block: ``with Timer("process") as t: ...``, then
    ``t.wall_s`` and ``t.cpu_s``."""

    def __init__(self, cpu_clock):
        self._cpu = CPU_CLOCKS[cpu_clock][0]

    def __enter__(self):
        self._c0, self._w0 = self._cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        w1, c1 = time.perf_counter(), self._cpu()
        self.wall_s, self.cpu_s = w1 - self._w0, c1 - self._c0
        return False


def _machine_busy_s():
    """Seconds of CPU time the whole machine spent busy since boot (/proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How busy other processes kept the machine while a block ran: ``with OtherLoad() as load: ...``,
    then ``load.cores``, the CPU time that the machine spent busy minus this process's own (and its
    waited-for children's), over the wall time; 0.0 on an otherwise idle machine, about 1.0 while
    another process holds a core. None where /proc/stat is missing. Resolution: the kernel's tick
    (10 ms), so short blocks read a few hundredths either way (negative values are clamped to 0)."""

    cores = None

    def start(self):
        self._m0, self._o0, self._w0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def stop(self):
        m1, o1, w1 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        if self._m0 is not None and m1 is not None and w1 > self._w0:
            self.cores = round(max(0.0, (m1 - self._m0) - (o1 - self._o0)) / (w1 - self._w0), 3)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def header(benchmark, cpu_clock=None, threads=None, device="cpu", other_load=None):
    """The fields every results JSON starts with: what ran, on which machine, with which clocks, and
    how busy other processes kept the machine meanwhile (an OtherLoad, if given)."""
    import torch

    out = {
        "benchmark": benchmark,
        "device": device,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads() if threads is None else threads,
    }
    if other_load is not None:
        out["other_load_cores"] = other_load.cores
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    if cpu_clock is not None:
        out["cpu_clock"] = cpu_clock
        out["cpu_clock_doc"] = CPU_CLOCKS[cpu_clock][1]
    return out


def write_json(path, data):
    """Writes data as indented JSON (creating the directory), with a final newline."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
