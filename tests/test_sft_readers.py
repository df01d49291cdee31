"""SFT readers: every format to the canonical conversation, the structural checks, bad files and records."""

from __future__ import annotations

import gzip
import json

import pytest

from kiln.data_pipeline.sft import readers
from kiln.data_pipeline.sft.messages import BadRecord, Conversation, Message, ToolCall, check_structure
from kiln.data_pipeline.sft.readers import detect_format, normalise, read_file

from conftest import shared_file


def _read(fmt, record, field=None):
    return readers.READERS[fmt](record, field)


def _roles(conv):
    return [m.role for m in conv.messages]


def test_agentinstruct_sharegpt_keeps_loss_flags_and_both_spellings():
    record = {
        "id": "os_1",
        "conversations": [
            {"from": "human", "loss": None, "value": "Task prompt"},
            {"from": "gpt", "loss": False, "value": "Ok."},
            {"from": "human", "loss": None, "value": "Observation: x"},
            {"from": "gpt", "loss": True, "value": "Act: bash"},
        ],
    }
    conv = _read("sharegpt", record)
    assert _roles(conv) == ["user", "assistant", "user", "assistant"]
    assert [m.train for m in conv.messages] == [None, False, None, True]
    assert conv.id == "os_1"
    spelled = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert _roles(_read("sharegpt", spelled)) == ["user", "assistant"]


def test_sharegpt_function_call_and_observation_turns():
    record = {
        "system": "sys",
        "tools": json.dumps([{"name": "f", "parameters": {}}]),
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {"x": 1}})},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "It is 42."},
        ],
    }
    conv = _read("sharegpt", record)
    assert _roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[2].tool_calls == [ToolCall("f", {"x": 1})]
    assert conv.tools == [{"name": "f", "parameters": {}}]
    check_structure(conv)


def test_openai_tool_call_arguments_become_objects_never_strings():
    record = {
        "tools": [{"type": "function", "function": {"name": "open", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "open it"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "open", "arguments": '{"path": "a.py"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "open", "arguments": {"path": "b.py"}}},
                    # double-encoded by the producer: decoded back to the object
                    {"id": "c3", "function": {"name": "open", "arguments": json.dumps(json.dumps({"path": "c"}))}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": {"ok": True}},
            {"role": "assistant", "content": "done"},
        ],
    }
    conv = _read("openai", record)
    calls = conv.messages[1].tool_calls
    assert [c.arguments for c in calls] == [{"path": "a.py"}, {"path": "b.py"}, {"path": "c"}]
    assert all(isinstance(c.arguments, dict) for c in calls)
    assert conv.messages[2].content == '{"ok": true}' and conv.messages[2].tool_call_id == "c1"
    check_structure(conv)


@pytest.mark.parametrize("arguments", ['{"path": ', "not json", "[1, 2]", "7"])
def test_invalid_tool_arguments_are_a_bad_record(arguments):
    record = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]},
        ]
    }
    with pytest.raises(BadRecord) as e:
        _read("openai", record)
    assert e.value.reason == "invalid_tool_arguments"


def test_alpaca_with_history_system_and_seed_instances():
    conv = _read(
        "alpaca",
        {"instruction": "Add", "input": "2 and 3", "output": "5", "history": [["hi", "hello"]], "system": "math"},
    )
    assert _roles(conv) == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[3].content == "Add\n\n2 and 3" and conv.messages[4].content == "5"
    seed = _read("alpaca", {"instruction": "Suggest", "instances": [{"input": "", "output": "Oats."}]})
    assert [m.content for m in seed.messages] == ["Suggest", "Oats."]


def test_raw_human_assistant_dialogue():
    conv = _read("raw_dialogue", {"chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao"})
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "hi there"),
        ("assistant", "hello"),
        ("user", "bye"),
        ("assistant", "ciao"),
    ]
    with pytest.raises(BadRecord, match="malformed_record"):
        _read("raw_dialogue", {"chosen": "preamble\n\nHuman: x\n\nAssistant: y"})


