"""Once a CPU model runner exists, a step's large buffers reuse the pages freed by the step before."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minor page faults of a run of a jitted function whose 48 MiB output is dropped right after
# (above glibc's mmap threshold, as SmolLM2's batch-32 step buffers are), the median of runs 9-16:
# before and after a ModelRunner is built in the same process.
SCRIPT = """
import json, resource
import jax, jax.numpy as jnp
from jaxinfer.buckets import Buckets
from jaxinfer.config import ModelConfig
from jaxinfer.model import init_params
from jaxinfer.model_runner import ModelRunner

double = jax.jit(lambda x: x * 2)
x = jnp.ones((12 << 20,), jnp.float32)

def faults():
    counts = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        double(x).block_until_ready()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(counts[8:])[4]  # XLA's threads each take a heap of their own first

first = faults()
config = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
ModelRunner(config, init_params(config), jnp.float32, Buckets.create(2, 32, 64, 16, 96), num_pages=8)
print(json.dumps({"before": first, "after": faults()}))
"""


def _faults(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")


@glibc_only
def test_a_cpu_model_runner_spares_later_buffers_their_page_faults():
    faults = _faults()
    # 48 MiB written through fresh 4 KiB pages: ~12,300 faults; through reused pages: none.
    assert faults["before"] > 6000, faults
    assert faults["after"] < 300, faults


@glibc_only
def test_the_c_librarys_policy_stays_when_asked():
    faults = _faults(JAXINFER_KEEP_FREED_MEMORY="0")
    assert faults["before"] > 6000 and faults["after"] > 6000, faults
