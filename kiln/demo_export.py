"""The demo's last stages: the tuned model as a Hugging Face directory, used by `transformers`, and played as an agent.

export      `kiln export-hf` of the last SFT checkpoint, with the SFT build's tokenizer (its ChatML template and
            the <|im_end|> stop token go with it)
generate    `transformers` loads that directory (AutoModelForCausalLM, AutoTokenizer) and continues one prompt
            greedily, without and with a MeCo metadata prefix (`URL: <host>\\n\\n`): the same model steered by
            the source it is told the text comes from
agent_eval  `kiln agent eval` of the export on TextWorld games of unseen seeds (--exclude refuses any game the
            trajectories came from): success rate, invalid- and repeated-action rates
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import TYPE_CHECKING

from kiln.demo_sft import game_cache, trajectories

if TYPE_CHECKING:
    from kiln.demo import Demo, StageResult

PROMPT_WORDS = 6  # the prompt: the opening words of the first curated document
NEW_TOKENS = 40
FALLBACK_HOST = "en.wikipedia.org"  # when no curated document had a URL (--data of plain text)
# Generation runs one token at a time through a small model: a second thread only spins, and on a machine shared
# with other jobs the spinning made `kiln agent eval` 5x slower (measured: 121 s vs 25 s for one game).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def export(demo: Demo) -> StageResult:
    out = demo.out / "hf"
    done = demo.finished("export", out)
    if done is not None:
        return done
    ckpt = demo.last_checkpoint("sft")
    print(f"  kiln export-hf {demo.shown(ckpt)} --out {demo.shown(out)} (log {demo.log('export')})")
    demo.execute("export", [sys.executable, "-m", "kiln", "export-hf", str(ckpt), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    template = "with" if (out / "chat_template.jinja").is_file() else "no"
    figure = (
        f"{config['architectures'][0]}, {config['num_hidden_layers']} layers x {config['hidden_size']}, "
        f"{template} chat template"
    )
    return demo.finish("export", out, figure)


def _prompt_and_host(demo: Demo) -> tuple[str, str]:
    """The opening words of the first curated document, and the most common URL host of the curated documents (the
    metadata the model saw most during MeCo)."""
    from kiln.data_pipeline.metadata import url_host
    from kiln.demo_general import curated_documents

    prompt, hosts = None, Counter()
    for doc in curated_documents(demo.out / "data" / "output"):
        if prompt is None and len(doc.get("text", "").split()) > PROMPT_WORDS:
            prompt = " ".join(doc["text"].split()[:PROMPT_WORDS])
        url = (doc.get("metadata") or {}).get("url")
        host = url_host(url) if isinstance(url, str) else None
        if host:
            hosts[host] += 1
    return prompt or "The", hosts.most_common(1)[0][0] if hosts else FALLBACK_HOST


def generate(demo: Demo) -> StageResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kiln.demo import StageResult
    from kiln.logs import is_verbose

    if not is_verbose():
        hf_logging.disable_progress_bar()  # the console keeps one line per stage; -v shows the loading bar
    torch.set_num_threads(1)  # a few hundred tiny matmuls: more threads only spin, badly on a busy machine
    hf = demo.out / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt, host = _prompt_and_host(demo)
    chat_markers = [i for i in tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) if i is not None]
    lines = []
    for label, prefix in (("plain", ""), (f"URL: {host}", f"URL: {host}\n\n")):
        # as pretraining saw documents: <s>, then the metadata line (MeCo) or nothing (the cooldown's plain text)
        ids = [tokenizer.bos_token_id, *tokenizer.encode(prefix + prompt, add_special_tokens=False)]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                # a document's continuation, not a chat turn: stop at </s> only, never emit the chat markers the
                # SFT taught it to end a turn with (the exported generation config stops at <|im_end|>)
                eos_token_id=tokenizer.eos_token_id,
                suppress_tokens=chat_markers,
            )
        # decoded whole, then the prefix taken off: decoding the new tokens alone loses the space before them
        text = tokenizer.decode(out[0, 1:], skip_special_tokens=True).removeprefix(prefix)
        lines.append(f"  {label:<{len(host) + 5}} | {' '.join(text.split())}")
    report = demo.out / "generations.txt"
    header = f"transformers {type(model).__name__} from {hf}, greedy, {NEW_TOKENS} new tokens, prompt {prompt!r}"
    report.write_text("\n".join([header, *lines]) + "\n")
    print("\n".join(lines), flush=True)
    return StageResult("generate", report, f"{NEW_TOKENS} tokens each, plain and steered by URL: {host}")


def agent_eval(demo: Demo) -> StageResult:
    out = demo.out / "agent" / "eval"
    done = demo.finished("agent_eval", out)
    if done is not None:
        return done
    s, report = demo.scale, out / "report.json"
    manifest = trajectories(demo).with_name(trajectories(demo).name + ".manifest.json")
    print(
        f"  kiln agent eval {demo.shown(demo.out / 'hf')} --kinds {s.eval_kinds} --seeds {s.eval_seeds} "
        f"(log {demo.log('agent_eval')})"
    )
    cmd = [sys.executable, "-m", "kiln", "agent", "eval", str(demo.out / "hf"), "--kinds", s.eval_kinds]
    cmd += ["--seeds", s.eval_seeds, "--exclude", str(manifest), "--cache", str(game_cache(demo))]
    cmd += ["--max-steps", str(s.eval_max_steps), "--max-new-tokens", str(s.eval_new_tokens), "--out", str(report)]
    demo.execute("agent_eval", cmd, env=ONE_THREAD)
    summary = json.loads(report.read_text())["summary"]
    figure = (
        f"success {summary['won']}/{summary['episodes']} unseen games, invalid actions "
        f"{summary['invalid_action_rate'] or 0:.2f}, repeated {summary['repeated_action_rate'] or 0:.2f}"
    )
    return demo.finish("agent_eval", out, figure)
