"""What every benchmark writes beside its figures: command, date, machine, load; and RESULTS.md."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "RESULTS.md")
RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Figures are medians measured on the noisy, shared 2-core CPU machine; compare rows of one "
    "section (one run) with each other rather than across sections. Each section gives its "
    "command, date and machine.\n"
)
# The machine's measured read bandwidth (../shared/FACTS.md: 2-thread AVX2 read loop over 1 GiB).
READ_BANDWIDTH_GBS = 32.6


class ReadBandwidthProbe:
    """The machine's read bandwidth at the moment of asking (``read_bandwidth.cc``: 2 threads, AVX2,
    a 512 MB buffer, median of 5 passes; ~0.3 s): on these shared hosts it jumps between states
    within seconds, and a batch-1 decode moves with it. ``measure`` returns None when the probe
    cannot be built (no C++ compiler or no AVX2)."""

    def __init__(self, directory: str):
        from pallas_kernels import cpu_native

        self._binary: str | None = os.path.join(directory, "read_bandwidth")
        try:
            subprocess.run([cpu_native.cxx_compiler(), "-O3", "-mavx2", "-pthread", "-o", self._binary,
                            os.path.join(REPO, "benchmarks", "read_bandwidth.cc")], check=True, capture_output=True)
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            self._binary = None

    def measure(self) -> float | None:
        if self._binary is None:
            return None
        run = subprocess.run([self._binary, "512", "5"], capture_output=True, text=True)
        return float(run.stdout) if run.returncode == 0 else None


def _run(cmd: list[str], fallback: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return fallback


def machine_line() -> str:
    import jax

    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    # The features that pick jaxinfer's CPU kernels: machines sold under one name differ in them.
    from pallas_kernels import cpu_native

    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in cpu_native.cpu_flags()]
    return (
        f"machine: `{platform.machine()}`, CPU `{cpu}` ({', '.join(flags) or 'none of avx2/avx512f/amx'}), "
        f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"
    )


def command_line() -> str:
    exe = sys.executable
    if exe.startswith(REPO + os.sep):
        exe = os.path.relpath(exe, REPO)
    return shlex.join([exe, os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]])


def date_utc() -> str:
    return _run(["date", "-u"], time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime()))


def load_average() -> str:
    return _run(["uptime"], "load average: %.2f, %.2f, %.2f" % os.getloadavg())


def cpu_times() -> list[int]:
    """The machine's cumulative CPU time counters (Linux's /proc/stat; empty elsewhere)."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def stolen_since(before: list[int]) -> str:
    """The share of CPU time since ``before`` (``cpu_times``) that the hypervisor gave to other
    guests: on these shared VMs the cause of most run-to-run noise."""
    after = cpu_times()
    if len(before) < 8 or len(after) < 8:
        return "CPU steal time unknown"
    delta = [b - a for a, b in zip(before, after)]
    return f"CPU time stolen by the hypervisor during the run: {100 * delta[7] / max(1, sum(delta)):.1f}%"


def append_results(text: str) -> None:
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a") as f:
        if new:
            f.write(RESULTS_HEADER)
        f.write("\n" + text)
    print(f"appended to {os.path.relpath(RESULTS, REPO)}")


def publish(title: str, *blocks: list[str], write: bool) -> None:
    """Print ``blocks`` of lines (a table, notes...) separated by blank lines; with ``write``, also
    append them to RESULTS.md under ``## title (date)`` with the command, date and machine."""
    blocks = [b for b in blocks if b]
    print("\n" + "\n\n".join("\n".join(b) for b in blocks))
    if write:
        date = date_utc()
        head = [f"## {title} ({date})", "", f"- command: `{command_line()}`", f"- date: `{date}`",
                "- " + machine_line()]
        append_results("\n\n".join("\n".join(b) for b in [head, *blocks]) + "\n")


def plot_reference(path: str) -> str:
    """How RESULTS.md names a plot: its path in the repository, or a note that it is elsewhere."""
    path = os.path.abspath(path)
    if path.startswith(REPO + os.sep):
        return f"`{os.path.relpath(path, REPO)}`"
    return f"written outside the repository (`{path}`), not kept"


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
