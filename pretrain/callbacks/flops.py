"""Model FLOPs per token and per-device peak FLOP/s, for TFLOP/s and MFU.

``flops_per_token`` counts *model* FLOPs of one training token (forward + backward = 3x forward, no
activation-recomputation FLOPs: that is what MFU means, PaLM appendix B / Megatron-LM):

* every matmul with a weight: 2 FLOPs per multiply-add forward, so ``6 * N_matmul`` for training, where
  ``N_matmul`` = per layer ``h*q + 2*h*kv + q*h`` (attention projections, GQA aware) + ``3*h*ffn`` (SwiGLU),
  times layers, plus the LM head ``h*V`` (counted also when tied to the embedding: the matmul still runs; the
  embedding lookup itself is free);
* attention scores and weighted values: ``2 * 2 * s * q`` forward per token per layer, so ``12 * L * q * s``
  for training (PaLM's ``12 * L * H * Q * T``). Like PaLM and Megatron we count the full ``s x s`` matrix, not
  the causal half; ``causal=True`` halves it (what FlashAttention actually computes).

Peak FLOP/s: dense (no sparsity) tensor-core numbers from the vendors' datasheets, per device. On CPU there
is no datasheet number: `measure_cpu_peak_flops` times a large matmul, or pass the number yourself.
"""

from __future__ import annotations

import time

# (device family, dtype) -> dense peak FLOP/s per device
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("h100", "bfloat16"): 989e12,
    ("h100", "float16"): 989e12,
    ("h100", "float32"): 494e12,  # TF32 tensor cores
    ("h200", "bfloat16"): 989e12,
    ("h200", "float16"): 989e12,
    ("h200", "float32"): 494e12,
    ("a100", "bfloat16"): 312e12,
    ("a100", "float16"): 312e12,
    ("a100", "float32"): 156e12,  # TF32
    ("l40s", "bfloat16"): 362e12,
    ("a10", "bfloat16"): 125e12,
}


def flops_per_token(cfg, seq_length: int, causal: bool = False) -> float:
    """Training FLOPs per token of a Llama-architecture model (``kiln.pretrain.config.ModelConfig``)."""
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = cfg.head_dim or h // cfg.num_attention_heads
    q = cfg.num_attention_heads * head_dim
    kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
    n_matmul = layers * per_layer + h * vocab
    attention = 12 * layers * q * seq_length * (0.5 if causal else 1.0)
    return 6.0 * n_matmul + attention


def device_family(name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    low = name.lower()
    for family in sorted({f for f, _ in PEAK_FLOPS}, key=len, reverse=True):
        if family in low:
            return family
    return None


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` fp32 ``n x n`` matmuls on this CPU (an achievable peak)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops_per_device(dtype: str = "bfloat16", device_name: str | None = None, override: float | None = None):
    """Peak FLOP/s of one device: ``override`` if given; else the table entry for the CUDA device (or
    ``device_name``); else, on CPU, a measured matmul rate. None when a GPU is not in the table."""
    if override is not None:
        return float(override)
    if device_name is None:
        import torch

        if torch.cuda.is_available():
            device_name = torch.cuda.get_device_name()
        else:
            return measure_cpu_peak_flops()
    family = device_family(device_name)
    if family is None:
        return None
    return PEAK_FLOPS.get((family, dtype))
