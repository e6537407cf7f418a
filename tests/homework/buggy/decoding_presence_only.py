"""Buggy: typical_filter keeps the tokens *farthest* from the entropy; the penalty counts each token once."""
import torch


def typical_filter(probs, mass):
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    logp = probs.log()
    entropy = -(probs * logp).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_s, ids = shifted.sort(dim=-1, descending=True)          # bug: descending
    cum = probs.gather(-1, ids).cumsum(dim=-1)
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    keep = shifted >= sorted_s.gather(-1, last)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def frequency_presence_penalty(logits, previous_ids, frequency, presence):
    out = logits.clone()
    for t in set(previous_ids):                                      # bug: counts each token once
        out[t] -= frequency + presence
    return out


def generate_typical(model, prompt_ids, max_new_tokens, mass=0.9, seed=None):
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            probs = typical_filter(torch.softmax(logits.double(), dim=-1), mass)
            ids.append(int(torch.multinomial(probs, 1, generator=g)))
    return ids[len(prompt_ids):]
