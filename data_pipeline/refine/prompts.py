"""Genre-specific rewriting prompts, after TinyHelen: rewrite with only the ~K most common English words,
remove noise and toxic content, normalise entities, and answer with the rewritten text only."""

from __future__ import annotations

from .config import GENRES

_COMMON = (
    "You rewrite {what} into simple English for a small language model to learn from. "
    "Use only the {k} most common English words wherever you can; explain a rare word with common words "
    "instead of using it. Use short sentences. Keep the meaning and the important facts; do not add new facts. "
    "Remove noise: ads, menus, links, e-mail addresses, markup, broken characters and repeated text. "
    "Remove toxic, hateful, violent or sexual content. "
    "Normalise entities: replace rare names of people, places, products and organisations with common names "
    "or a short plain description (for example 'a big city' or 'a company'), and write numbers and dates simply. "
    "{genre_rules} "
    "Answer with the rewritten text only: no title, no notes, no explanation."
)

GENRE_RULES: dict[str, tuple[str, str]] = {
    "web": (
        "a text from a web page",
        "Keep only the main content of the page; leave out navigation, cookie notices, share buttons and comments.",
    ),
    "book": (
        "a passage from a book",
        "Keep it a story: keep the events, the order they happen in, and the dialogue, in simple words.",
    ),
    "wiki": (
        "a passage from an encyclopedia",
        "Keep the facts and explain them plainly, the way a teacher explains them to a child.",
    ),
    "textbook": (
        "a passage from a textbook",
        "Keep every idea and every step of the explanation, in order, and keep examples simple.",
    ),
    "conversation": (
        "a conversation",
        "Keep it a conversation: keep who speaks each turn (one turn per line, 'Name: text') and the turn order.",
    ),
    "code": (
        "a piece of code with its comments",
        "Keep the code working and unchanged; rewrite only comments, docstrings and text in simple words.",
    ),
    "instruction": (
        "an instruction and its answer",
        "Keep the task and the answer correct and complete; keep the instruction first and the answer after it.",
    ),
}
assert set(GENRE_RULES) == set(GENRES)


def system_prompt(genre: str, vocab_size_k: int = 2000) -> str:
    what, rules = GENRE_RULES[genre]
    return _COMMON.format(what=what, k=f"{vocab_size_k:,}", genre_rules=rules)


def build_messages(genre: str, text: str, vocab_size_k: int = 2000) -> list[dict[str, str]]:
    """Chat messages for one chunk: the genre's system prompt, then the text as the user turn."""
    return [{"role": "system", "content": system_prompt(genre, vocab_size_k)}, {"role": "user", "content": text}]
