"""Prefill and decode tokens/s of SmolLM2-135M at batch 1 in float32: jaxinfer vs transformers.

Both engines run in this one process on the same weights (the embedded Q4_1 GGUF, dequantized to
float32: jaxinfer through its converter, transformers through ``from_pretrained(gguf_file=...)``)
and the same prompt (``--prompt-tokens`` tokens of real English text from
``pydoc_data.topics``). Repeats alternate between the two engines so that a change of load on
the shared machine hits both.

jaxinfer: ``LLM`` with ``max_batch_size=1``, shape buckets compiled and one untimed run done
before timing.
  - prefill: time to first token of ``generate(prompt, max_tokens=1)`` (one 512-token chunk by
    default), tokens/s = P / TTFT.
  - decode: one request of D tokens driven by ``engine.step()`` directly; the first step is the
    prefill, each of the D-1 following steps decodes one token and is timed on its own;
    tokens/s = (D-1) / sum of step times.
transformers: torch float32, ``torch.set_num_threads(2)``.
  - prefill: one forward of the prompt (``logits_to_keep=1``, as ``generate`` does).
  - decode: ``generate(do_sample=False, max_new_tokens=D, min_new_tokens=D)``; a streamer stamps
    every new token, decode = time from the first to the last new token over D-1 tokens (i.e.
    total - time to first token).

Table: medians over repeats; ms/decode step = 1000 / decode tokens/s. The median single step (over
all steps of all repeats) is reported beside it: on a loaded machine a few very slow steps pull
the mean far from it, and best-repeat figures are printed as well.
Weights GB/s = bytes of all parameters (the tied embedding counted once: the LM head reads it)
per decode step / step time; the bound is ~538 MB at ~32.6 GB/s = 16.5 ms (docs: FACTS).

    .venv/bin/python benchmarks/decode.py                    # print the table
    .venv/bin/python benchmarks/decode.py --write-results    # and append it to RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np
from report import READ_BANDWIDTH_GBS, load_average, publish


# Machine figures from FACTS.md.
FACTS_WEIGHT_BYTES = 538e6  # SmolLM2-135M in float32


# -- the prompt ---------------------------------------------------------------------------------

def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(english_text(), add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"the English text has only {len(ids)} tokens; asked for {n}")
    return ids[:n]


# -- jaxinfer -------------------------------------------------------------------------------------

class JaxSide:
    def __init__(self):
        import jax

        from converters.convert import embedded_model_path
        from converters.loader import load_model
        from jaxinfer.llm import LLM

        t = time.perf_counter()
        self.loaded = load_model(embedded_model_path(progress=False), np.float32, progress=False)
        t_load = time.perf_counter() - t
        # Every parameter leaf once: with tied embeddings there is no separate LM head leaf.
        self.weight_bytes = int(sum(a.nbytes for a in jax.tree.leaves(self.loaded.params)))
        t = time.perf_counter()
        self.llm = LLM(self.loaded, warmup=True, progress=False, max_batch_size=1)
        t_warm = time.perf_counter() - t
        self.engine = self.llm.engine
        self.tokenizer = self.loaded.tokenizer
        print(
            f"jaxinfer: loaded in {t_load:.1f} s, buckets {self.engine.buckets.all_shapes()} warmed up "
            f"in {t_warm:.1f} s; {self.weight_bytes / 1e6:.1f} MB of weights",
            flush=True,
        )
        self._ids = 0
        self.prompt: list[int] = []
        self.last_tokens: list[int] = []

    def ttft(self) -> float:
        from jaxinfer.sampling_params import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        t = time.perf_counter()
        (out,) = self.llm.generate([self.prompt], params)
        elapsed = time.perf_counter() - t
        assert len(out.outputs[0].token_ids) == 1
        return elapsed

    def decode(self, d: int) -> tuple[float, list[float]]:
        """(time of the first step = prefill, [time of each following decode step])."""
        from jaxinfer.sampling_params import SamplingParams

        engine = self.engine
        self._ids += 1
        rid = f"bench-{self._ids}"
        decode_before = engine.stats.decode_tokens
        engine.add_request(rid, self.prompt, SamplingParams(temperature=0, max_tokens=d, ignore_eos=True))
        t = time.perf_counter()
        outs = engine.step()
        first = time.perf_counter() - t
        steps = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            steps.append(time.perf_counter() - t)
        (out,) = outs
        assert out.finished and len(out.outputs[0].token_ids) == d, out
        assert engine.stats.decode_tokens - decode_before == d - 1 == len(steps)
        self.last_tokens = list(out.outputs[0].token_ids)
        return first, steps


# -- transformers ---------------------------------------------------------------------------------

class TorchSide:
    def __init__(self):
        import torch
        from transformers import AutoModelForCausalLM

        from converters.convert import embedded_model_gguf

        from transformers.utils import logging as hf_logging

        torch.set_num_threads(2)
        hf_logging.disable_progress_bar()
        self.torch = torch
        gguf = embedded_model_gguf()
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
        ).eval()
        print(
            f"transformers: loaded the GGUF in {time.perf_counter() - t:.1f} s "
            f"(torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"attention {self.model.config._attn_implementation})",
            flush=True,
        )
        self.input_ids = None
        self.last_tokens: list[int] = []

    def set_prompt(self, ids: list[int]) -> None:
        self.input_ids = self.torch.tensor([ids], dtype=self.torch.long)

    def prefill(self) -> float:
        with self.torch.inference_mode():
            t = time.perf_counter()
            out = self.model(input_ids=self.input_ids, use_cache=True, logits_to_keep=1)
            out.logits.argmax(-1).item()
            return time.perf_counter() - t

    def generate(self, d: int) -> tuple[float, list[float]]:
        """(time to first new token, [interval between consecutive new tokens])."""
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with self.torch.inference_mode():
            t = time.perf_counter()
            out = self.model.generate(
                self.input_ids, attention_mask=self.torch.ones_like(self.input_ids), do_sample=False,
                max_new_tokens=d, min_new_tokens=d, pad_token_id=2, streamer=Clock(),
            )
        # stamps[0]: the prompt, put before any forward; stamps[1:]: one per new token.
        assert len(stamps) == d + 1, len(stamps)
        self.last_tokens = out[0, self.input_ids.shape[1]:].tolist()
        return stamps[1] - t, [b - a for a, b in zip(stamps[1:], stamps[2:])]


def median(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length P (default 512)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens generated D (default 128)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement (default 5)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    p, d, reps = args.prompt_tokens, args.decode_tokens, args.repeats
    if p < 1 or d < 2 or reps < 1:
        ap.error("need --prompt-tokens >= 1, --decode-tokens >= 2, --repeats >= 1")

    load_before = load_average()
    jx = JaxSide()
    jx.prompt = prompt_ids(jx.tokenizer, p)
    th = TorchSide()
    th.set_prompt(jx.prompt)

    # Untimed warm-up of exactly the timed paths.
    jx.ttft()
    jx.decode(min(d, 8))
    th.prefill()
    th.generate(min(d, 8))
    gc.collect()

    jx_ttft, jx_first, jx_step_med, jx_decode_tps = [], [], [], []
    th_prefill, th_ttft, th_decode_tps = [], [], []
    all_jx_steps: list[float] = []
    all_th_steps: list[float] = []
    for r in range(reps):
        jx_ttft.append(jx.ttft())
        first, steps = jx.decode(d)
        jx_first.append(first)
        jx_step_med.append(median(steps))
        jx_decode_tps.append((d - 1) / sum(steps))
        all_jx_steps += steps
        time.sleep(0.2)  # let the other runtime's worker threads go idle
        th_prefill.append(th.prefill())
        ttft, th_steps = th.generate(d)
        th_ttft.append(ttft)
        th_decode_tps.append((d - 1) / sum(th_steps))
        all_th_steps += th_steps
        time.sleep(0.2)
        print(
            f"repeat {r + 1}/{reps}: jaxinfer TTFT {jx_ttft[-1] * 1e3:.1f} ms, decode {jx_decode_tps[-1]:.1f} tok/s "
            f"(median step {jx_step_med[-1] * 1e3:.2f} ms) | transformers prefill {th_prefill[-1] * 1e3:.1f} ms, "
            f"decode {th_decode_tps[-1]:.1f} tok/s",
            flush=True,
        )
    load_after = load_average()

    agree = 0
    for a, b in zip(jx.last_tokens, th.last_tokens):
        if a != b:
            break
        agree += 1

    wb = jx.weight_bytes
    bound_ms = FACTS_WEIGHT_BYTES / (READ_BANDWIDTH_GBS * 1e9) * 1e3
    # ms/decode step and weight GB/s follow from the decode tok/s column (a repeat's mean step,
    # median over repeats); the median single step is given too: under contention a few very
    # slow steps pull the mean far from it.
    rows = []  # name, prefill tok/s, decode tok/s, ms/step, GB/s, fraction, median single step ms, its GB/s
    for name, prefill_s, decode_tps, single_s in (
        ("jaxinfer", median(jx_ttft), median(jx_decode_tps), median(all_jx_steps)),
        ("transformers", median(th_prefill), median(th_decode_tps), median(all_th_steps)),
    ):
        step_s = 1.0 / decode_tps
        gbs = wb / step_s / 1e9
        rows.append(
            (name, p / prefill_s, decode_tps, step_s * 1e3, gbs, gbs / READ_BANDWIDTH_GBS, single_s * 1e3, wb / single_s / 1e9)
        )
    rows.append(
        ("bound: 538 MB read at 32.6 GB/s", float("nan"), 1e3 / bound_ms, bound_ms, READ_BANDWIDTH_GBS, 1.0,
         bound_ms, READ_BANDWIDTH_GBS)
    )

    def fmt(x, spec):
        return "-" if x != x else format(x, spec)

    table = [
        "| engine | prefill tok/s | decode tok/s | ms/decode step | weight GB/s | fraction of 32.6 GB/s "
        "| median single step ms | GB/s at median step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, pre, dec, ms, gbs, frac, single_ms, single_gbs in rows:
        table.append(
            f"| {name} | {fmt(pre, '.0f')} | {fmt(dec, '.1f')} | {fmt(ms, '.2f')} | {fmt(gbs, '.1f')} | "
            f"{fmt(frac, '.0%')} | {fmt(single_ms, '.2f')} | {fmt(single_gbs, '.1f')} |"
        )
    best = {
        "jaxinfer": (p / min(jx_ttft), max(jx_decode_tps)),
        "transformers": (p / min(th_prefill), max(th_decode_tps)),
    }
    ratio_prefill = rows[0][1] / rows[1][1]
    ratio_decode = rows[0][2] / rows[1][2]
    jx_first_ms = median(jx_first) * 1e3
    th_ttft_ms = median(th_ttft) * 1e3
    notes = [
        f"- jaxinfer / transformers (medians): prefill **{ratio_prefill:.2f}x**, decode **{ratio_decode:.2f}x**. "
        f"Best repeat of each (least disturbed): jaxinfer prefill {best['jaxinfer'][0]:.0f} tok/s, decode "
        f"{best['jaxinfer'][1]:.1f} tok/s; transformers prefill {best['transformers'][0]:.0f} tok/s, decode "
        f"{best['transformers'][1]:.1f} tok/s; ratios prefill {best['jaxinfer'][0] / best['transformers'][0]:.2f}x, "
        f"decode {best['jaxinfer'][1] / best['transformers'][1]:.2f}x.",
        f"- Prompt: {p} tokens of `pydoc_data.topics` English text; decode: {d} tokens (ignore EOS), "
        f"{reps} repeats alternating the engines; medians.",
        f"- ms/decode step = 1000 / decode tok/s; weight GB/s = weights read per decode step / ms per "
        f"step. Weights read per decode step: {wb / 1e6:.1f} MB (all parameters, tied embedding once). "
        f"Batch-1 decode bound from FACTS.md: 538 MB / 32.6 GB/s = {bound_ms:.1f} ms/step "
        f"= {1e3 / bound_ms:.0f} tok/s.",
        f"- jaxinfer prefill = TTFT of `LLM.generate(max_tokens=1)` (median {median(jx_ttft) * 1e3:.1f} ms); "
        f"first `engine.step()` of the decode runs (the same prefill) {jx_first_ms:.1f} ms. "
        f"Decode = timed `engine.step()` calls: tok/s = (D-1)/sum of steps; median single step over all "
        f"{len(all_jx_steps)} steps (min {min(all_jx_steps) * 1e3:.2f}, max {max(all_jx_steps) * 1e3:.2f}).",
        f"- transformers prefill = one forward of the prompt, median {median(th_prefill) * 1e3:.1f} ms "
        f"(TTFT inside `generate`: {th_ttft_ms:.1f} ms); decode = first to last new token of "
        f"`generate(do_sample=False, max_new_tokens={d}, min_new_tokens={d})` over {d - 1} tokens "
        f"(streamer time stamps); median single step = median interval between new tokens (min "
        f"{min(all_th_steps) * 1e3:.2f}, max {max(all_th_steps) * 1e3:.2f}).",
        f"- Greedy outputs of the two engines agree on the first {agree} of {d} tokens.",
        f"- Per-repeat prefill ms: jaxinfer {', '.join(f'{x * 1e3:.0f}' for x in jx_ttft)}; "
        f"transformers {', '.join(f'{x * 1e3:.0f}' for x in th_prefill)}. Per-repeat decode tok/s: jaxinfer "
        f"{', '.join(f'{x:.1f}' for x in jx_decode_tps)}; transformers {', '.join(f'{x:.1f}' for x in th_decode_tps)}.",
        f"- Load: before `{load_before}`; after `{load_after}`.",
    ]
    publish("Prefill and decode, SmolLM2-135M fp32, batch 1: jaxinfer vs transformers", table, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
