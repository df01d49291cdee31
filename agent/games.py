"""TextWorld games by seed and kind, generated offline with textworld's Python API into a cache folder.

A kind fixes the world size (rooms), the number of objects, the quest length and how the goal is worded:
``detailed`` spells out every step of the walkthrough, ``brief`` states only the last one (textworld's
``only_last_action`` grammar setting). The same (kind, seed) always gives the same game; a cached game is reused
once its files check out. Each game is ``<cache>/<kind>-<params>/s<seed>.z8`` plus textworld's ``.json``
(the game's structure, which the gym wrapper reads for the walkthrough and the admissible commands).

`check_game_file` validates a game before textworld opens it: the z-machine interpreter behind textworld exits
the whole process on a truncated story file ("Fatal error: Story file read error"), so a corrupt file must be
caught here, with its path and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

GOALS = ("detailed", "brief")


class GameFileError(ValueError):
    """A game file that does not exist, is not a TextWorld game, or is corrupt."""


@dataclass(frozen=True)
class GameKind:
    name: str
    rooms: int
    objects: int
    quest_length: int
    goal: str = "detailed"

    def __post_init__(self):
        if self.goal not in GOALS:
            raise ValueError(f"game kind {self.name!r}: goal must be one of {list(GOALS)}, got {self.goal!r}")
        if self.rooms < 1 or self.objects < 0 or self.quest_length < 1:
            raise ValueError(f"game kind {self.name!r}: rooms >= 1, objects >= 0 and quest_length >= 1 required")

    @property
    def key(self) -> str:
        """The cache folder name: the parameters themselves, so a changed kind never reuses stale games."""
        return f"{self.name}-r{self.rooms}-o{self.objects}-q{self.quest_length}-{self.goal}"

    def to_dict(self) -> dict:
        return asdict(self)


# The shipped kinds. Training data comes from TRAIN_KINDS; HELDOUT_KIND (brief goals: the model must infer the
# intermediate steps itself) is never generated for training by default, so eval measures transfer to it.
KINDS = {
    "tiny": GameKind("tiny", rooms=2, objects=3, quest_length=2),
    "small": GameKind("small", rooms=3, objects=5, quest_length=3),
    "medium": GameKind("medium", rooms=5, objects=8, quest_length=5),
    "small-brief": GameKind("small-brief", rooms=3, objects=5, quest_length=3, goal="brief"),
    "medium-brief": GameKind("medium-brief", rooms=5, objects=8, quest_length=5, goal="brief"),
}
TRAIN_KINDS = ("tiny", "small", "medium")
HELDOUT_KIND = "small-brief"

_SPEC = re.compile(r"^(rooms|objects|quest|goal)=(\w+)$")


def parse_kind(spec: str) -> GameKind:
    """A kind by name (``small``) or inline (``rooms=4,objects=6,quest=4,goal=brief``)."""
    if spec in KINDS:
        return KINDS[spec]
    fields: dict[str, str] = {}
    for part in spec.split(","):
        m = _SPEC.match(part.strip())
        if not m:
            raise ValueError(
                f"game kind {spec!r}: expected one of {sorted(KINDS)} or 'rooms=N,objects=N,quest=N,goal=detailed|brief'"
            )
        fields[m.group(1)] = m.group(2)
    try:
        return GameKind(
            name="custom",
            rooms=int(fields.get("rooms", 3)),
            objects=int(fields.get("objects", 5)),
            quest_length=int(fields.get("quest", 3)),
            goal=fields.get("goal", "detailed"),
        )
    except ValueError as e:
        raise ValueError(f"game kind {spec!r}: {e}") from None


def parse_seeds(spec: str) -> list[int]:
    """``0-9``, ``1,5,7`` or ``100-104,200`` -> the seeds, in order, deduplicated."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            out.extend(range(first, last + 1))
        except ValueError:
            raise ValueError(f"seeds {spec!r}: expected e.g. '0-9', '1,5,7' or '100-104,200'") from None
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class GameRef:
    """One generated game: where it is and what it is."""

    path: Path
    kind: GameKind | None  # None: a game file given by path (its kind is not known)
    seed: int | None

    @property
    def game_id(self) -> str:
        return self.path.stem if self.kind is None else f"{self.kind.name}-s{self.seed}"

    def kind_dict(self) -> dict:
        return {"name": "file", "path": str(self.path)} if self.kind is None else self.kind.to_dict()


def game_from_file(path: str | os.PathLike) -> GameRef:
    """A game file made elsewhere (tw-make, an earlier `kiln agent gen`), checked."""
    return GameRef(check_game_file(path), None, None)


def game_path(kind: GameKind, seed: int, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / kind.key / f"s{seed}.z8"


def check_game_file(path: str | os.PathLike) -> Path:
    """The path, if it is a loadable TextWorld z8 game with its ``.json``; else `GameFileError` saying why."""
    path = Path(path)
    if not path.is_file():
        raise GameFileError(f"game file {path}: does not exist")
    if path.suffix != ".z8":
        raise GameFileError(f"game file {path}: expected a TextWorld .z8 game (tw-make or `kiln agent gen` writes one)")
    data = path.read_bytes()
    if len(data) < 0x40 or data[0] != 8:
        raise GameFileError(f"game file {path}: corrupt (not a z-machine version 8 story file)")
    length = int.from_bytes(data[0x1A:0x1C], "big") * 8
    if length < 0x40 or len(data) < length:
        raise GameFileError(f"game file {path}: corrupt (truncated: {len(data)} bytes, the header says {length})")
    if sum(data[0x40:length]) % 65536 != int.from_bytes(data[0x1C:0x1E], "big"):
        raise GameFileError(f"game file {path}: corrupt (checksum mismatch)")
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise GameFileError(f"game file {path}: its game description {meta.name} is missing (regenerate the game)")
    try:
        json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GameFileError(f"game file {path}: {meta.name} is corrupt ({e})") from None
    return path


def make_game(kind: GameKind, seed: int, cache_dir: str | os.PathLike, force: bool = False) -> GameRef:
    """The game of (kind, seed), generated into the cache unless a valid copy is there already."""
    path = game_path(kind, seed, cache_dir)
    if not force:
        try:
            return GameRef(check_game_file(path), kind, seed)
        except GameFileError:
            pass
    import textworld
    from textworld.generator import compile_game
    from textworld.generator import make_game as tw_make_game

    options = textworld.GameOptions()
    options.seeds = seed
    options.nb_rooms = kind.rooms
    options.nb_objects = kind.objects
    options.quest_length = kind.quest_length
    options.grammar.only_last_action = kind.goal == "brief"
    options.path = str(path)
    options.force_recompile = True
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        game = tw_make_game(options)
    except Exception as e:  # textworld raises its own errors for worlds too small for the quest
        raise ValueError(f"game kind {kind.key}, seed {seed}: textworld could not generate it ({e})") from e
    compile_game(game, options)
    return GameRef(check_game_file(path), kind, seed)


def make_games(kinds: list[GameKind], seeds: list[int], cache_dir: str | os.PathLike, progress=None) -> list[GameRef]:
    """Every (kind, seed) game, kinds outer; ``progress(done, total, ref)`` after each."""
    refs = []
    total = len(kinds) * len(seeds)
    for kind in kinds:
        for seed in seeds:
            refs.append(make_game(kind, seed, cache_dir))
            if progress is not None:
                progress(len(refs), total, refs[-1])
    return refs
