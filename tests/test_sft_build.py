"""`kiln data sft` end to end on small synthetic sources: every bad-input reason counted exactly (with file and
record), the rest unaffected, the packed output read back (conversation starts unlabelled, segments and
positions per conversation), determinism by seed, megatron-compatible files, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from kiln.config import ConfigError
from kiln.data_pipeline.sft.build import build_sft
from kiln.data_pipeline.sft.config import load_sft_data_recipe
from kiln.data_pipeline.sft.dataset import SFTPackedDataset
from kiln.data_pipeline.sft.indexed import IndexedReader, IndexedWriter
from kiln.data_pipeline.sft.mixing import Pool, mix
from kiln.data_pipeline.sft.packing import best_fit_decreasing
from kiln.data_pipeline.sft.testing import tiny_tokenizer


def _agent(i: int, steps: int = 2) -> dict:
    turns = [{"from": "human", "loss": None, "value": f"Task {i}: find the fox."},
             {"from": "gpt", "loss": False, "value": "Ok."}]  # fmt: skip
    for k in range(steps):
        turns += [{"from": "human", "value": f"Observation: step {k}"}, {"from": "gpt", "value": f"Action: look {k}"}]
    return {"id": f"a{i}", "conversations": turns}


def _tool(i: int, args='{"cmd": "ls"}', observation_role="user") -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"List files {i}"},
            {
                "role": "assistant",
                "content": "Sure.",
                "tool_calls": [{"function": {"name": "bash", "arguments": args}}],
            },
            {"role": observation_role, "content": "a.py b.py"},
            {"role": "assistant", "content": "Two files."},
        ]
    }


LONG = "fox " * 400  # far over the test context


def write_sources(root) -> dict[str, str]:
    agent = [json.dumps(_agent(i)) for i in range(6)]
    bad = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "x"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "   "}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": LONG}, {"from": "gpt", "value": "a"}]},  # the scaffold is long
        {"conversations": _agent(99)["conversations"] + [{"from": "human", "value": "more"}, {"from": "gpt", "value": LONG}]},
    ]  # fmt: skip
    lines = agent[:3] + [json.dumps(b) for b in bad[:2]] + ["{not json"] + [json.dumps(b) for b in bad[2:]] + agent[3:]
    paths = {"agent": root / "agent.jsonl", "tools": root / "tools.jsonl", "chat": root / "chat.json",
             "wrong": root / "wrong.jsonl"}  # fmt: skip
    paths["agent"].write_text("\n".join(lines) + "\n")
    tools = [_tool(0), _tool(1, observation_role="tool"), _tool(2, args='{"cmd": '), _tool(3)]
    paths["tools"].write_text("\n".join(json.dumps(t) for t in tools) + "\n")
    chat = [{"instruction": f"Say {w}.", "input": "", "output": f"{w.capitalize()}!"} for w in "abcdefgh"]
    paths["chat"].write_text(json.dumps(chat))
    paths["wrong"].write_text("\n".join(json.dumps(_agent(i)) for i in range(3)) + "\n")
    return {k: str(v) for k, v in paths.items()}


# agent.jsonl record indices (line numbers) of each bad row, in the order written above
EXPECTED_DROPS = {
    "unknown_role": [("agent", 3)],
    "empty_turn": [("agent", 4)],
    "invalid_json": [("agent", 5)],
    "ends_on_user_turn": [("agent", 6)],
    "non_alternating": [("agent", 7)],
    "role_not_renderable": [("tools", 1)],  # a `tool` turn under Llama-2-chat
    "invalid_tool_arguments": [("tools", 2)],
    "not_declared_format": [("wrong", 0), ("wrong", 1), ("wrong", 2)],  # ShareGPT declared as Alpaca
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def recipe_file(tmp_path, tok_dir, sources, **data) -> str:
    cfg = {
        "name": "tiny",
        "data": {
            "tokenizer": tok_dir,
            "template": "llama2",
            "output_dir": str(tmp_path / "out"),
            "seq_length": 127,
            "too_long": "drop",
            "heldout_fraction": 0.0,
            "sources": [
                {"name": "agent", "role": "agent", "format": "sharegpt", "paths": [sources["agent"]]},
                {"name": "tools", "role": "agent", "format": "openai", "paths": [sources["tools"]]},
                {"name": "chat", "role": "general", "format": "alpaca", "paths": [sources["chat"]]},
                {"name": "wrong", "role": "general", "format": "alpaca", "paths": [sources["wrong"]], "weight": 0},
            ],
            "mix": {"eta": 0.2, "total_examples": 40},
            **data,
        },
        "model": {"note": "a kiln train section: ignored by kiln data sft"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def build(tmp_path, tok_dir, overrides=(), **data):
    sources = write_sources(tmp_path)
    return build_sft(load_sft_data_recipe(recipe_file(tmp_path, tok_dir, sources, **data), list(overrides)), False)


def test_each_bad_input_is_counted_with_its_file_and_record(tmp_path, tok_dir):
    report = build(tmp_path, tok_dir)
    drops = dict(EXPECTED_DROPS, too_long=[("agent", 8), ("agent", 9)])
    got = report["dropped"]["by_reason"]
    assert got == {reason: len(where) for reason, where in drops.items()}
    for reason, where in drops.items():
        rows = report["dropped"]["examples"][reason]
        assert [(r["source"], r["record"]) for r in rows] == where
        assert all(r["file"].endswith(f"{r['source']}.jsonl") for r in rows)
    # the rest of the build is unaffected: every good row is kept
    s = report["sources"]
    assert (s["agent"]["kept"], s["tools"]["kept"], s["chat"]["kept"], s["wrong"]["kept"]) == (6, 2, 8, 0)
    assert report["input"] == report["kept"] + report["dropped"]["total"] == 13 + 4 + 8 + 3
    assert s["wrong"]["files"] == {str(tmp_path / "wrong.jsonl"): None}
    dropped_log = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped_log) == report["dropped"]["total"]


def test_too_long_under_truncate_keeps_the_scaffold(tmp_path, tok_dir):
    report = build(tmp_path, tok_dir, too_long="truncate")
    assert report["dropped"]["by_reason"]["too_long_to_truncate"] == 1  # the long task prompt
    assert [r["record"] for r in report["dropped"]["examples"]["too_long_to_truncate"]] == [8]
    assert "too_long" not in report["dropped"]["by_reason"]
    assert report["truncated"] == 1 and report["sources"]["agent"]["kept"] == 7  # cut before the long answer


def test_mix_share_packing_and_reading_back(tmp_path, tok_dir):
    report = build(tmp_path, tok_dir)
    assert report["mix"]["examples"] == 40
    assert report["agent_share"] == pytest.approx(0.2, abs=1 / 40)
    assert report["sources"]["wrong"]["examples"] == 0
    data = SFTPackedDataset(tmp_path / "out" / "train")
    meta = data.meta
    assert meta["format"] == "kiln-sft-packed-v1" and meta["pack_tokens"] == 128 and meta["documents"] == 40
    assert meta["chat_template"]["name"] == "llama2"
    seen_tokens = seen_loss = 0
    for i in range(len(data)):
        tokens, mask, starts = data.read(i)
        lengths = data.conversations(i)
        f = data.fields(i)
        boundaries = np.concatenate(([0], np.cumsum(lengths)))
        for k, (a, b) in enumerate(zip(boundaries, boundaries[1:])):
            assert mask[a] == 0  # the first token of each conversation carries no label
            if a > 0:
                assert f["loss_mask"][a - 1] == 0  # nor does the label that predicts it from the previous one
            assert (f["segment_ids"][a:b] == k).all() and f["position_ids"][a] == 0
            assert (f["position_ids"][a : min(b, 127)] == np.arange(min(b, 127) - a)).all()
        n = int(boundaries[-1])
        assert (mask[n:] == 0).all() and (tokens[n:] == meta["pad_id"]).all()
        assert (f["loss_mask"][n - 1 :] == 0).all()
        assert len(data.sources(i)) == lengths.size
        seen_tokens += n
        seen_loss += int(mask.sum())
    assert (seen_tokens, seen_loss) == (meta["tokens"], meta["loss_tokens"])
    assert report["packing_efficiency"] == pytest.approx(meta["tokens"] / (len(data) * 128))
    # held-out split per source
    report = build(
        tmp_path, tok_dir, overrides=["data.heldout_fraction=0.25", "data.output_dir=" + str(tmp_path / "h")]
    )
    assert {k: v["documents"] for k, v in report["heldout"].items()} == {"agent": 2, "tools": 1, "chat": 2}
    held = SFTPackedDataset(tmp_path / "h" / "heldout" / "agent")
    assert held.meta["split"] == "heldout" and set(held.sources(0)) == {"agent"}


def test_tool_call_arguments_are_single_encoded_in_the_output(tmp_path, tok_dir):
    build(tmp_path, tok_dir)
    data = SFTPackedDataset(tmp_path / "out" / "train")
    from kiln.data_pipeline.sft.tokenizer_files import ChatTokenizer

    tok = ChatTokenizer(tmp_path / "out" / "tokenizer")
    texts = [tok.decode(data.read(i)[0]) for i in range(len(data))]
    calls = [line for t in texts for line in t.splitlines() if line.startswith('{"name": "bash"')]
    assert calls and all(json.loads(c) == {"name": "bash", "arguments": {"cmd": "ls"}} for c in calls)


def test_same_seed_same_bytes_other_seed_other_mix(tmp_path, tok_dir):
    files = ("train.bin", "train.idx", "train_loss_mask.bin", "train.sources.npy")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build(tmp_path, tok_dir, overrides=[f"data.seed={seed}", f"data.output_dir={tmp_path / name}"])
        runs[name] = [(tmp_path / name / f).read_bytes() for f in files]
        report = json.loads((tmp_path / name / "report.json").read_text())
        runs[name].append(
            json.dumps({k: v for k, v in report.items() if k not in ("output_dir", "outputs", "tokenizer")})
        )
    assert runs["a"] == runs["b"]
    assert runs["a"][0] != runs["c"][0]


def test_mixing_oversamples_with_a_cap_and_hits_the_target():
    pools = [Pool("agent", "agent", np.full(5, 10)), Pool("g1", "general", np.full(100, 10), 0.75),
             Pool("g2", "general", np.full(100, 10), 0.25)]  # fmt: skip
    result = mix(pools, eta=0.2, total_examples=200, max_repeats=10, seed=3)
    counts = result.counts(3)
    assert counts.tolist() == [40, 120, 40] and result.limited_by is None
    agent_picks = [j for p, j in result.picks if p == 0]
    assert np.bincount(agent_picks).tolist() == [8] * 5 and result.passes[0] == 8
    capped = mix(pools, eta=0.2, total_examples=200, max_repeats=4, seed=3)
    assert capped.limited_by == "agent" and capped.counts(3)[0] == 20
    shares = capped.counts(3) / capped.counts(3).sum()
    assert abs(shares[0] - 0.2) <= 1 / capped.counts(3).sum()
    by_tokens = mix([Pool("a", "agent", np.full(10, 100)), Pool("g", "general", np.full(100, 10))], 0.2, "tokens",
                    total_tokens=5000)  # fmt: skip
    tokens = np.bincount([p for p, _ in by_tokens.picks], weights=[100 if p == 0 else 10 for p, _ in by_tokens.picks])
    assert tokens[0] / tokens.sum() == pytest.approx(0.2, abs=0.02)


def test_best_fit_decreasing_fills_the_tightest_bin():
    bins = best_fit_decreasing([6, 5, 4, 3, 2, 2], 10)
    assert bins == [[0, 2], [1, 3, 4], [5]]
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)


@pytest.mark.slow
def test_indexed_files_are_what_megatron_writes_and_reads(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as idx
    docs = [([np.arange(5), np.arange(3)]), ([np.arange(7)]), ([np.arange(2), np.arange(2), np.arange(4)])]
    ours = IndexedWriter(tmp_path / "ours", np.uint16)
    theirs = idx.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for seqs in docs:
        values = np.concatenate(seqs)
        ours.add_document(values, [s.size for s in seqs])
        theirs.add_document(values, [s.size for s in seqs])
    ours.finalize()
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()
    read = idx.IndexedDataset(str(tmp_path / "ours"))
    assert read.document_indices.tolist() == IndexedReader(tmp_path / "ours").document_indices.tolist() == [0, 2, 3, 6]
    assert read[1].tolist() == [0, 1, 2] and IndexedReader(tmp_path / "ours").document(2)[1].tolist() == [2, 2, 4]


def test_packed_fields_equal_the_trainers_pack_sample(tmp_path, tok_dir):
    torch = pytest.importorskip("torch")
    from kiln.pretrain.data import pack_sample

    build(tmp_path, tok_dir)
    data = SFTPackedDataset(tmp_path / "out" / "train")
    for i in range(len(data)):
        ours, theirs = data.fields(i), pack_sample(*data.read(i))
        for key, value in theirs.items():
            assert torch.equal(torch.as_tensor(ours[key]).to(value.dtype), value), key


def test_cli_dry_run_build_and_errors(tmp_path, tok_dir, capsys):
    from kiln.cli import main

    recipe = recipe_file(tmp_path, tok_dir, write_sources(tmp_path))
    assert main(["data", "sft", recipe, "--dry-run"]) == 0
    assert "agent" in capsys.readouterr().out
    assert main(["data", "sft", recipe, "-q", "data.mix.total_examples=20"]) == 0
    out = capsys.readouterr().out
    assert "agent share 0.2000" in out and "packing:" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["mix"]["examples"] == 20
    assert main(["data", "sft", recipe, "model.lr=1"]) == 2
    assert "data.* overrides" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"key 'data.mix': eta must be in \[0, 1\]"):
        load_sft_data_recipe(recipe, ["data.mix.eta=1.5"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*no file matches"):
        load_sft_data_recipe(recipe, ["data.sources.0.paths=[nowhere/*.jsonl]"])
