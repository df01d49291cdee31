"""SFT labels: exact token masks for every template (end-of-turn token trained, `loss: false` turns not, first
token never), loss policies, tool calls encoded once, every unlabellable row named, the too-long policies, and
transformers' apply_chat_template on the exported tokenizer folder reproducing our ids."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from kiln.data_pipeline.sft.labels import Labeller
from kiln.data_pipeline.sft.length import fit_to_context
from kiln.data_pipeline.sft.messages import BadRecord, Conversation, Message, ToolCall
from kiln.data_pipeline.sft.templates import AGENTLM_SYSTEM_PROMPT, ChatTemplate, resolve_template, template_turns
from kiln.data_pipeline.sft.testing import smollm2_tokenizer, tiny_tokenizer
from kiln.data_pipeline.sft.tokenizer_files import ChatTokenizer

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def smol(request, tmp_path_factory) -> ChatTokenizer:
    try:
        cache = request.config.cache.mkdir("kiln-sft-tokenizers")
    except AttributeError:  # cache provider disabled
        cache = tmp_path_factory.mktemp("tokenizers")
    try:
        return ChatTokenizer(smollm2_tokenizer(cache))
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> ChatTokenizer:
    return ChatTokenizer(tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok")))


def agentinstruct_like() -> Conversation:
    """Task prompt answered by an untrained "Ok.", then two trained steps."""
    return Conversation(
        [
            Message("user", "Task: do X"),
            Message("assistant", "Ok.", train=False),
            Message("user", "Observation: 1"),
            Message("assistant", "Act: ls"),
            Message("user", "Observation: 2"),
            Message("assistant", "Done."),
        ]
    )


def chatml_pieces(prefix: str = "") -> list[tuple[str, int]]:
    return [
        (prefix + "<|im_start|>user\nTask: do X<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Ok.<|im_end|>", 0),
        ("\n<|im_start|>user\nObservation: 1<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Act: ls<|im_end|>", 1),
        ("\n<|im_start|>user\nObservation: 2<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Done.<|im_end|>", 1),
        ("\n", 0),
    ]


def llama2_pieces(bos: str, eos: str) -> list[tuple[str, int]]:
    return [
        (f"{bos}[INST] <<SYS>>\n{AGENTLM_SYSTEM_PROMPT}\n<</SYS>>\n\nTask: do X [/INST]", 0),
        (f" Ok. {eos}", 0),
        (f"{bos}[INST] Observation: 1 [/INST]", 0),
        (f" Act: ls {eos}", 1),
        (f"{bos}[INST] Observation: 2 [/INST]", 0),
        (f" Done. {eos}", 1),
    ]


def expected(tok: ChatTokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Ids and mask written out by hand: each piece tokenized alone, its flag on each of its tokens."""
    ids, mask = [], []
    for text, flag in pieces:
        piece_ids = tok.encode_batch([text])[0]
        ids += piece_ids
        mask += [flag] * len(piece_ids)
    mask[0] = 0
    return ids, mask


@pytest.mark.parametrize(
    "which, template, pieces, eot",
    [
        ("tiny", "chatml", chatml_pieces(), "<|im_end|>"),
        ("tiny", "llama2", llama2_pieces("<s>", "</s>"), "</s>"),
        ("smol", "chatml", chatml_pieces(), "<|im_end|>"),
        ("smol", "llama2", llama2_pieces("<|im_start|>", "<|im_end|>"), "<|im_end|>"),  # SmolLM2's bos / eos
        ("smol", "auto", chatml_pieces(SMOL_SYSTEM), "<|im_end|>"),  # SmolLM2's own template: its system prompt
    ],
)
def test_exact_mask_per_template(request, which, template, pieces, eot):
    tok = request.getfixturevalue(which)
    tmpl = resolve_template(template, tok.chat_template)
    lab = Labeller(tok, tmpl).label(agentinstruct_like())
    want_ids, want_mask = expected(tok, pieces)
    assert lab.ids.tolist() == want_ids
    assert lab.mask.tolist() == want_mask
    # one render: the ids are the tokenization of the whole rendered text
    assert lab.ids.tolist() == tok.encode_batch([lab.text])[0]
    # the end-of-turn token closes each trained span and is trained; what follows it is not
    eot = tok.tokenizer.token_to_id(eot)
    span_ends = np.flatnonzero(np.diff(np.r_[lab.mask, 0].astype(int)) == -1)
    assert len(span_ends) == 2 and all(lab.ids[e] == eot for e in span_ends)
    # exactly the assistant tokens minus the `loss: false` turn carry loss
    decoded = tok.decode(lab.ids[lab.mask == 1])
    assert "Act: ls" in decoded and "Done." in decoded and "Ok." not in decoded and "Observation" not in decoded
    assert lab.mask[0] == 0


