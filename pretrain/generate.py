"""Text generation with a KV cache: greedy or nucleus (top-p) sampling, optionally steered by a MeCo metadata
prefix (``URL: en.wikipedia.org\\n\\n`` before the prompt, the format the model was conditioned on).

The prompt is run once (prefill, causal attention over the prompt, filling the cache); then each new token is
fed alone and attends to every cached position. Works at TP > 1 when every rank of the TP group calls it with
the same prompt and seed (logits are gathered over the vocabulary, so all ranks pick the same token).
"""

from __future__ import annotations

import torch

from kiln.pretrain.model import KilnLlama


def metadata_prefix(metadata: str | None) -> str:
    """MeCo conditioning prefix for a URL/host, e.g. ``en.wikipedia.org`` -> ``URL: en.wikipedia.org\\n\\n``."""
    return f"URL: {metadata.strip()}\n\n" if metadata else ""


def sample_next(
    logits: torch.Tensor,
    *,
    greedy: bool = True,
    top_p: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] next token ids."""
    if greedy:
        return logits.argmax(dim=-1)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy decoding instead)")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: KilnLlama,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    greedy: bool = True,
    top_p: float = 1.0,
    temperature: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """input_ids [batch, prompt] (equal-length prompts) -> [batch, prompt + generated].

    Stops when every row produced an EOS (rows that finished earlier are padded with that EOS) or after
    ``max_new_tokens``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with a non-empty prompt, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    batch, prompt_len = input_ids.shape
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = model.new_kv_cache(batch, prompt_len + max_new_tokens)
    out = [input_ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    logits = model(input_ids, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, greedy=greedy, top_p=top_p, temperature=temperature, generator=generator)
        if eos:
            token = torch.where(finished, eos_t[0], token)
            finished |= torch.isin(token, eos_t)
        out.append(token[:, None])
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], kv_cache=cache)[:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)


def generate_text(
    model: KilnLlama,
    tokenizer,
    prompt: str,
    *,
    metadata: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 64,
    greedy: bool = True,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
) -> str:
    """Prompt text -> generated continuation (without the prompt). ``chat`` applies the tokenizer's chat
    template (for instruction-tuned models); ``metadata`` prepends the MeCo prefix to the text."""
    text = metadata_prefix(metadata) + prompt
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    eos = model.cfg.eos_token_id if model.cfg.eos_token_id is not None else tokenizer.eos_token_id
    out = generate(
        model,
        ids,
        max_new_tokens,
        greedy=greedy,
        top_p=top_p,
        temperature=temperature,
        eos_token_id=eos,
        seed=seed,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


__all__ = ["generate", "generate_text", "metadata_prefix", "sample_next"]
