"""Reference solution of the decoding homework (not shipped to students)."""
import torch


def typical_filter(probs, mass):
    "Locally typical sampling (Meister et al. 2022): keep the tokens closest to the entropy until `mass` is reached."
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    logp = probs.log()
    entropy = -(probs * logp).nansum(dim=-1, keepdim=True)       # (..., 1)
    shifted = (-logp - entropy).abs()                            # (..., vocab): distance to the entropy
    sorted_s, ids = shifted.sort(dim=-1)
    cum = probs.gather(-1, ids).cumsum(dim=-1) / probs.sum(dim=-1, keepdim=True)
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    keep = shifted <= sorted_s.gather(-1, last)                  # ties at the threshold stay
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def frequency_presence_penalty(logits, previous_ids, frequency, presence):
    "OpenAI's penalties: logit - frequency * count - presence * (count > 0)."
    counts = torch.bincount(torch.as_tensor(previous_ids, dtype=torch.long), minlength=logits.shape[-1])
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def generate_typical(model, prompt_ids, max_new_tokens, mass=0.9, seed=None):
    "Decode with the KV cache, drawing each token from typical_filter(softmax(logits), mass)."
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    tokens, start_pos, out = torch.tensor([list(prompt_ids)]), 0, []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(tokens, start_pos=start_pos, last_only=True)[0, -1]
            probs = typical_filter(torch.softmax(logits.double(), dim=-1), mass)
            nxt = int(torch.multinomial(probs, 1, generator=g))
            out.append(nxt)
            start_pos += tokens.shape[1]
            tokens = torch.tensor([[nxt]])
    return out