def test_sweagent_history_joins_demonstration_and_parses_tool_calls():
    calls = repr([{"function": {"arguments": '{"file_name": "a.py"}', "name": "find_file"}, "id": "call_1"}])
    record = {
        "history": [
            {"role": "system", "content": "SETTING"},
            {"role": "user", "content": "DEMONSTRATION", "is_demo": True},
            {"role": "user", "content": "ISSUE"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
            {"role": "tool", "content": "Found 1", "tool_call_ids": "['call_1']"},
            {"role": "assistant", "content": "Done.", "tool_calls": calls.replace("call_1", "call_2")},
            {"role": "tool", "content": "final observation", "tool_call_ids": "['call_2']"},
        ]
    }
    conv = _read("sweagent", record)
    assert _roles(conv) == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert conv.messages[1].content == "DEMONSTRATION\n\nISSUE"
    assert conv.messages[2].tool_calls == [ToolCall("find_file", {"file_name": "a.py"}, "call_1")]
    assert conv.messages[3].tool_call_id == "call_1"
    with pytest.raises(BadRecord, match="ends_on_user_turn"):
        check_structure(conv)
    trimmed, n = normalise(conv, drop_trailing=True)
    assert n == 1 and _roles(trimmed)[-1] == "assistant"
    check_structure(trimmed)


def test_toolbench_train_messages():
    record = {
        "answer_generation": {
            "train_messages": [
                [{"role": "system", "content": "s"}],
                [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "None", "function_call": {"name": "f", "arguments": "{}"}},
                    {"role": "function", "name": "f", "content": "{}"},
                    {"role": "assistant", "content": "answer"},
                ],
            ]
        }
    }
    conv = _read("toolbench", record)
    assert _roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[2].content == "" and conv.messages[2].tool_calls == [ToolCall("f", {})]
    with pytest.raises(BadRecord, match="malformed_record"):
        _read("toolbench", {"answer_generation": {"valid_data": False}})


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([Message("user", "a"), Message("narrator", "b"), Message("assistant", "c")], "unknown_role"),
        ([Message("user", "a"), Message("assistant", "  ")], "empty_turn"),
        ([Message("user", "a"), Message("assistant", "b"), Message("user", "c")], "ends_on_user_turn"),
        ([Message("user", "a"), Message("user", "b"), Message("assistant", "c")], "non_alternating"),
        ([Message("assistant", "a"), Message("user", "b"), Message("assistant", "c")], "non_alternating"),
        ([Message("user", "a"), Message("assistant", "b"), Message("tool", "c"), Message("assistant", "d")],
         "non_alternating"),  # a tool result with no call before it
        ([Message("user", "a"), Message("system", "b"), Message("assistant", "c")], "non_alternating"),
    ],
)  # fmt: skip
def test_structural_checks(messages, reason):
    with pytest.raises(BadRecord) as e:
        check_structure(Conversation(messages))
    assert e.value.reason == reason


def test_tool_turns_after_a_call_alternate():
    conv = Conversation(
        [
            Message("system", "s"),
            Message("user", "a"),
            Message("assistant", "", [ToolCall("f", {}), ToolCall("g", {})]),
            Message("tool", "1"),
            Message("tool", "2"),
            Message("user", "more?"),
            Message("assistant", "done"),
        ]
    )
    check_structure(conv)


def test_files_wrong_declared_format_and_invalid_json(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "i", "output": "o"}] * 3))
    out = list(read_file(str(alpaca), "sharegpt"))
    assert [(i, r.reason) for i, r in out] == [(0, "not_declared_format"), (1, "not_declared_format"),
                                                (2, "not_declared_format")]  # fmt: skip
    found = {}
    assert all(isinstance(r, Conversation) for _, r in read_file(str(alpaca), "auto", found=found))
    assert found["format"] == "alpaca"
    lines = tmp_path / "b.jsonl.gz"
    good = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    with gzip.open(lines, "wt") as f:
        f.write(good + "\n{broken\n\n" + good + "\n")
    out = list(read_file(str(lines), "auto"))
    assert [i for i, _ in out] == [0, 1, 3]
    assert isinstance(out[1][1], BadRecord) and out[1][1].reason == "invalid_json"
    unknown = tmp_path / "c.jsonl"
    unknown.write_text(json.dumps({"text": "plain"}) + "\n")
    assert [r.reason for _, r in read_file(str(unknown), "auto")] == ["not_declared_format"]


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "relative, fmt",
    [
        ("agent/adp_raw_samples_agentinstruct_eto_codeact.jsonl", "sharegpt"),
        ("agent/fireact_multitask_multimethod.jsonl", "openai"),
        ("agent/toolbench_data_example_answers.jsonl", "toolbench"),
        ("agent/sweagent_demo_trajectories.jsonl", "sweagent"),
        ("chat/fastchat_dummy_conversation.json", "sharegpt"),
        ("chat/hh-rlhf_harmless-base_test.jsonl.gz", "raw_dialogue"),
        ("chat/lima_llamafactory.json", "alpaca"),
        ("chat/llamafactory_alpaca_en_demo.json", "alpaca"),
        ("chat/stanford_alpaca_seed_tasks.jsonl", "alpaca"),
    ],
)
def test_shared_files_are_detected(relative, fmt):
    path = str(shared_file(relative))
    records = readers.iter_json_records(path)
    assert detect_format(next(records)[1]) == fmt
    found = {}
    first = next(r for _, r in read_file(path, "auto", found=found))
    assert found["format"] == fmt and isinstance(first, (Conversation, BadRecord))
