"""Autoregressive sampling for a trained Transformer (simple, no KV cache).

Each step re-runs the model on the whole (cropped) context: O(n^2) in the number of tokens,
which is fine for the short samples printed at the end of a run and keeps the model free of
inference-only state.
"""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.errors import ConfigError


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """Sample up to `max_new_tokens` token ids after `prompt_ids`; returns only the new ids.

    temperature: logits are divided by it before the softmax; 0 means greedy (argmax).
    top_k: sample among the k most likely tokens only; None or 0 = the whole vocabulary.
    seed: seeds a local CPU torch.Generator, so the same (model, prompt, seed) gives the same
      tokens every call and the global RNG is never touched.
    eos_id: stop as soon as this id is produced; it is not included in the result.

    The context fed to the model is cropped to the last `model.cfg.max_seq_len` tokens.
    Sampling happens on the CPU: one device->host copy of the last logits row per token.
    """
    cfg = model.cfg
    if not prompt_ids:
        raise ConfigError("generate needs a non-empty prompt (at least one token id)")
    bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt token ids {bad[:5]} are outside the model's vocab [0, {cfg.vocab_size})")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-cfg.max_seq_len :]], dtype=torch.long, device=device)  # [1, s]
        logits = model(context)[0, -1].float().cpu()  # [vocab]
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if eos_id is not None and token == eos_id:
            break
        ids.append(token)
        new.append(token)
    return new
