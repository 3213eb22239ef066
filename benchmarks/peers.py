"""The peers that ``throughput.py`` measures jaxinfer against, on the same weights and prompts.

- ``write_dense_gguf``: an F32 GGUF holding exactly the weights of the embedded Q4_1 GGUF (every
  tensor dequantized with ``gguf.quants.dequantize``; all metadata copied), for llama.cpp; or a
  BF16 one, the same matrices rounded to bfloat16.
- ``LlamaCppPeer``: llama.cpp through ``llama-cpp-python`` (``make bench`` installs it), batch 1.
- ``TransformersPeer``: ``transformers`` batched greedy ``generate`` in float32 on the GGUF.

Every runner returns the same thing: for each request, ``[(time, tokens so far), ...]`` stamped
with ``time.perf_counter()`` whenever the request got new tokens, plus the submission time and the
generated token ids, so ``throughput.py`` computes every engine's figures with one function.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Run:
    """One timed batch: submission time, per-request (time, tokens so far) stamps, token ids."""

    submitted: float
    stamps: list[list[tuple[float, int]]]
    tokens: list[list[int]] = field(default_factory=list)


# -- the F32 and BF16 GGUFs ------------------------------------------------------------------------

def dense_gguf_path(src: str, dtype: str = "F32") -> str:
    from jaxinfer.home import jaxinfer_home

    name = os.path.basename(src)
    stem = name[: -len(".gguf")] if name.endswith(".gguf") else name
    for suffix in (".Q4_1", ".Q4_0", ".Q8_0", ".F16"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return os.path.join(jaxinfer_home(), "bench", f"{stem}.{dtype}.gguf")


def write_dense_gguf(src_gguf: str, out_path: str | None = None, overwrite: bool = False,
                     dtype: str = "F32") -> str:
    """Write (once; cached under ``$JAXINFER_HOME/bench``) ``src_gguf`` with every tensor in F32
    (or, ``dtype="BF16"``, every matrix in BF16).

    Same tensor names, order and ggml shapes; every metadata key/value copied (tokenizer arrays,
    chat template, ...) except ``general.file_type``, set to ``ALL_F32`` (0). The values are the
    source's quantized values dequantized exactly (Q4_1: q*d + m), so the weights are the same
    numbers, only stored wider.

    ``dtype="BF16"``: the matrices instead in BF16, those values rounded to nearest even (what
    ``--dtype bfloat16`` gives jaxinfer), vectors (norms) still F32; file type ``MOSTLY_BF16``.
    """
    import gguf

    out_path = out_path or dense_gguf_path(src_gguf, dtype)
    if os.path.exists(out_path) and not overwrite and os.path.getmtime(out_path) >= os.path.getmtime(src_gguf):
        return out_path
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    if dtype not in ("F32", "BF16"):
        raise ValueError(f"dtype must be F32 or BF16, not {dtype!r}")
    bf16 = dtype == "BF16"
    file_type = gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32
    reader = gguf.GGUFReader(src_gguf)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents()
    tmp = out_path + f".tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    wrote_file_type = False
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue  # the writer writes the header and the architecture itself
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if f.name == gguf.Keys.General.FILE_TYPE:
            value, wrote_file_type = int(file_type), True
        writer.add_key_value(f.name, value, vtype, sub_type=sub_type)
    if not wrote_file_type:
        writer.add_file_type(int(file_type))
    for t in reader.tensors:
        # dequantize() returns numpy order (ggml's shape reversed), which add_tensor reverses back.
        values = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if values.shape != expected:
            values = values.reshape(expected)
        if bf16 and values.ndim > 1:
            writer.add_tensor(t.name, _bf16_bits(values), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(t.name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return out_path


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the bfloat16 bit patterns, rounded to nearest even, as uint16."""
    import ml_dtypes

    return values.astype(ml_dtypes.bfloat16).view(np.uint16)


