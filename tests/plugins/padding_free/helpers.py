"""Helpers of the padding_free tests: a few samples, their per-token losses and gradients run alone and in
one packed row, and the comparison of the two."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft_plugins.plugins import padding_free

CUDA = torch.cuda.is_available()
# The GPU machine runs from a checkout (no entry points installed): the GPU tests name the module.
LOCAL = {"padding_free": padding_free}


def samples_of(tok, n=4):
    texts = ["Copy: apple river stone\napple river stone", "Add 3 and 4.\n7",
             "Reverse: green quick light north table\ntable north light quick green", "Sort: 5 3 9\n3 5 9"][:n]
    return [tok(t)["input_ids"] for t in texts]


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def alone(model, samples, device="cpu"):
    """Per-token losses of each sample run alone, and the gradients of their total."""
    model.zero_grad()
    losses = []
    for s in samples:
        ids = torch.tensor(s, device=device)
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
        losses.append(token_losses(logits, ids))
    torch.cat(losses).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return losses, grads


def packed(model, batch, samples):
    """Per-token losses of each sample in one packed row ``batch``, and the gradients of their total."""
    model.zero_grad()
    ids = batch["input_ids"][0]
    logits = model(**batch, use_cache=False).logits[0]
    cu = [0] + torch.tensor([len(s) for s in samples]).cumsum(0).tolist()
    losses = [token_losses(logits[s:e], ids[s:e]) for s, e in zip(cu[:-1], cu[1:])]
    torch.cat(losses).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return losses, grads


def assert_same(ref, got, atol=1e-5, rtol=1e-5):
    for a, b in zip(ref[0], got[0]):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], atol=atol, rtol=rtol, msg=name)


def packed_registry() -> dict[str, set[str]]:
    """Our entries (``sft_packed_*``) in transformers' process-global attention and mask registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return {reg.__name__: {k for k in reg._global_mapping if k.startswith("sft_packed")}
            for reg in (AttentionInterface, AttentionMaskInterface)}
