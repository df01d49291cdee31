"""`kiln data sft`: read -> check -> label -> fit the context -> hold out -> mix -> pack -> write -> report.

Output folder (``data.output_dir``)::

    train.bin/.idx, train_loss_mask.bin/.idx, train.sources.npy, train.meta.json    the training mix, packed
    heldout/<source>.*                                                             each source's held-out rows
    tokenizer/                     tokenizer.json + tokenizer_config.json/chat_template.jinja (the template used)
    report.json                    counts, shares, packing, drops by reason, a rendered sample
    dropped.jsonl                  every row set aside: source, file, record index, reason, detail
    sample.txt                     the first packed sequence, decoded, no-loss tokens in ⟦...⟧
    recipe.yaml                    the resolved data section

Every source is read and labelled in full before mixing, so a bad row anywhere is counted, never fatal; the
mix and the packing are deterministic functions of the kept rows and ``data.seed``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from kiln.config import to_dict
from kiln.data_pipeline.sft.config import SFTDataConfig, SFTDataRecipe, SourceConfig
from kiln.data_pipeline.sft.labels import Labelled, Labeller
from kiln.data_pipeline.sft.length import fit_to_context
from kiln.data_pipeline.sft.messages import BadRecord, Conversation, check_structure
from kiln.data_pipeline.sft.mixing import Pool, mix, name_key
from kiln.data_pipeline.sft.packing import best_fit_decreasing
from kiln.data_pipeline.sft.readers import expand_paths, normalise, read_file
from kiln.data_pipeline.sft.report import DropLog, Progress, render_masked, summary_lines
from kiln.data_pipeline.sft.templates import resolve_template
from kiln.data_pipeline.sft.tokenizer_files import ChatTokenizer, resolve_tokenizer_folder
from kiln.data_pipeline.sft.writer import write_packed


@dataclass
class SourceRows:
    """One source after reading and labelling."""

    config: SourceConfig
    examples: list[Labelled] = field(default_factory=list)
    where: list[tuple[str, int]] = field(default_factory=list)  # (file, record) of each example
    files: dict[str, str | None] = field(default_factory=dict)  # file -> format read
    input: int = 0
    truncated: int = 0
    trimmed: int = 0  # rows whose trailing non-assistant turns were dropped (drop_trailing_turns)
    train: list[int] = field(default_factory=list)
    heldout: list[int] = field(default_factory=list)


def _read_and_label(
    src: SourceConfig, cfg: SFTDataConfig, labeller: Labeller, drops: DropLog, progress: Progress
) -> SourceRows:
    rows = SourceRows(src)
    capacity = cfg.seq_length + 1
    pending: list[tuple[str, int, Conversation]] = []

    def flush() -> None:
        results = labeller.label_batch([c for _, _, c in pending])
        for (file, index, _), result in zip(pending, results):
            if not isinstance(result, BadRecord):
                try:
                    result, cut = fit_to_context(result, capacity, cfg.too_long)
                    rows.truncated += cut
                except BadRecord as e:
                    result = e
            if isinstance(result, BadRecord):
                drops.add(result.reason, src.name, file, index, result.detail)
                continue
            result.text = None  # the ids and mask are all that is kept
            rows.examples.append(result)
            rows.where.append((file, index))
        pending.clear()
        progress.update(f"source {src.name}: {rows.input} records, {len(rows.examples)} kept")

    for file in expand_paths(src.paths):
        if src.max_records is not None and rows.input >= src.max_records:
            break
        found: dict = {}
        for index, item in read_file(file, src.format, src.field, found):
            if src.max_records is not None and rows.input >= src.max_records:
                break
            rows.input += 1
            if isinstance(item, BadRecord):
                drops.add(item.reason, src.name, file, index, item.detail)
                continue
            try:
                conv, trimmed = normalise(item, cfg.strip_whitespace, src.drop_trailing_turns)
                check_structure(conv)
                rows.trimmed += trimmed > 0
            except BadRecord as e:
                drops.add(e.reason, src.name, file, index, e.detail)
                continue
            pending.append((file, index, conv))
            if len(pending) >= cfg.batch_size:
                flush()
        rows.files[file] = found.get("format")
    flush()
    dropped = rows.input - len(rows.examples)
    progress.done(f"source {src.name} ({src.role}): {rows.input} records, {len(rows.examples)} kept, {dropped} dropped")
    return rows


def _hold_out(rows: SourceRows, cfg: SFTDataConfig) -> None:
    """A seeded subset of the source's kept rows, drawn from (seed, the source's name): the same rows are held out
    whatever other sources a recipe has (hybrid / agent-only / general-only compare on the same held-out sets)."""
    n = len(rows.examples)
    frac = cfg.heldout_fraction if rows.config.heldout_fraction is None else rows.config.heldout_fraction
    n_held = min(cfg.heldout_max, math.ceil(frac * n), n - 1) if frac > 0 and n >= 2 else 0
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, name_key(rows.config.name), 7919])))
    order = rng.permutation(n)
    rows.heldout = sorted(order[:n_held].tolist())
    rows.train = sorted(order[n_held:].tolist())


def build_sft(recipe: SFTDataRecipe | SFTDataConfig, progress: bool = True, stream=None) -> dict:
    """Build the SFT data of a recipe (see the module docstring); returns report.json's content."""
    cfg = recipe.data if isinstance(recipe, SFTDataRecipe) else recipe
    name = recipe.name if isinstance(recipe, SFTDataRecipe) else Path(cfg.output_dir).name
    show = Progress(progress, stream)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = ChatTokenizer(resolve_tokenizer_folder(cfg.tokenizer))
    try:
        template = resolve_template(cfg.template, tok.chat_template)
    except ValueError as e:
        raise ValueError(f"data.template: {e}") from None
    if template.name == "llama2" and not {"bos_token", "eos_token"} <= set(tok.special_tokens):
        raise ValueError("data.template llama2 needs a tokenizer with bos_token and eos_token")
    tok_dir = tok.export(out / "tokenizer", template.source)
    from kiln.data_pipeline.tokenize.tokenizer import HFTokenizer

    tokenizer_meta = HFTokenizer(tok_dir / "tokenizer.json").describe()
    show.done(f"tokenizer {cfg.tokenizer} (vocab {tok.vocab_size}), template {template.name}")
    labeller = Labeller(tok, template, cfg.loss, cfg.tool_format)

    drops = DropLog()
    sources = [_read_and_label(s, cfg, labeller, drops, show) for s in cfg.sources]
    for rows in sources:
        _hold_out(rows, cfg)

    pools = [
        Pool(r.config.name, r.config.role, np.asarray([r.examples[i].ids.size for i in r.train], dtype=np.int64),
             r.config.weight)
        for r in sources
    ]  # fmt: skip
    try:
        mixed = mix(
            pools, cfg.mix.eta, cfg.mix.by, cfg.mix.total_examples, cfg.mix.total_tokens, cfg.mix.max_repeats, cfg.seed
        )
    except ValueError as e:
        raise ValueError(f"data.mix: {e}") from None
    examples = [sources[k].examples[sources[k].train[j]] for k, j in mixed.picks]
    source_of = np.asarray([k for k, _ in mixed.picks], dtype=np.int16)
    show.done(f"mix: {len(examples)} examples" + (f" (stopped early: {mixed.limited_by})" if mixed.limited_by else ""))

    capacity = cfg.seq_length + 1
    lengths = np.asarray([e.ids.size for e in examples], dtype=np.int64)
    bins = best_fit_decreasing(lengths, capacity)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, 104729])))
    bins = [bins[i] for i in rng.permutation(len(bins))]
    names = [s.name for s in cfg.sources]
    common = {
        "chat_template": {**template.describe(), "file": "tokenizer/chat_template.jinja"},
        "loss_policy": cfg.loss,
        "recipe": name,
    }
    mix_meta = {"eta": cfg.mix.eta, "by": cfg.mix.by, "seed": cfg.seed, "targets": dict(zip(names, mixed.targets))}
    train_meta = write_packed(
        out / "train", examples, bins, source_of, names, tokenizer=tokenizer_meta, seq_length=cfg.seq_length,
        pad_id=tok.pad_id, split="train", extra={**common, "mix": mix_meta},
    )  # fmt: skip
    heldout_meta = {}
    shutil.rmtree(out / "heldout", ignore_errors=True)  # no stale split of an earlier build in the same folder
    for k, rows in enumerate(sources):
        if not rows.heldout:
            continue
        held = [rows.examples[i] for i in rows.heldout]
        held_bins = best_fit_decreasing([e.ids.size for e in held], capacity)
        heldout_meta[rows.config.name] = write_packed(
            out / "heldout" / rows.config.name, held, held_bins, np.full(len(held), k, dtype=np.int16), names,
            tokenizer=tokenizer_meta, seq_length=cfg.seq_length, pad_id=tok.pad_id, split="heldout", extra=common,
        )  # fmt: skip
    show.done(f"packed: {len(bins)} sequences, efficiency {train_meta['packing_efficiency']:.4f}")

    report = _report(name, cfg, sources, drops, mixed, examples, source_of, train_meta, heldout_meta, template,
                     tokenizer_meta, out, tok, bins)  # fmt: skip
    drops.write(out / "dropped.jsonl")
    (out / "sample.txt").write_text(report["sample"]["text"] + "\n", encoding="utf-8")
    (out / "recipe.yaml").write_text(yaml.safe_dump({"name": name, "data": to_dict(cfg)}, sort_keys=False))
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _report(name, cfg, sources, drops, mixed, examples, source_of, train_meta, heldout_meta, template, tok_meta, out,
            tok, bins) -> dict:  # fmt: skip
    n_pools = len(sources)
    counts = mixed.counts(n_pools)
    by_tokens = np.zeros(n_pools, dtype=np.int64)
    trainable = np.zeros(n_pools, dtype=np.int64)
    for k, e in zip(source_of.tolist(), examples):
        by_tokens[k] += e.ids.size
        trainable[k] += int(e.mask.sum())
    total_examples, total_tokens = int(counts.sum()), int(by_tokens.sum())
    units = counts if cfg.mix.by == "examples" else by_tokens
    total_units = max(int(units.sum()), 1)
    per_source = {}
    for k, rows in enumerate(sources):
        pool = [rows.examples[i] for i in rows.train]
        picked = [j for p, j in mixed.picks if p == k]
        per_source[rows.config.name] = {
            "role": rows.config.role,
            "format": rows.config.format,
            "files": rows.files,
            "input": rows.input,
            "kept": len(rows.examples),
            "dropped": rows.input - len(rows.examples),
            "dropped_by_reason": drops.by_source(rows.config.name),
            "truncated": rows.truncated,
            "trimmed": rows.trimmed,
            "heldout": len(rows.heldout),
            "pool_examples": len(pool),
            "pool_tokens": int(sum(e.ids.size for e in pool)),
            "examples": int(counts[k]),
            "unique_examples": len(set(picked)),
            "max_repeats_of_one_example": int(np.bincount(picked).max()) if picked else 0,
            "tokens": int(by_tokens[k]),
            "trainable_tokens": int(trainable[k]),
            "target_share": mixed.targets[k],
            "realised_share": float(units[k] / total_units),
            "example_share": float(counts[k] / max(total_examples, 1)),
            "token_share": float(by_tokens[k] / max(total_tokens, 1)),
            "epochs": float(counts[k] / len(pool)) if pool else 0.0,
            "passes": mixed.passes[k],
        }
    agent = [k for k, r in enumerate(sources) if r.config.role == "agent"]
    agent_examples = float(counts[agent].sum() / max(total_examples, 1))
    agent_tokens = float(by_tokens[agent].sum() / max(total_tokens, 1))
    input_total = sum(r.input for r in sources)
    kept_total = sum(len(r.examples) for r in sources)
    sample = _sample(out, tok, bins, examples, source_of, [r.config.name for r in sources])
    return {
        "recipe": name,
        "format": train_meta["format"],
        "output_dir": str(out),
        "tokenizer": tok_meta,
        "template": {**template.describe(), "file": "tokenizer/chat_template.jinja"},
        "loss_policy": cfg.loss,
        "too_long": cfg.too_long,
        "seq_length": cfg.seq_length,
        "input": input_total,
        "kept": kept_total,
        "dropped": drops.summary(),
        "truncated": sum(r.truncated for r in sources),
        "agent_share": agent_examples if cfg.mix.by == "examples" else agent_tokens,
        "agent_example_share": agent_examples,
        "agent_token_share": agent_tokens,
        "packing_efficiency": train_meta["packing_efficiency"],
        "mix": {
            "eta": cfg.mix.eta,
            "by": cfg.mix.by,
            "seed": cfg.seed,
            "budget": mixed.budget,
            "budget_unit": mixed.unit,
            "max_repeats": cfg.mix.max_repeats,
            "limited_by": mixed.limited_by,
            "examples": total_examples,
            "tokens": total_tokens,
            "trainable_tokens": int(trainable.sum()),
        },
        "packing": {
            "packs": train_meta["packs"],
            "pack_tokens": train_meta["pack_tokens"],
            "conversations": train_meta["documents"],
            "tokens": train_meta["tokens"],
            "pad_tokens": train_meta["pad_tokens"],
            "efficiency": train_meta["packing_efficiency"],
        },
        "sources": per_source,
        "heldout": {
            k: {key: m[key] for key in ("documents", "tokens", "loss_tokens", "packs")} | {"prefix": f"heldout/{k}"}
            for k, m in heldout_meta.items()
        },
        "outputs": {"train": str(out / "train"), "heldout": {k: str(out / "heldout" / k) for k in heldout_meta}},
        "sample": sample,
    }


def _sample(out, tok, bins, examples, source_of, names) -> dict:
    """The first packed sequence, each conversation decoded with its no-loss tokens in ⟦...⟧."""
    if not bins:
        return {"text": "(no packed sequences)", "pack": None}
    parts = []
    for j, i in enumerate(bins[0]):
        e = examples[i]
        parts.append(
            f"--- conversation {j} ({names[int(source_of[i])]}): {e.ids.size} tokens, {int(e.mask.sum())} with loss\n"
            + render_masked(e.ids, e.mask, tok)
        )
    return {"pack": 0, "legend": "no loss: ⟦...⟧; special tokens shown by name", "text": "\n".join(parts)}


__all__ = ["build_sft", "summary_lines"]
