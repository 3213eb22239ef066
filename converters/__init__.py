"""Checkpoints in, jaxinfer params out: HF safetensors directories, GGUF files, converted dirs.

``converters.loader`` is the only place that looks at a path and decides what it holds.
"""