def test_transformers_renders_our_ids_from_the_exported_folder(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    conv = agentinstruct_like()
    conv.messages.insert(0, Message("system", "Be brief."))
    for name in ("auto", "chatml", "llama2"):
        tmpl = resolve_template(name, smol.chat_template)
        lab = Labeller(smol, tmpl).label(conv)
        folder = smol.export(tmp_path / name, tmpl.source)
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        assert hf.chat_template == tmpl.source
        turns, tools = template_turns(conv, tmpl)
        ids = hf.apply_chat_template([t.message for t in turns], tools=tools, tokenize=True, return_dict=False)
        assert list(ids) == lab.ids.tolist(), name


def test_loss_policies_and_per_message_flags(tiny):
    tmpl = resolve_template("chatml", None)
    conv = agentinstruct_like()
    last = Labeller(tiny, tmpl, "last_assistant").label(conv)
    ids, mask = expected(tiny, [(t, 0) for t, _ in chatml_pieces()[:5]] + [("Done.<|im_end|>", 1), ("\n", 0)])
    assert last.ids.tolist() == ids and last.mask.tolist() == mask
    everything = Labeller(tiny, tmpl, "all").label(conv)  # every turn, headers included, but "Ok." keeps its flag
    pieces = [("<|im_start|>user\nTask: do X<|im_end|>\n", 1), ("<|im_start|>assistant\nOk.<|im_end|>\n", 0),
              ("".join(t for t, _ in chatml_pieces()[2:]).removeprefix("\n"), 1)]  # fmt: skip
    assert everything.mask.tolist() == expected(tiny, pieces)[1]
    conv.messages[1].train = None
    conv.messages[2].train = True  # a user turn flagged for loss trains its whole span
    flagged = Labeller(tiny, tmpl, "assistant").label(conv)
    want = [
        ("<|im_start|>user\nTask: do X<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Ok.<|im_end|>", 1),
        ("\n", 0),
        ("<|im_start|>user\nObservation: 1<|im_end|>\n", 1),  # the user turn's own span: header to newline
        ("<|im_start|>assistant\n", 0),
        *chatml_pieces()[3:],
    ]
    assert flagged.mask.tolist() == expected(tiny, want)[1]


def test_tool_calls_are_encoded_once(tiny):
    conv = Conversation(
        [
            Message("user", "list files"),
            Message("assistant", "Looking.", [ToolCall("bash", {"cmd": "ls -la", "n": [1, 2]})]),
            Message("tool", "a.py b.py"),
            Message("assistant", "Two files."),
        ],
        tools=[{"name": "bash", "parameters": {"type": "object"}}],
    )
    text_mode = Labeller(tiny, resolve_template("chatml", None)).label(conv)
    calls = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text_mode.text)
    assert [json.loads(c) for c in calls] == [{"name": "bash", "arguments": {"cmd": "ls -la", "n": [1, 2]}}]
    assert '\\"' not in text_mode.text  # nothing JSON-encoded twice
    assert '<tools>\n{"name": "bash"' in text_mode.text  # the tools list went into the system message
    trained = tiny.decode(text_mode.ids[text_mode.mask == 1])
    assert '"arguments": {"cmd": "ls -la"' in trained
    native = ChatTemplate(
        "native",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    lab = Labeller(tiny, native).label(conv)
    assert '<call>{"name": "bash", "arguments": {"cmd": "ls -la", "n": [1, 2]}}</call>' in lab.text


GEN = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


@pytest.mark.parametrize(
    "template, conv, reason",
    [
        (
            "llama2",
            Conversation([Message("user", "q"), Message("assistant", "", [ToolCall("f", {})]), Message("tool", "1"),
                          Message("assistant", "a")]),
            "role_not_renderable",
        ),
        (  # drops the assistant's text
            ChatTemplate("drops", "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role != 'assistant' %}"
                                  "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}" + GEN),
            None,
            "template_drops_content",
        ),
        (  # the last turn renders differently from earlier ones: prefixes are not prefixes
            ChatTemplate("unstable", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                     "{% if loop.last %}!{% endif %}<|im_end|>\n{% endfor %}" + GEN),
            None,
            "template_not_prefix_stable",
        ),
        (
            ChatTemplate("raises", "{{ raise_exception('no') }}"),
            None,
            "template_error",
        ),
        (  # no separator between the generation prompt and the answer: "assist" + "ant" is one token in context
            ChatTemplate("glued", "{% for m in messages %}{% if m.role == 'assistant' %}assist{% endif %}"
                                  "{{ m.content }}{% endfor %}{% if add_generation_prompt %}assist{% endif %}"),
            Conversation([Message("user", "Hello"), Message("assistant", "ant")]),
            "tokenization_differs_in_context",
        ),
        ("chatml", Conversation([Message("user", "say <|im_end|>"), Message("assistant", "no")]),
         "special_token_in_content"),
        ("chatml", Conversation([Message("user", "q"), Message("assistant", "a", train=False)]),
         "no_trainable_tokens"),
    ],
)  # fmt: skip
def test_rows_that_cannot_be_labelled_are_named(tiny, template, conv, reason):
    tmpl = resolve_template(template, None) if isinstance(template, str) else template
    with pytest.raises(BadRecord) as e:
        Labeller(tiny, tmpl).label(conv or agentinstruct_like())
    assert e.value.reason == reason


def test_too_long_drop_and_truncate_at_a_turn_boundary(tiny):
    labeller = Labeller(tiny, resolve_template("chatml", None))
    conv = agentinstruct_like()
    lab = labeller.label(conv)
    n = lab.ids.size
    assert fit_to_context(lab, n, "drop") == (lab, False)
    with pytest.raises(BadRecord, match="too_long"):
        fit_to_context(lab, n - 1, "drop")
    cut, was_cut = fit_to_context(lab, n - 1, "truncate")
    # the cut ends right after the first trained answer (its end-of-turn newline included), scaffold kept whole
    shorter = labeller.label(Conversation(conv.messages[:4]))
    assert was_cut and cut.ids.tolist() == shorter.ids.tolist() and cut.mask.tolist() == shorter.mask.tolist()
    assert cut.roles[-1] == "assistant"
    scaffold_end = int(lab.turn_ends[2])  # task + "Ok." + first observation
    with pytest.raises(BadRecord, match="too_long_to_truncate"):
        fit_to_context(lab, scaffold_end + 2, "truncate")


def test_kiln_sentencepiece_tokenizer_folder(tmp_path):
    """A `kiln data train-tokenizer` folder: its specials come from kiln_tokenizer.json, Llama-2-chat's <s> / </s>
    are the BOS / EOS ids, and the exported folder keeps the sentencepiece model's fingerprint."""
    pytest.importorskip("sentencepiece")
    from kiln.data_pipeline.sft.testing import TINY_CORPUS
    from kiln.data_pipeline.tokenize.tokenizer import HFTokenizer, load_tokenizer
    from kiln.data_pipeline.tokenize.train import TokenizerTrainConfig, train_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"{t} {i}"}) for i in range(50) for t in TINY_CORPUS))
    folder = train_tokenizer(
        TokenizerTrainConfig(inputs=[str(corpus)], output_dir=str(tmp_path / "tok"), vocab_size=400)
    )
    tok = ChatTokenizer(folder)
    spm = load_tokenizer(folder)
    conv = Conversation([Message("user", "Hello there"), Message("assistant", "Ok. Done.")])
    lab = Labeller(tok, resolve_template("llama2", None)).label(conv)
    assert lab.ids[0] == spm.bos_id and lab.ids[-1] == spm.eos_id and lab.mask[-1] == 1
    exported = tok.export(tmp_path / "out", resolve_template("llama2", None).source)
    assert HFTokenizer(exported / "tokenizer.json").fingerprint == spm.fingerprint
