"""Kiln: raw web text to agent-ready language models. Cross-cutting pieces live here (CLI entry, config
layer, the embedded demo); each stage lives in its own top-level package (data_pipeline, pretrain, parallel,
kernels)."""

__version__ = "0.1.0"
