"""Look inside tokenized data: decode documents back to text and show which tokens carry loss.

datatrove's ``.ds`` output is hard to inspect (a known complaint); this is the answer for ours::

    kiln data inspect out/web_meco --tokenizer tok/ -n 2

prints, per document, its index, token and loss-token counts, and the decoded text with every span of
no-loss tokens wrapped in ``⟦...⟧`` (or dimmed with ``color=True``); special tokens (BOS/EOS) are shown by
name, e.g. ``⟦<s>URL: en.wikipedia.org\\n\\n⟧The text...</s>``.
"""

from __future__ import annotations

import os

from kiln.data_pipeline.tokenize.indexed import check_tokenizer_matches, open_tokenized, read_meta
from kiln.data_pipeline.tokenize.tokenizer import TokenizeError, Tokenizer, load_tokenizer

NO_LOSS_OPEN, NO_LOSS_CLOSE = "⟦", "⟧"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def render_document(tokens, mask, tokenizer: Tokenizer, color: bool = False) -> str:
    """Decoded text of one document, no-loss spans marked. Runs of tokens with the same mask are decoded
    together (so multi-byte characters split over byte tokens come out whole); specials are shown by name."""
    open_, close = (DIM, RESET) if color else (NO_LOSS_OPEN, NO_LOSS_CLOSE)
    out: list[str] = []
    run: list[int] = []
    run_loss = None

    def flush():
        if run:
            out.append(tokenizer.decode(run))
            run.clear()

    for i, token in enumerate(tokens):
        loss = 1 if mask is None else int(mask[i])
        if loss != run_loss:
            flush()
            if run_loss == 0:
                out.append(close)
            if loss == 0:
                out.append(open_)
            run_loss = loss
        if tokenizer.is_special(int(token)):
            flush()
            out.append(tokenizer.id_to_piece(int(token)))
        else:
            run.append(int(token))
    flush()
    if run_loss == 0:
        out.append(close)
    return "".join(out)


def inspect_tokenized(
    prefix: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    n: int = 3,
    start: int = 0,
    color: bool = False,
) -> str:
    """A readable report of documents ``start .. start+n-1`` of the dataset at ``prefix``.

    ``tokenizer`` defaults to the one recorded in the dataset's ``.meta.json``; it is checked against the
    dataset first (`check_tokenizer_matches`)."""
    meta = read_meta(prefix)
    tok = load_tokenizer(tokenizer if tokenizer is not None else meta["tokenizer"]["path"])
    check_tokenizer_matches(prefix, tok)
    tokens_ds, mask_ds = open_tokenized(prefix)
    total = len(tokens_ds)
    if not 0 <= start < total:
        raise TokenizeError(f"{prefix}: document {start} out of range (the dataset has {total} documents)")
    if n < 1:
        raise TokenizeError(f"n must be >= 1, got {n}")
    legend = "no loss: dimmed" if color else f"no loss: {NO_LOSS_OPEN}...{NO_LOSS_CLOSE}"
    lines = [
        f"{prefix}: {meta['documents']} documents, {meta['tokens']} tokens, {meta['loss_tokens']} with loss "
        f"({meta['variant']}; tokenizer {meta['tokenizer']['path']}, vocab {meta['tokenizer']['vocab_size']})",
        f"legend: {legend}; special tokens shown by name"
        + ("" if mask_ds is not None else "; no loss mask stored: every token has loss"),
    ]
    for i in range(start, min(total, start + n)):
        tokens = tokens_ds[i]
        mask = mask_ds[i] if mask_ds is not None else None
        loss = int(mask.sum()) if mask is not None else len(tokens)
        lines.append(f"--- document {i}: {len(tokens)} tokens, {loss} with loss")
        lines.append(render_document(tokens, mask, tok, color=color))
    return "\n".join(lines) + "\n"
