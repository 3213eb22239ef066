"""Once a CPU model runner exists, a step's large buffers reuse the pages freed by the step before."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minor page faults of one run of a jitted function whose 48 MiB output is dropped right after
# (above glibc's mmap threshold, as SmolLM2's batch-32 step buffers are), after runs to warm it:
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
    for _ in range(3):  # a result may be freed only after the next run allocates: two blocks take turns
        double(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    double(x).block_until_ready()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

first = faults()
config = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
ModelRunner(config, init_params(config), jnp.float32, Buckets.create(2, 32, 64, 16, 96), num_pages=8)
print(json.dumps({"before": first, "after": faults()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_a_cpu_model_runner_spares_later_buffers_their_page_faults():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    # 48 MiB written through fresh 4 KiB pages: ~12,300 faults; through reused pages: none.
    assert faults["before"] > 6000, faults
    assert faults["after"] < 300, faults
