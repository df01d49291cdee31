"""The general half of the demo's hybrid SFT mix: instruction data made offline from the documents the demo curated.

AgentTuning mixes agent trajectories with general chat so that the model keeps following ordinary instructions.
The demo ships no chat data and reads nothing outside its run directory (no network, no ../shared), so it builds
instruction / answer pairs from the documents its curation kept: the embedded corpus (installed packages'
descriptions and module docstrings), or your own text with --data. Two tasks per document, in the Alpaca format
(``instruction``, ``input``, ``output``) that `kiln data sft` reads:

- continue: "Continue this text." + the document's opening sentences -> the sentences that follow them;
- source:   "Which website is this text from?" + an excerpt -> the host of the document's URL (what MeCo
  conditions on; only for documents that have a URL).

Every answer is the document's own text or metadata, so nothing is invented; the order is the curated output's.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

from kiln.data_pipeline.metadata import url_host

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PROMPT_CHARS = 240  # opening text given in the "continue" prompt and the "source" excerpt
ANSWER_CHARS = 320  # the continuation asked for


def curated_documents(curated: Path):
    files = sorted(curated.glob("*.jsonl.gz")) + sorted(curated.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{curated}: no curated documents (*.jsonl.gz): run the curate stage first")
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at a sentence end when there is one, else at a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    ends = [m.start() for m in _SENTENCE_END.finditer(cut)]
    if ends and ends[-1] > limit // 3:
        return cut[: ends[-1]].rstrip()
    return cut.rsplit(" ", 1)[0].rstrip()


def continue_task(text: str) -> dict | None:
    """The opening sentences as the prompt, what follows as the answer; None for a document of one sentence."""
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    opening = ""
    for i, sentence in enumerate(sentences[:-1]):
        opening = f"{opening} {sentence}".strip()
        if len(opening) >= PROMPT_CHARS // 2:
            rest = " ".join(sentences[i + 1 :])
            if len(opening) > PROMPT_CHARS or len(rest) < 20:
                return None
            return {"instruction": "Continue this text.", "input": opening, "output": _clip(rest, ANSWER_CHARS)}
    return None


def source_task(text: str, url: str | None) -> dict | None:
    host = url_host(url) if url else None
    if not host:
        return None
    excerpt = _clip(" ".join(text.split()), PROMPT_CHARS)
    return {
        "instruction": "Which website is this text from? Answer with its host name.",
        "input": excerpt,
        "output": host,
    }


def build_general_data(curated: str | Path, out: str | Path) -> dict:
    """Write the instruction records of every curated document to ``out`` (JSONL); returns the counts by task."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in curated_documents(Path(curated)):
            counts["documents"] += 1
            text, meta = doc.get("text") or "", doc.get("metadata") or {}
            for task, record in (("continue", continue_task(text)), ("source", source_task(text, meta.get("url")))):
                if record is not None:
                    record["id"] = f"{task}/{doc.get('id', counts['documents'])}"
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    counts[task] += 1
    tmp.replace(out)
    return dict(counts)