def check_f32_gguf(src_gguf: str, f32_gguf: str, tensors: int = 6) -> str:
    """A short description of how the F32 file relates to the source (same names/shapes/values)."""
    import gguf

    a, b = gguf.GGUFReader(src_gguf), gguf.GGUFReader(f32_gguf)
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    assert names_a == names_b, "tensor names or order differ"
    assert all(list(x.shape) == list(y.shape) for x, y in zip(a.tensors, b.tensors)), "tensor shapes differ"
    assert all(y.tensor_type == gguf.GGMLQuantizationType.F32 for y in b.tensors), "a tensor is not F32"
    keys_a = {k for k in a.fields if not k.startswith("GGUF.")}
    keys_b = {k for k in b.fields if not k.startswith("GGUF.")}
    assert keys_a == keys_b, f"metadata keys differ: {sorted(keys_a ^ keys_b)}"
    for k in keys_a - {gguf.Keys.General.FILE_TYPE}:
        assert a.fields[k].contents() == b.fields[k].contents(), f"metadata {k} differs"
    step = max(1, len(a.tensors) // tensors)
    for x, y in list(zip(a.tensors, b.tensors))[::step]:
        np.testing.assert_array_equal(gguf.quants.dequantize(x.data, x.tensor_type), np.asarray(y.data, np.float32))
    types: dict[str, int] = {}
    for t in a.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return (
        f"{len(names_b)} tensors ({', '.join(f'{n} {k}' for k, n in sorted(types.items()))} in the source) "
        f"all F32, same names/order/shapes, all {len(keys_a)} metadata keys copied "
        f"(general.file_type -> ALL_F32), {os.path.getsize(f32_gguf) / 1e6:.0f} MB"
    )


# -- llama.cpp ------------------------------------------------------------------------------------

_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, n_batch=512, verbose=False)
for tok in llm.generate(list(range(1000, 1016)), temp=0.0):
    break
"""


def default_buffers_work(model_path: str) -> bool:
    """Whether llama.cpp with its default (extra) buffer types survives a 16-token prompt.

    In a subprocess, because it may not: on a CPU with AMX, llama.cpp puts quantized weights in
    its AMX buffer type, and in the llama.cpp of llama-cpp-python 0.3.36 a matmul of more than one
    row there (any prompt of 2+ tokens) dies of a general protection fault at ``ldtilecfg`` in
    ``ggml_backend_amx_mul_mat`` on this project's Xeon (single-token decode works).
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PROBE, model_path], capture_output=True, timeout=300)
    return proc.returncode == 0


class LlamaCppPeer:
    """``llama_cpp.Llama`` at batch 1: greedy generation from a token-id prompt.

    ``extra_bufts=False`` turns off llama.cpp's extra buffer types (AMX, repacked weights: the
    model parameter ``use_extra_bufts``, which ``Llama`` does not expose). ``n_batch=1`` feeds the
    prompt one token per decode.
    """

    def __init__(self, model_path: str, n_ctx: int, n_threads: int = 2, n_batch: int = 512, extra_bufts: bool = True):
        import llama_cpp
        import llama_cpp.llama_cpp as capi

        self.version = llama_cpp.__version__
        self.path = model_path
        self.n_threads, self.n_batch, self.extra_bufts = n_threads, n_batch, extra_bufts
        default_params = capi.llama_model_default_params

        def model_params():
            p = default_params()
            p.use_extra_bufts = extra_bufts
            return p

        t = time.perf_counter()
        capi.llama_model_default_params = model_params
        try:
            self.llm = llama_cpp.Llama(
                model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                n_batch=n_batch, verbose=False,
            )
        finally:
            capi.llama_model_default_params = default_params
        self.load_s = time.perf_counter() - t

    def run(self, prompt: list[int], output_len: int) -> Run:
        """Generate ``output_len`` tokens greedily (EOS does not stop it); stamp each token."""
        llm = self.llm
        llm.reset()  # no reuse of the previous run's prompt: every run computes its prefill
        stamps: list[tuple[float, int]] = []
        tokens: list[int] = []
        submitted = time.perf_counter()
        gen = llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        for tok in gen:
            tokens.append(int(tok))
            stamps.append((time.perf_counter(), len(tokens)))
            if len(tokens) >= output_len:
                break
        gen.close()
        return Run(submitted, [stamps], [tokens])

    def close(self) -> None:
        self.llm.close()  # now, not in __del__ at interpreter exit (which fails noisily)


# -- transformers ---------------------------------------------------------------------------------

class TransformersPeer:
    """``transformers`` greedy batched ``generate`` (float32, or ``dtype``), weights from the GGUF."""

    def __init__(self, gguf_path: str, threads: int = 2, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        self.torch = torch
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=getattr(torch, dtype)
        ).eval()
        self.dtype = dtype
        self.load_s = time.perf_counter() - t
        self.version = __import__("transformers").__version__
        self.threads = torch.get_num_threads()
        self.attention = self.model.config._attn_implementation
        self.pad_id = 2  # SmolLM2: eos = pad = 2

    def run(self, prompts: list[list[int]], output_len: int) -> Run:
        """One ``generate`` over all prompts (left-padded), exactly ``output_len`` new tokens each."""
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        times: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        with torch.inference_mode():
            submitted = time.perf_counter()
            out = self.model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len,
                pad_token_id=self.pad_id, streamer=Clock(),
            )
        # times[0]: the prompt, put before any forward; times[1:]: one per new token (whole batch).
        assert len(times) == output_len + 1, (len(times), output_len)
        per_token = [(t, k + 1) for k, t in enumerate(times[1:])]
        tokens = [out[i, width:].tolist() for i in range(len(prompts))]
        return Run(submitted, [list(per_token) for _ in prompts], tokens)


