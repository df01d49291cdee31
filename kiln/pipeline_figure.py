"""docs/pipeline.png: the stages from raw text to an agent-ready checkpoint, drawn with matplotlib by `kiln docs`.

The lists inside the boxes are read from the code (the input kinds, the filter kinds of the tagged union a recipe's
``filters:`` holds, the dedup kinds, the metadata kinds), so a new filter shows up in the picture when it is
regenerated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args, get_type_hints

# one colour per group of boxes: curation, tokenized data, training, release
COLOURS = {"curate": "#dbe9f6", "data": "#fde9c9", "train": "#dcefd8", "release": "#ece1f3"}
EDGE = "#4a4a4a"


def _kinds(annotation) -> list[str]:
    """The ``kind`` tags of a union of config classes, or the values of a Literal."""
    members = get_args(annotation)
    if members and all(dataclasses.is_dataclass(m) for m in members):
        return [get_args(get_type_hints(m)["kind"])[0] for m in members]
    return [str(v) for v in members]


def _wrap(items: list[str], chars: int = 24) -> list[str]:
    """Comma-separated lines of at most ``chars`` characters (an item longer than that gets a line of its own)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= chars:
            lines[-1] += f", {item}"
        else:
            lines.append(item)
    return lines


def stage_boxes() -> tuple[list[tuple[str, list[str], str]], list[tuple[str, list[str], str]]]:
    """(title, lines, colour group) of the curation row and of the training row."""
    from kiln.data_pipeline.dedup.config import DedupConfig
    from kiln.data_pipeline.filters.config import FilterConfig
    from kiln.data_pipeline.metadata import MetadataConfig
    from kiln.data_pipeline.readers.config import InputKind

    dedup = [f.name for f in dataclasses.fields(DedupConfig) if f.name in ("exact", "url", "minhash")]
    curation = [
        ("raw text", _wrap(_kinds(InputKind)), "data"),
        ("read", ["malformed records", "-> rejects/, by reason"], "curate"),
        ("filter", _wrap(_kinds(FilterConfig)), "curate"),
        ("dedup", [*_wrap(dedup), "(MinHash-LSH)"], "curate"),
        ("metadata (MeCo)", [*_wrap(_kinds(get_type_hints(MetadataConfig)["kind"])), "URL: <host>"], "curate"),
        ("refine (TinyHelen)", ["LLM rewrite into", "the commonest words"], "curate"),
        ("tokenize", [".bin/.idx + loss mask", "_meco / _plain twins"], "data"),
    ]
    training = [
        ("pretrain", ["TP x PP x DP (ZeRO)", "MeCo, then the", "plain cooldown"], "train"),
        ("agent trajectories", ["kiln agent gen:", "TextWorld games,", "expert ReAct"], "data"),
        ("SFT data", ["kiln data sft:", "agent (eta) + general", "chat, packed"], "data"),
        ("SFT", ["kiln train", "recipes/sft/*.yaml", "global-token loss"], "train"),
        ("export", ["kiln export-hf", "-> transformers"], "release"),
        ("agent eval", ["kiln agent eval", "on unseen games"], "release"),
    ]
    return curation, training


def draw_pipeline(path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    curation, training = stage_boxes()
    width, height, gap = 2.45, 1.9, 0.5
    step = width + gap
    top, bottom = 3.55, 0.3
    fig, ax = plt.subplots(figsize=(20, 7.4))
    ax.set_xlim(-0.3, len(curation) * step)
    ax.set_ylim(-0.9, top + height + 0.8)
    ax.axis("off")

    def box(x: float, y: float, title: str, lines: list[str], group: str) -> None:
        ax.add_patch(
            FancyBboxPatch(
                (x, y), width, height, boxstyle="round,pad=0.04,rounding_size=0.12", fc=COLOURS[group], ec=EDGE, lw=1.2
            )
        )
        ax.text(x + width / 2, y + height - 0.28, title, ha="center", va="center", fontsize=12.5, weight="bold")
        for i, line in enumerate(lines):
            ax.text(x + width / 2, y + height - 0.66 - 0.27 * i, line, ha="center", va="center", fontsize=9.5)

    def path_arrow(points: list[tuple[float, float]]) -> None:
        """A polyline ending in an arrowhead (elbows keep arrows off the boxes and the labels)."""
        xs, ys = zip(*points)
        ax.plot(xs[:-1] + (xs[-1],), ys[:-1] + (ys[-1],), color=EDGE, lw=1.3, solid_joinstyle="miter")
        ax.annotate("", xy=points[-1], xytext=points[-2], arrowprops=dict(arrowstyle="-|>", color=EDGE, lw=1.3))

    ax.text(-0.2, top + height + 0.35, "curation: kiln data run recipes/data/*.yaml  (datatrove: local, Slurm, Ray)",
            fontsize=13, weight="bold", color="#1f4e79")  # fmt: skip
    for i, (title, lines, group) in enumerate(curation):
        box(i * step, top, title, lines, group)
        if i:
            path_arrow([(i * step - gap, top + height / 2), (i * step, top + height / 2)])
    x_of = {title: i * step for i, (title, _, _) in enumerate(training)}
    for title, lines, group in training:
        box(x_of[title], bottom, title, lines, group)
    ax.text(-0.2, bottom - 0.6, "training: kiln train  (torchrun; Megatron TP layers inside a DeepSpeed pipeline, ZeRO DP)",
            fontsize=13, weight="bold", color="#2e6b2e")  # fmt: skip

    mid = (top + bottom + height) / 2  # between the rows
    tokenize_x = (len(curation) - 1) * step + width / 2
    pretrain_x = x_of["pretrain"] + width / 2
    path_arrow([(tokenize_x, top), (tokenize_x, mid), (pretrain_x, mid), (pretrain_x, bottom + height)])
    ax.text(tokenize_x - 0.1, mid + 0.12, "tokens", ha="right", fontsize=10, style="italic")
    # the pretrained weights reach SFT over the data boxes
    over = mid - 0.35
    sft_x = x_of["SFT"] + width / 2
    path_arrow([(pretrain_x + 0.5, bottom + height), (pretrain_x + 0.5, over), (sft_x, over), (sft_x, bottom + height)])
    ax.text((pretrain_x + sft_x) / 2, over + 0.1, "pretrained weights (init_from)", ha="center", fontsize=10,
            style="italic")  # fmt: skip
    order = [t for t, _, _ in training]
    for a, b in zip(order[1:], order[2:]):
        path_arrow([(x_of[a] + width, bottom + height / 2), (x_of[b], bottom + height / 2)])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out


__all__ = ["draw_pipeline", "stage_boxes"]
