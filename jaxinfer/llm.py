"""The offline Python API, in vLLM's shape: ``LLM(model).generate(prompts, sampling_params)``.

This module sits at the API layer: it may use ``converters`` (to load any model path); the engine
below it never does.
"""

from __future__ import annotations

import itertools
from typing import Sequence, Union

from tqdm.auto import tqdm

from jaxinfer.engine import LLMEngine
from jaxinfer.engine_config import EngineConfig
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]
Message = dict


def build_engine(model=None, dtype=None, warmup: bool = True, progress: bool = True, model_format: str | None = None,
                 keep_quantized: bool | None = None, **engine_options) -> LLMEngine:
    """An engine for ``model``: an HF dir, a .gguf file, a converted dir (default: the embedded
    SmolLM2), or an already loaded ``converters.loader.LoadedModel``. ``model_format`` and
    ``keep_quantized`` are ``load_model``'s; ``engine_options`` are the fields of ``EngineConfig``.
    For asyncio callers: ``AsyncLLM(build_engine(...))``. The engine lays the weights out in its own
    copy (fused, packed for its CPU matmul kernels, in huge pages): a model loaded here is emptied
    into that copy as it goes, while a ``LoadedModel`` passed in is left whole, and a caller that
    keeps it holds a second copy of the weights (``del loaded`` after this call frees it)."""
    from converters.convert import embedded_model_path
    from converters.loader import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(model or embedded_model_path(), dtype, model_format=model_format, keep_quantized=keep_quantized)
    return LLMEngine(
        loaded.config, loaded.params, loaded.tokenizer, EngineConfig(**engine_options),
        loaded.dtype, warmup=warmup, progress=progress, consume_params=not isinstance(model, LoadedModel),
    )


class LLM:
    """A model and its engine, for offline batches; arguments as ``build_engine``."""

    def __init__(self, model=None, dtype=None, warmup: bool = True, progress: bool = True, **options):
        self.engine = build_engine(model, dtype, warmup, progress, **options)
        self.model_config = self.engine.model_config
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompts as token id lists")
        return self.engine.tokenizer

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.get_tokenizer().encode(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in order; all prompts are batched continuously by the engine."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_ids = [self._token_ids(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._run(token_ids, texts, sampling_params, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of ``{"role", "content"}``) or to several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        token_ids = [tokenizer.apply_chat_template(list(c)) for c in conversations]
        return self._run(token_ids, [None] * len(token_ids), sampling_params, use_tqdm)

    def _run(self, token_ids, texts, sampling_params, use_tqdm) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(token_ids) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(token_ids):
            raise ValueError(f"{len(params)} sampling params for {len(token_ids)} prompts")
        ids = [f"offline-{next(self._ids)}" for _ in token_ids]
        for rid, prompt, p in zip(ids, token_ids, params):
            self.engine.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
                while len(final) < len(ids):
                    for out in self.engine.step():
                        if out.finished:
                            final[out.request_id] = out
                            bar.update(1)
        except BaseException:  # e.g. Ctrl-C in a notebook: leave the engine clean for the next call
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        results = [final[rid] for rid in ids]
        for out, text in zip(results, texts):
            out.prompt = text
        return results
