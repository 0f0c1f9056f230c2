"""Pure-torch twin of ``_triton_ce.ce_rows_triton`` (CPU without ``TRITON_INTERPRET``, or forced).

Same contract: fill per-token loss / entropy / top-1 at ``rows`` and, if asked, overwrite the logits
chunk in place with d(loss_row)/d(logits) (with ``rfac_out``: up to a per-row factor, written there).
Works in fp32 on a copy of the chunk (the chunk size is planned with these temporaries counted, see
``_function._plan_chunk_rows``).
"""

from __future__ import annotations

import torch


def ce_rows_torch(
    logits: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    loss_out: torch.Tensor,
    ent_out: torch.Tensor | None,
    top1_out: torch.Tensor | None,
    *,
    grad_scale: float,
    scale_t: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
    smoothing: float,
    write_grad: bool,
    rfac_out: torch.Tensor | None = None,
) -> None:
    C, V = logits.shape
    if C == 0:
        return
    z = logits.float()
    if bias is not None:
        z = z + bias.float()
    z = z * logit_scale
    th = None
    if softcap:
        th = torch.tanh(z / softcap)
        z = softcap * th
    lse = torch.logsumexp(z, dim=-1)
    y = labels.index_select(0, rows).long()
    zy = z.gather(1, y[:, None]).squeeze(1)
    if smoothing:
        loss = lse - (1.0 - smoothing) * zy - smoothing * z.mean(-1)
    else:
        loss = lse - zy
    loss_out.index_copy_(0, rows, loss)
    p = torch.exp(z - lse[:, None])
    if ent_out is not None and top1_out is not None:
        ent_out.index_copy_(0, rows, lse - (p * z).sum(-1))
        # same rule as the Triton kernel: a tie with the max counts as a hit
        top1_out.index_copy_(0, rows, (zy >= z.amax(-1)).to(top1_out.dtype))
    if write_grad and rfac_out is not None:
        # the Triton one-pass contract: exp(z - max) * dz/dx with the label's entry (e_y - sum) * dz/dx,
        # and g / sum per row in rfac_out
        e = torch.exp(z - z.amax(-1, keepdim=True))
        s = e.sum(-1)
        e.scatter_add_(1, y[:, None], -s[:, None])
        if th is not None:
            e *= 1.0 - th * th
        g = torch.full_like(s, logit_scale * grad_scale)
        if scale_t is not None:
            g *= scale_t.float()
        if row_scale is not None:
            g *= row_scale.index_select(0, rows).float()
        rfac_out.copy_(g / s)
        logits.copy_(e)
    elif write_grad:
        d = p
        if smoothing:
            d -= smoothing / V
        d.scatter_add_(1, y[:, None], torch.full_like(zy[:, None], -(1.0 - smoothing)))
        if th is not None:
            d *= 1.0 - th * th
        d *= logit_scale * grad_scale
        if scale_t is not None:
            d *= scale_t.float()
        if row_scale is not None:
            d *= row_scale.index_select(0, rows).float()[:, None]
        logits.copy_(d)
