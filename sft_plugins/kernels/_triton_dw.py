"""Triton GEMM for the trainable head's weight gradient: dW[V, H] += G[C, V]^T @ Hs[C, H].

Why not cuBLAS's ``addmm_``: per chunk the K dimension is only the chunk's C rows (~500 at a 256k
vocabulary within the 256 MiB workspace), so each output tile does little math per byte of dW it reads
and writes. cuBLAS reads C in the epilogue, after the main loop, and on the H200 that GEMM took 1.29 ms
where the logits GEMM of the same FLOPs took 0.82 (benchmarks/notes_fused_ce.md). Here the dW tile is
loaded before the main loop (PREFETCH_C), so its latency hides behind the K loop, and several CTAs per
SM overlap one tile's epilogue with another's main loop.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class DWConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    prefetch_c: bool


# chosen on the H200 (benchmarks/results/fused_ce_dw_probe_h200.json); SFT_PLUGINS_CE_DW_CONFIG overrides
DEFAULT_CONFIG = DWConfig(128, 128, 64, 8, 4, 4, True)


@triton.jit
def _dw_addmm_kernel(
    g_ptr,  # [K, M]: the chunk's d(logits), K = chunk rows, M = vocab (contiguous)
    h_ptr,  # [K, N]: the chunk's hidden rows (already scaled by the row factor)
    c_ptr,  # [M, N]: dW, accumulated in place
    M,
    N,
    K,
    stride_gk,
    stride_hk,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PREFETCH_C: tl.constexpr,
    EVEN_MN: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: the GROUP_M row blocks of G in flight share Hs (small, L2-resident) and are read
    # from HBM once while their N tiles run
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + offs_k[None, :].to(tl.int64) * stride_gk + offs_m[:, None]  # G^T tile [BM, BK]
    h_ptrs = h_ptr + offs_k[:, None].to(tl.int64) * stride_hk + offs_n[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    if PREFETCH_C:  # issued now, consumed after the K loop
        if EVEN_MN:
            c = tl.load(c_ptrs)
        else:
            c = tl.load(c_ptrs, mask=m_ok & n_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_MN:
            a = tl.load(g_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(h_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        else:
            a = tl.load(g_ptrs, mask=(offs_k[None, :] < k_left) & m_ok, other=0.0)
            b = tl.load(h_ptrs, mask=(offs_k[:, None] < k_left) & n_ok, other=0.0)
        if DOT_FP32:  # the interpreter multiplies bf16 wrongly (numpy has no bf16)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        g_ptrs += BLOCK_K * stride_gk
        h_ptrs += BLOCK_K * stride_hk
    if not PREFETCH_C:
        if EVEN_MN:
            c = tl.load(c_ptrs)
        else:
            c = tl.load(c_ptrs, mask=m_ok & n_ok, other=0.0)
    acc += c.to(tl.float32)
    if EVEN_MN:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok & n_ok)


def _config() -> DWConfig:
    env = os.environ.get("SFT_PLUGINS_CE_DW_CONFIG")
    if not env:
        return DEFAULT_CONFIG
    vals = [int(v) for v in env.split(",")]
    return DWConfig(*vals[:6], bool(vals[6]))


def dw_addmm_triton(dw: torch.Tensor, g: torch.Tensor, hs: torch.Tensor, config: DWConfig | None = None) -> None:
    """dw += g^T @ hs, in place: g [K, M] and hs [K, N] with unit inner stride, dw [M, N] contiguous;
    fp32 accumulation over K, one rounding to dw's dtype per call."""
    K, M = g.shape
    N = hs.shape[1]
    assert hs.shape[0] == K and dw.shape == (M, N) and dw.is_contiguous()
    assert g.stride(1) == 1 and hs.stride(1) == 1
    if K == 0:
        return
    cfg = config or _config()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret:  # fewer, cheaper programs
        cfg = DWConfig(32, 32, 16, 1, 1, 1, cfg.prefetch_c)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _dw_addmm_kernel[grid](
        g, hs, dw, M, N, K, g.stride(0), hs.stride(0), dw.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        PREFETCH_C=cfg.prefetch_c, EVEN_MN=M % cfg.block_m == 0 and N % cfg.block_n == 0, DOT_FP32=interpret,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
