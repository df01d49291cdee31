"""Model configuration: a typed dataclass whose architecture fields map one-to-one onto Hugging Face
``LlamaConfig``, plus the few knobs that are ours (kernels, document masking, sequence parallelism). Also the
recipe's ``data`` section (``DataConfig``), whose readers live in ``kiln.pretrain.data``.

Kept free of torch imports so the CLI and recipe validation stay fast (``kiln.pretrain.data`` imports torch, so
its config classes live here); ``from_hf_config`` / ``to_hf_config`` import ``transformers`` only when called.

RoPE variants: ``rope_scaling`` holds the Hugging Face rope parameters other than ``rope_theta`` (which has its
own field), e.g. ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
"original_max_position_embeddings": 8192}``. Supported types are the ones HF Llama implements for this
architecture: default (``None``), ``linear``, ``dynamic``, ``yarn`` and ``llama3``. ``longrope`` and
``proportional`` (and partial rotary factors) are refused by ``validate()`` with a message naming them.

``validate()`` methods raise ``ValueError`` about their own fields; the recipe loader (``kiln.config``) adds the
file and key path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.config import ConfigError

# rope_type -> (required keys, optional keys) of the rope_scaling dict, as HF validates them.
ROPE_TYPES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (
        frozenset({"factor"}),
        frozenset(
            {
                "original_max_position_embeddings",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            }
        ),
    ),
    "llama3": (
        frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
        frozenset(),
    ),
}
UNSUPPORTED_ROPE_TYPES = ("longrope", "proportional", "axial")

AttentionBackend = Literal["auto", "flash", "triton", "sdpa"]


@dataclass
class ModelConfig:
    """A Llama-architecture decoder. Defaults are SmolLM2-135M's shape."""

    # --- Hugging Face LlamaConfig fields (same names, same meaning) ---
    vocab_size: int = 49152  # rows of the embedding and of the output head
    hidden_size: int = 576  # width of the residual stream
    intermediate_size: int = 1536  # width of the SwiGLU MLP (each of gate, up)
    num_hidden_layers: int = 30  # decoder layers
    num_attention_heads: int = 9  # query heads
    num_key_value_heads: int | None = 3  # None -> num_attention_heads (multi-head attention)
    head_dim: int | None = 64  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 8192  # longest sequence the RoPE variant is set up for (HF's field)
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    rope_theta: float = 100000.0  # RoPE base frequency
    # HF rope parameters other than theta (linear, dynamic, yarn, llama3); see the module docstring
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True  # the output head reuses the input embedding matrix
    attention_bias: bool = False  # biases on the q, k, v and o projections
    mlp_bias: bool = False  # biases on the MLP projections
    bos_token_id: int | None = 1  # beginning-of-sequence token id, written to the exported HF config
    eos_token_id: int | list[int] | None = 2  # end-of-sequence token id(s): generation stops there
    pad_token_id: int | None = None  # padding token id of the exported HF config (training packs, it never pads)

    # --- ours ---
    # Attention path in kernels.attention: auto = flash-attn (GPU) -> Triton (GPU) -> SDPA.
    attention_backend: AttentionBackend = "auto"
    # Triton RMSNorm / RoPE / SwiGLU / cross-entropy when available; False forces the plain PyTorch paths.
    fused_kernels: bool = True
    # Packed documents: when the caller passes segment_ids, position ids restart at each document and attention
    # never crosses a document boundary. When False, segment_ids are ignored (one long causal sequence).
    document_masking: bool = True
    # Megatron sequence parallelism inside the TP group (activations outside attention/MLP sharded along the
    # sequence). megatron-core's SP collectives allocate on CUDA, so this needs GPUs and TP > 1.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        # Resolve the HF "None means derived" fields once, so every consumer sees concrete numbers.
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def kernel_backend(self) -> str:
        """The ``backend=`` of every fused-kernel call (RMSNorm, RoPE, SwiGLU, cross-entropy): "auto" picks the
        Triton kernel where it runs, "torch" forces the plain PyTorch path. Decided here once so that no layer
        re-derives it from ``fused_kernels``."""
        return "auto" if self.fused_kernels else "torch"

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.attention_backend not in ("auto", "flash", "triton", "sdpa"):
            raise ValueError(
                f"attention_backend must be one of auto, flash, triton, sdpa; got {self.attention_backend!r}"
            )
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        if not self.rope_scaling:
            return
        rope_type = self.rope_type
        if rope_type == "default":
            extra = set(self.rope_scaling) - {"rope_type", "type"}
            if extra:
                raise ValueError(f"rope_scaling: rope_type 'default' takes no parameters, got {sorted(extra)}")
            return
        if rope_type in UNSUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling: rope_type {rope_type!r} is not supported for the Llama architecture here "
                f"(supported: default, {', '.join(sorted(ROPE_TYPES))})"
            )
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling: unknown rope_type {rope_type!r} (supported: default, {', '.join(sorted(ROPE_TYPES))})"
            )
        required, optional = ROPE_TYPES[rope_type]
        given = set(self.rope_scaling) - {"rope_type", "type"}
        if "partial_rotary_factor" in given and float(self.rope_scaling["partial_rotary_factor"]) != 1.0:
            raise ValueError("rope_scaling: partial_rotary_factor != 1 is not supported (Llama rotates all dims)")
        given.discard("partial_rotary_factor")
        missing = required - given
        if missing:
            raise ValueError(f"rope_scaling: rope_type {rope_type!r} needs {sorted(missing)}")
        unknown = given - required - optional
        if unknown:
            raise ValueError(f"rope_scaling: unknown key(s) {sorted(unknown)} for rope_type {rope_type!r}")
        factor = self.rope_scaling["factor"]
        if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
            raise ValueError(f"rope_scaling.factor must be a positive number, got {factor!r}")
        if rope_type == "llama3" and self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
            raise ValueError("rope_scaling: llama3 needs high_freq_factor > low_freq_factor")

    def validate_tp(self, tp_size: int) -> None:
        """Check that tensor parallelism over ``tp_size`` ranks can split this model (whole heads per rank).

        Not a loader hook (it needs the TP size, known only at launch), so it raises ``ConfigError`` itself."""
        if tp_size < 1:
            raise ConfigError(f"tensor parallel size must be >= 1, got {tp_size}")
        splits = (
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
        )
        bad = [f"{name}={value}" for name, value in splits if value % tp_size]
        if bad:
            ok = [t for t in range(1, 9) if all(v % t == 0 for _, v in splits)]
            raise ConfigError(
                f"tensor parallel size {tp_size} does not divide {', '.join(bad)}; every rank must hold whole "
                f"attention heads, KV heads and equal vocab/MLP slices (sizes that work for this model: {ok})"
            )
        if self.sequence_parallel and tp_size == 1:
            raise ConfigError("model.sequence_parallel needs tensor parallel size > 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# The recipe's ``data`` section (read by kiln.pretrain.data)


@dataclass
class DatasetSpec:
    """One dataset of the blend: a prefix written by `kiln data tokenize` and its relative weight."""

    prefix: str  # path prefix of <prefix>.bin / .idx / .meta.json (with MeCo: of the _meco and _plain twins)
    weight: float = 1.0  # relative share of the blend's samples

    def validate(self) -> None:
        if not self.prefix:
            raise ValueError("prefix is empty")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight must be a positive number, got {self.weight}")


@dataclass
class MecoConfig:
    """MeCo: train on the metadata-conditioned twins, then cool down on the plain ones (``kiln.pretrain.data``)."""

    enabled: bool = False  # read each dataset's _meco twin first, then its _plain twin for the cooldown
    # the last fraction of training steps uses the plain twins (MeCo: 10%)
    cooldown_fraction: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ValueError(f"cooldown_fraction must be in [0, 1], got {self.cooldown_fraction}")


@dataclass
class DataConfig:
    """The pretraining data: a weighted blend of `kiln data tokenize` datasets, read by ``kiln.pretrain.data``."""

    datasets: list[DatasetSpec] = field(default_factory=list)  # the weighted blend
    seq_length: int = 2048  # tokens per training sample
    seed: int = 1234  # seed of the blend and the document shuffles: sample i depends only on it and i
    meco: MecoConfig = field(default_factory=MecoConfig)
    # held-out documents of each training dataset (ignored when `validation` lists datasets)
    validation_fraction: float = 0.0
    validation: list[DatasetSpec] = field(default_factory=list)
    # the tokenizer the model is trained with; when set, every dataset's tokenizer fingerprint is checked
    tokenizer: str | None = None

    def validate(self) -> None:
        # Each DatasetSpec and meco check themselves (kiln.config.validate_tree runs every validate once).
        if not self.datasets:
            raise ValueError("datasets is empty: list at least one {prefix, weight}")
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face LlamaConfig <-> ModelConfig

_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _hf_get(hf: Any, key: str, default: Any = None) -> Any:
    return hf.get(key, default) if isinstance(hf, dict) else getattr(hf, key, default)


def from_hf_config(hf: Any, **ours: Any) -> ModelConfig:
    """``transformers.LlamaConfig`` (or its config.json as a dict) -> validated ModelConfig.

    ``ours`` sets our own fields (attention_backend, fused_kernels, ...). Raises ConfigError naming the feature
    when the checkpoint uses something this model does not implement.
    """
    model_type = _hf_get(hf, "model_type")
    if model_type != "llama":
        raise ConfigError(f"HF config: model_type {model_type!r} is not supported (only 'llama')")
    act = _hf_get(hf, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"HF config: hidden_act {act!r} is not supported (Llama SwiGLU uses 'silu')")
    dropout = _hf_get(hf, "attention_dropout", 0.0) or 0.0
    if float(dropout) != 0.0:
        raise ConfigError(f"HF config: attention_dropout={dropout} is not supported (no attention dropout here)")
    quant = _hf_get(hf, "quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        # transformers dequantizes GGUF tensors on load; every other quantization keeps quantized weights.
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
        if str(method).lower() != "gguf":
            raise ConfigError(f"HF config: quantized checkpoints (quant_method={method!r}) are not supported")
    if _hf_get(hf, "partial_rotary_factor") not in (None, 1, 1.0):
        raise ConfigError("HF config: partial_rotary_factor != 1 is not supported (Llama rotates all dims)")

    kwargs = {name: _hf_get(hf, name) for name in _HF_FIELDS}
    if kwargs["head_dim"] is None:
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if kwargs["num_key_value_heads"] is None:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs["tie_word_embeddings"] = bool(kwargs["tie_word_embeddings"])
    kwargs["attention_bias"] = bool(kwargs["attention_bias"])
    kwargs["mlp_bias"] = bool(kwargs["mlp_bias"])

    # transformers 5 keeps rope_theta inside rope_parameters; config.json files from older versions keep
    # rope_theta at top level and the variant in rope_scaling. Accept both.
    rope = dict(_hf_get(hf, "rope_parameters") or {})
    legacy = _hf_get(hf, "rope_scaling")
    if legacy and not rope.get("rope_type") and not rope.get("type"):
        rope.update(dict(legacy))
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = _hf_get(hf, "rope_theta", 10000.0)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    if rope.get("partial_rotary_factor", 1.0) in (1, 1.0):
        rope.pop("partial_rotary_factor", None)
    if rope.get("rope_type", "default") == "default":
        extra = set(rope) - {"rope_type"}
        if extra:
            raise ConfigError(f"HF config: default RoPE with unexpected parameters {sorted(extra)}")
        rope_scaling = None
    else:
        rope_scaling = rope
    cfg = ModelConfig(rope_theta=float(theta), rope_scaling=rope_scaling, **kwargs, **ours)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"HF config: {e}") from None
    return cfg


def hf_rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers-5 ``rope_parameters`` dict for ``cfg``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        extra = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        extra["rope_type"] = cfg.rope_type
        params.update(extra)
    return params


def to_hf_config(cfg: ModelConfig):
    """ModelConfig -> ``transformers.LlamaConfig`` (loads with ``AutoModelForCausalLM``)."""
    from transformers import LlamaConfig

    try:
        cfg.validate()
    except ValueError as e:  # same error type as a bad recipe key; ``model`` is the recipe key it lives under
        raise ConfigError(f"model: {e}") from None
    fields = {name: getattr(cfg, name) for name in _HF_FIELDS}
    return LlamaConfig(
        **fields,
        hidden_act="silu",
        rope_parameters=hf_rope_parameters(cfg),
        attention_dropout=0.0,
        architectures=["LlamaForCausalLM"],
    )


__all__ = [
    "DataConfig",
    "DatasetSpec",
    "MecoConfig",
    "ModelConfig",
    "from_hf_config",
    "to_hf_config",
    "hf_rope_parameters",
    "ROPE_TYPES",
]