# -- llama-server (llama.cpp's own HTTP server) ---------------------------------------------------

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_SERVER_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # as `make bench` builds llama-cpp-python (CMAKE_ARGS=-DGGML_NATIVE=ON)
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # or its configure step tries to download a web UI
    "-DLLAMA_BUILD_TESTS=OFF",
)


def llama_cpp_dir() -> str:
    """Where ``build_llama_server`` puts llama.cpp: ``$JAXINFER_HOME/bench/llama.cpp``."""
    from jaxinfer.home import jaxinfer_home

    return os.path.join(jaxinfer_home(), "bench", "llama.cpp")


def build_llama_server(
    version: str = LLAMA_CPP_PYTHON_VERSION,
    targets: tuple[str, ...] = ("llama-server",),
    jobs: int | None = None,
    log=print,
) -> str:
    """Build llama.cpp's ``llama-server`` from the llama.cpp vendored in ``llama-cpp-python``'s sdist.

    Once: ``pip download --no-binary :all: --no-deps llama-cpp-python==VERSION``, unpack its
    ``vendor/llama.cpp`` into ``$JAXINFER_HOME/bench/llama.cpp`` and build ``targets`` there in
    Release (``LLAMA_SERVER_CMAKE_ARGS``; ~6 min on 2 cores). Returns the ``llama-server`` path;
    a later call finds the binary (and the stamp naming version and CMake arguments) and returns
    at once.
    """
    import glob
    import shutil
    import subprocess
    import sys
    import tarfile
    import tempfile

    root = llama_cpp_dir()
    binary = os.path.join(root, "build", "bin", "llama-server")
    stamp_path = os.path.join(root, "build", "jaxinfer-build-stamp")
    stamp = f"llama-cpp-python=={version} " + " ".join(LLAMA_SERVER_CMAKE_ARGS) + " targets=" + ",".join(targets)
    if os.access(binary, os.X_OK) and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if f.read().strip() == stamp:
                return binary
    if not shutil.which("cmake"):
        raise RuntimeError("building llama-server needs cmake and a C++ compiler (apt-get install cmake g++)")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(root, "CMakeLists.txt")) or _vendored_version(root) != version:
        with tempfile.TemporaryDirectory(prefix="llama-cpp-python-sdist-") as tmp:
            log(f"llama-server: downloading the llama-cpp-python=={version} sdist")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                 f"llama-cpp-python=={version}", "-d", tmp],
                check=True,
            )
            (sdist,) = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            (vendored,) = glob.glob(os.path.join(tmp, "llama_cpp_python-*", "vendor", "llama.cpp"))
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(os.path.dirname(root), exist_ok=True)
            shutil.move(vendored, root)
            with open(os.path.join(root, "jaxinfer-llama-cpp-python-version"), "w") as f:
                f.write(version + "\n")
    jobs = jobs or os.cpu_count() or 2
    log(f"llama-server: building {' '.join(targets)} in {root} with {jobs} jobs (about 6 minutes on 2 cores)")
    build = os.path.join(root, "build")
    os.makedirs(build, exist_ok=True)
    build_log = os.path.join(build, "jaxinfer-build.log")
    with open(build_log, "w") as out:
        for cmd in (["cmake", "-S", root, "-B", build, *LLAMA_SERVER_CMAKE_ARGS],
                    ["cmake", "--build", build, "--target", *targets, "-j", str(jobs)]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                with open(build_log, errors="replace") as f:
                    tail = "".join(f.readlines()[-30:])
                raise RuntimeError(f"building llama-server failed ({' '.join(cmd)}); log {build_log}:\n{tail}")
    with open(stamp_path, "w") as f:
        f.write(stamp + "\n")
    log(f"llama-server: built {binary} in {(time.perf_counter() - t0) / 60:.1f} min")
    return binary


def _vendored_version(root: str) -> str | None:
    try:
        with open(os.path.join(root, "jaxinfer-llama-cpp-python-version")) as f:
            return f.read().strip()
    except OSError:
        return None
