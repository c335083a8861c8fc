"""Fused scaled-dot-product attention in Triton: the CUDA kernels of
torch.ops.fastnlp.attention_forward / attention_backward / attention_dropout_mask.

Same contract as the CPU kernel (csrc/cpu/attention.cpp, schemas in
csrc/ops.cpp): query (B, H, Lq, D), key (B, Hk, Lk, D), value (B, Hk, Lk, Dv),
head h reads kv-head h // (H // Hk); attn_mask bool (True = take part) or
additive float in the accumulation dtype, expanded to (B, H, Lq, Lk) with
stride 0 where it broadcasts; key_padding_mask bool (B, Lk), True = real key;
upper-left causal. lse (B, H, Lq) is float32 (float64 for float64 inputs) and
-inf for a row that sees no key, whose output and gradient are 0.

Forward: one program per (query block, batch * head) walks the key blocks with
an online softmax in base 2. Backward: delta = rowsum(dO * O) first, then one
program per (key block, batch * kv-head) accumulates dK and dV over the query
heads of its group and the query blocks (no atomics), and one program per
(query block, batch * head) accumulates dQ; both recompute the probabilities
from lse. Everything is deterministic.

Skipping: the key loop ends at the causal diagonal and at the batch's last real
key (a per-batch bound computed before the launch); a key block that is all
padding, or whose attn_mask tile hides every entry, is skipped before its keys
and values are loaded (a reduction over the mask tile, only compiled in when
there is such a mask).

Dropout reproduces the CPU kernel's Philox4x32-10 stream bit for bit: the draw
for (b, h, i, j) is word j % 4 of Philox((j / 4, i, b * H + h, offset), seed),
kept when its top 24 bits are >= p * 2^24. So forward, backward and the
dense mask of attention_dropout_mask agree on every device.
"""

import contextlib
import re
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# Kernels.


@triton.jit
def _philox_keep(k0, k1, offset, bh, rows, col0, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N] for query rows `rows` and keys col0 .. col0 + BLOCK_N (col0 % 4 == 0)."""
    QUARTER: tl.constexpr = BLOCK_N // 4
    # k0, k1 and offset come as int32 bit patterns (a uint32 argument would be typed int64).
    zero = tl.zeros([BLOCK_M, QUARTER], dtype=tl.int32)
    c0 = (zero + (col0 // 4 + tl.arange(0, QUARTER))[None, :]).to(tl.uint32, bitcast=True)
    c1 = (zero + rows[:, None]).to(tl.uint32, bitcast=True)
    c2 = (zero + bh).to(tl.uint32, bitcast=True)
    c3 = (zero + offset).to(tl.uint32, bitcast=True)
    key0 = (zero + k0).to(tl.uint32, bitcast=True)
    key1 = (zero + k1).to(tl.uint32, bitcast=True)
    MUL0: tl.constexpr = 0xD2511F53
    MUL1: tl.constexpr = 0xCD9E8D57
    BUMP0: tl.constexpr = 0x9E3779B9
    BUMP1: tl.constexpr = 0xBB67AE85
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, MUL0)
        lo0 = c0 * MUL0
        hi1 = tl.umulhi(c2, MUL1)
        lo1 = c2 * MUL1
        c0 = hi1 ^ c1 ^ key0
        c1 = lo1
        c2 = hi0 ^ c3 ^ key1
        c3 = lo0
        key0 = key0 + BUMP0
        key1 = key1 + BUMP1
    # Interleave the four words so that column j takes word j % 4.
    words = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK_M, BLOCK_N])
    return (words >> 8).to(tl.int32) >= threshold


@triton.jit
def _visible(offs_m, offs_n, b, h, Lq, Lk, MASK, smb, smh, smm, smn, KPM, skpb, skpn,
             HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL_TILE: tl.constexpr):
    """Which entries of the (offs_m, offs_n) tile take part, the key-wise part of
    it, and the additive mask (0 when there is none)."""
    key_ok = offs_n < Lk
    if HAS_KPM:
        real = tl.load(KPM + b.to(tl.int64) * skpb + offs_n * skpn, mask=key_ok, other=0)
        key_ok = key_ok & (real != 0)
    visible = (offs_m < Lq)[:, None] & key_ok[None, :]
    bias = 0.0
    if HAS_MASK:
        ptrs = MASK + b.to(tl.int64) * smb + h.to(tl.int64) * smh + offs_m[:, None] * smm + offs_n[None, :] * smn
        if MASK_BOOL:
            take = tl.load(ptrs, mask=visible, other=0)
            visible = visible & (take != 0)
        else:
            bias = tl.load(ptrs, mask=visible, other=0.0)
            visible = visible & (bias != float("-inf"))
    if CAUSAL_TILE:
        visible = visible & (offs_m[:, None] >= offs_n[None, :])
    return visible, key_ok, bias


@triton.jit
def _tile_is_live(visible, key_ok, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr):
    """Whether any entry of a tile takes part (a dead tile is skipped unread)."""
    if HAS_MASK:
        return tl.max(visible.to(tl.int32)) > 0
    elif HAS_KPM:  # then the key-wise mask says it all, and is cheaper to reduce
        return tl.max(key_ok.to(tl.int32), 0) > 0
    else:
        return True


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, start_n, offs_m, b, h, bh, K, V, skn, skd, svn, svd, Lq, Lk, D, DV,
              MASK, smb, smh, smm, smn, KPM, skpb, skpn, qk_scale, k0, k1, rng_offset, threshold, COUNTER,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL_TILE: tl.constexpr,
              DROPOUT: tl.constexpr, COUNT_TILES: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    visible, key_ok, bias = _visible(offs_m, offs_n, b, h, Lq, Lk, MASK, smb, smh, smm, smn, KPM, skpb, skpn,
                                     HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL_TILE)
    if _tile_is_live(visible, key_ok, HAS_MASK, HAS_KPM):
        if COUNT_TILES:
            tl.atomic_add(COUNTER, 1)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        # Padding keys are not loaded at all: whatever they hold (NaN) cannot reach the output.
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=key_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK and not MASK_BOOL:
            s = s + bias * 1.4426950408889634
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays at 0
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _philox_keep(k0, k1, rng_offset, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=key_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["k0", "k1", "rng_offset", "threshold"])
def _attn_fwd(Q, K, V, O, LSE, MASK, KPM, KV_END, COUNTER,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              smb, smh, smm, smn, skpb, skpn,
              H, GROUP, Lq, Lk, D, DV, qk_hi, qk_lo, k0, k1, rng_offset, threshold, ik_hi, ik_lo,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
              DROPOUT: tl.constexpr, COUNT_TILES: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    K += b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :], other=0.0)
    acc_dtype: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    # Float arguments arrive as float32: the scales come as hi + lo pairs so float64 inputs keep their precision.
    qk_scale = tl.zeros([1], dtype=acc_dtype) + qk_hi + qk_lo
    inv_keep = tl.zeros([1], dtype=acc_dtype) + ik_hi + ik_lo
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    l_i = tl.zeros([BLOCK_M], dtype=acc_dtype)

    hi = Lk
    if HAS_KPM:
        hi = tl.minimum(hi, tl.load(KV_END + b))
    # Key blocks below `diag` are visible to every row of this block under causality.
    diag = hi
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.minimum((pid_m + 1) * BLOCK_M, Lq))
        diag = tl.minimum(hi, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
    for start_n in range(0, diag, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start_n, offs_m, b, h, bh, K, V, skn, skd, svn, svd, Lq, Lk,
                                  D, DV, MASK, smb, smh, smm, smn, KPM, skpb, skpn, qk_scale, k0, k1, rng_offset,
                                  threshold, COUNTER, HAS_MASK, MASK_BOOL, HAS_KPM, False, DROPOUT, COUNT_TILES,
                                  PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    if IS_CAUSAL:
        for start_n in range(diag, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start_n, offs_m, b, h, bh, K, V, skn, skd, svn, svd, Lq,
                                      Lk, D, DV, MASK, smb, smh, smm, smn, KPM, skpb, skpn, qk_scale, k0, k1,
                                      rng_offset, threshold, COUNTER, HAS_MASK, MASK_BOOL, HAS_KPM, True, DROPOUT,
                                      COUNT_TILES, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)

    seen = m_i != float("-inf")
    norm = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    if DROPOUT:
        norm = norm * inv_keep
    out = acc * norm[:, None]
    O += b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(O + offs_m[:, None] * som + offs_dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=(offs_m < Lq)[:, None] & (offs_dv < DV)[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Lq, DV,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (offs_m < Lq)[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                mask=inside, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=inside, other=0.0)
    acc_dtype: tl.constexpr = tl.float64 if O.dtype.element_ty == tl.float64 else tl.float32
    delta = tl.sum(o.to(acc_dtype) * do.to(acc_dtype), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _load_lse2(LSE, bh, offs_m, Lq):
    """lse in base 2, +inf for rows that saw no key (so every exp2(s - lse) is 0)."""
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit(do_not_specialize=["k0", "k1", "rng_offset", "threshold"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_, MASK, KPM, KV_END,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                   sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smm, smn, skpb, skpn,
                   H, Hk, GROUP, Lq, Lk, D, DV, qk_hi, qk_lo, k0, k1, rng_offset, threshold, ik_hi, ik_lo,
                   HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc_dtype: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    # Float arguments arrive as float32: the scales come as hi + lo pairs so float64 inputs keep their precision.
    qk_scale = tl.zeros([1], dtype=acc_dtype) + qk_hi + qk_lo
    inv_keep = tl.zeros([1], dtype=acc_dtype) + ik_hi + ik_lo
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=acc_dtype)

    end = Lk
    if HAS_KPM:
        end = tl.minimum(end, tl.load(KV_END + b))
    key_ok = offs_n < end
    if HAS_KPM:
        real = tl.load(KPM + b.to(tl.int64) * skpb + offs_n * skpn, mask=key_ok, other=0)
        key_ok = key_ok & (real != 0)
    # A block of padding keys (or past the last real key) gets zero gradients without a look at q, k or v.
    if tl.max(key_ok.to(tl.int32)) > 0:
        kbase = b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        vbase = b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        k = tl.load(K + kbase + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=key_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(V + vbase + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=key_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        m_lo = 0
        if IS_CAUSAL:
            m_lo = start_n // BLOCK_M * BLOCK_M  # earlier queries see none of these keys
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bh = b * H + h
            qbase = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
            dobase = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
            for start_m in range(m_lo, Lq, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                visible, _, bias = _visible(offs_m, offs_n, b, h, Lq, Lk, MASK, smb, smh, smm, smn, KPM, skpb,
                                            skpn, HAS_MASK, MASK_BOOL, HAS_KPM, IS_CAUSAL)
                live = True
                if HAS_MASK:
                    live = tl.max(visible.to(tl.int32)) > 0
                if live:
                    q = tl.load(Q + qbase + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                                mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :], other=0.0)
                    do = tl.load(DO + dobase + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                                 mask=(offs_m < Lq)[:, None] & (offs_dv < DV)[None, :], other=0.0)
                    lse2 = _load_lse2(LSE, bh, offs_m, Lq)
                    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                    if HAS_MASK and not MASK_BOOL:
                        s = s + bias * 1.4426950408889634
                    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
                    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                    if DROPOUT:
                        keep = _philox_keep(k0, k1, rng_offset, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N)
                        p_kept = tl.where(keep, p * inv_keep, 0.0)
                        dp = tl.where(keep, dp * inv_keep, 0.0)
                    else:
                        p_kept = p
                    dv = tl.dot(tl.trans(p_kept.to(do.dtype)), do, dv, input_precision=PRECISION)
                    ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
                    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
        dk = dk * (qk_scale * 0.6931471805599453)
        # Padding keys' gradients are 0 outright: ds is 0 in their columns,
        # but a NaN in a query row (one that sees no key) would still make
        # ds^T q NaN there.
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    inside = offs_n < Lk
    tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=inside[:, None] & (offs_d < D)[None, :])
    tl.store(DV_ + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=inside[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _bwd_dq_tile(dq, q, do, lse2, delta, start_n, offs_m, b, h, bh, K, V, skn, skd, svn, svd, Lq, Lk, D, DV,
                 MASK, smb, smh, smm, smn, KPM, skpb, skpn, qk_scale, k0, k1, rng_offset, threshold, inv_keep,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL_TILE: tl.constexpr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    visible, key_ok, bias = _visible(offs_m, offs_n, b, h, Lq, Lk, MASK, smb, smh, smm, smn, KPM, skpb, skpn,
                                     HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL_TILE)
    if _tile_is_live(visible, key_ok, HAS_MASK, HAS_KPM):
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=key_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=key_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK and not MASK_BOOL:
            s = s + bias * 1.4426950408889634
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _philox_keep(k0, k1, rng_offset, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["k0", "k1", "rng_offset", "threshold"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, MASK, KPM, KV_END,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                 sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn, skpb, skpn,
                 H, GROUP, Lq, Lk, D, DV, qk_hi, qk_lo, k0, k1, rng_offset, threshold, ik_hi, ik_lo,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=row_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse2 = _load_lse2(LSE, bh, offs_m, Lq)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    acc_dtype: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    # Float arguments arrive as float32: the scales come as hi + lo pairs so float64 inputs keep their precision.
    qk_scale = tl.zeros([1], dtype=acc_dtype) + qk_hi + qk_lo
    inv_keep = tl.zeros([1], dtype=acc_dtype) + ik_hi + ik_lo
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)
    K += b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + hk.to(tl.int64) * svh

    hi = Lk
    if HAS_KPM:
        hi = tl.minimum(hi, tl.load(KV_END + b))
    diag = hi
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.minimum((pid_m + 1) * BLOCK_M, Lq))
        diag = tl.minimum(hi, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
    for start_n in range(0, diag, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, start_n, offs_m, b, h, bh, K, V, skn, skd, svn, svd, Lq, Lk, D,
                          DV, MASK, smb, smh, smm, smn, KPM, skpb, skpn, qk_scale, k0, k1, rng_offset, threshold,
                          inv_keep, HAS_MASK, MASK_BOOL, HAS_KPM, False, DROPOUT, PRECISION,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    if IS_CAUSAL:
        for start_n in range(diag, hi, BLOCK_N):
            dq = _bwd_dq_tile(dq, q, do, lse2, delta, start_n, offs_m, b, h, bh, K, V, skn, skd, svn, svd, Lq, Lk,
                              D, DV, MASK, smb, smh, smm, smn, KPM, skpb, skpn, qk_scale, k0, k1, rng_offset,
                              threshold, inv_keep, HAS_MASK, MASK_BOOL, HAS_KPM, True, DROPOUT, PRECISION,
                              BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    dq = dq * (qk_scale * 0.6931471805599453)
    tl.store(DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


@triton.jit(do_not_specialize=["k0", "k1", "rng_offset", "threshold"])
def _dropout_mask_kernel(KEEP, Lq, Lk, k0, k1, rng_offset, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _philox_keep(k0, k1, rng_offset, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N)
        tl.store(KEEP + (bh.to(tl.int64) * Lq + offs_m[:, None]) * Lk + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


# ---------------------------------------------------------------------------
# Launchers: plain functions of tensors, usable on CUDA tensors or, under
# TRITON_INTERPRET=1, on CPU tensors.


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _blocks(kernel: str, head_dim: int, blocks: Optional[Tuple[int, int]]):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for H100-class GPUs; `blocks` overrides the tile (tests)."""
    if kernel == "fwd":
        table = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)}
    elif kernel == "dkdv":
        table = {64: (32, 64, 4, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)}
    else:  # dq
        table = {64: (64, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 32, 8, 1)}
    config = table[64 if head_dim <= 64 else 128 if head_dim <= 128 else 256]
    if blocks is not None:
        config = (blocks[0], blocks[1], 4, 1)
    return config


def _int32(x: int) -> int:
    """The low 32 bits of x as a signed int32 (the kernels bitcast them back to uint32)."""
    x &= 0xFFFFFFFF
    return x - 2**32 if x >= 2**31 else x


def _split(x: float) -> Tuple[float, float]:
    """x as float32 hi + lo, the kernels' float arguments being float32."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get float32 products unless the user allowed TF32 for matmuls, as torch does.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


class _Masks:
    """The masks as kernel arguments: a pointer (a dummy when absent), strides and flags."""

    def __init__(self, query: Tensor, key: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor]):
        B, H, Lq, _ = query.shape
        Lk = key.shape[2]
        self.has_mask = attn_mask is not None
        self.mask_bool = self.has_mask and attn_mask.dtype == torch.bool
        if self.has_mask:
            if tuple(attn_mask.shape) != (B, H, Lq, Lk):
                raise RuntimeError(f"attn_mask must be expanded to (B, H, Lq, Lk) = {(B, H, Lq, Lk)}, "
                                   f"got {tuple(attn_mask.shape)}")
            acc = torch.float64 if query.dtype == torch.float64 else torch.float32
            if not self.mask_bool and attn_mask.dtype != acc:
                raise RuntimeError(f"a float attn_mask must be {acc} for {query.dtype} inputs, got {attn_mask.dtype}")
            self.mask = attn_mask.view(torch.uint8) if self.mask_bool else attn_mask
            self.mask_strides = tuple(attn_mask.stride())
        else:
            self.mask, self.mask_strides = query, (0, 0, 0, 0)
        self.has_kpm = key_padding_mask is not None
        if self.has_kpm:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Lk):
                raise RuntimeError(f"key_padding_mask must be bool (B, Lk) = {(B, Lk)}, got "
                                   f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
            self.kpm = key_padding_mask.view(torch.uint8)
            self.kpm_strides = tuple(key_padding_mask.stride())
            # One past each batch's last real key: the key loops stop there.
            positions = torch.arange(1, Lk + 1, device=key_padding_mask.device, dtype=torch.int32)
            self.kv_end = torch.where(key_padding_mask, positions, 0).amax(dim=1).to(torch.int32) if Lk else \
                torch.zeros(B, dtype=torch.int32, device=key_padding_mask.device)
        else:
            self.kpm, self.kpm_strides, self.kv_end = query, (0, 0), query


class _Dropout:
    """The CPU kernel's Philox key, counter word and threshold, from rng_state (seed, offset)."""

    def __init__(self, dropout_p: float, rng_state: Optional[Tensor]):
        self.enabled = dropout_p > 0
        self.k0 = self.k1 = self.offset = self.threshold = 0
        self.inv_keep = 1.0
        if not self.enabled:
            return
        if not 0 < dropout_p < 1:
            raise RuntimeError(f"dropout_p must be in [0, 1), got {dropout_p}")
        if rng_state is None:
            raise RuntimeError("dropout_p > 0 needs rng_state (int64 tensor (seed, offset))")
        if rng_state.dtype != torch.int64 or rng_state.numel() != 2:
            raise RuntimeError(f"rng_state must be an int64 tensor of 2 elements (seed, offset), got "
                               f"{rng_state.dtype} {tuple(rng_state.shape)}")
        seed, offset = (v % 2**64 for v in rng_state.tolist())
        self.k0, self.k1, self.offset = (_int32(x) for x in (seed, seed >> 32, offset))
        self.threshold = int(min(dropout_p * 16777216.0, 16777216.0))
        self.inv_keep = 1.0 / (1.0 - dropout_p)


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


TRITON_RELEASE = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
# The kernels' float64 tl.dot compiles for the GPU from Triton 3.9 on
# (checked by compiling for sm_90): 3.1 (torch 2.5's) refuses float64
# operands, and 3.6 to 3.8 (3.6 is torch 2.11's) fail to compile it.
FLOAT64_DOT = TRITON_RELEASE >= (3, 9)


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise RuntimeError(f"query, key and value must be 4-D, got {tuple(query.shape)}, {tuple(key.shape)} "
                           f"and {tuple(value.shape)}")
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        raise RuntimeError(f"batch sizes differ: {tuple(query.shape)} {tuple(key.shape)} {tuple(value.shape)}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0 or value.shape[1] != key.shape[1]:
        raise RuntimeError(f"query heads must be a multiple of key/value heads, got {query.shape[1]} and "
                           f"{key.shape[1]}, {value.shape[1]}")
    if key.shape[2] != value.shape[2] or key.shape[3] != query.shape[3]:
        raise RuntimeError(f"key must be (B, Hk, Lk, D) and value (B, Hk, Lk, Dv) for query (B, H, Lq, D), got "
                           f"{tuple(query.shape)} {tuple(key.shape)} {tuple(value.shape)}")
    if query.shape[3] > 256 or value.shape[3] > 256:
        raise RuntimeError(f"head dims up to 256 are supported, got {query.shape[3]} and {value.shape[3]}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if query.dtype == torch.float64 and not FLOAT64_DOT:
        raise TypeError(f"fastnlp attention: float64 needs Triton >= 3.9 (its Triton kernels, the GPU path), found "
                        f"{triton.__version__}: use float32, or backend='reference'")


def attention_forward(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                      key_padding_mask: Optional[Tensor], is_causal: bool, dropout_p: float, scale: float,
                      rng_state: Optional[Tensor], *, blocks: Optional[Tuple[int, int]] = None,
                      tile_counter: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out, lse); `blocks` = (BLOCK_M, BLOCK_N) overrides the tile shape, and
    `tile_counter` (int32, 1 element) counts the key tiles actually computed."""
    _check_qkv(query, key, value)
    B, H, Lq, DV = query.shape[0], query.shape[1], query.shape[2], value.shape[3]
    masks = _Masks(query, key, attn_mask, key_padding_mask)
    drop = _Dropout(dropout_p, rng_state)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = torch.empty((B, H, Lq, DV), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, H, Lq), dtype=acc, device=query.device)
    if B * H * Lq == 0:
        return out, lse
    with _on_device(query):
        _launch_forward(query, key, value, out, lse, masks, drop, is_causal, scale, blocks, tile_counter)
    return out, lse


def _launch_forward(query, key, value, out, lse, masks, drop, is_causal, scale, blocks, tile_counter):
    B, H, Lq, D = query.shape
    Hk, Lk, DV = key.shape[1], key.shape[2], value.shape[3]
    block_m, block_n, warps, stages = _blocks("fwd", max(D, DV), blocks)
    grid = (triton.cdiv(Lq, block_m), B * H)
    _attn_fwd[grid](
        query, key, value, out, lse, masks.mask, masks.kpm, masks.kv_end,
        tile_counter if tile_counter is not None else lse,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *masks.mask_strides, *masks.kpm_strides,
        H, H // Hk, Lq, Lk, D, DV, *_split(scale * LOG2E), drop.k0, drop.k1, drop.offset, drop.threshold,
        *_split(drop.inv_keep),
        HAS_MASK=masks.has_mask, MASK_BOOL=masks.mask_bool, HAS_KPM=masks.has_kpm, IS_CAUSAL=bool(is_causal),
        DROPOUT=drop.enabled, COUNT_TILES=tile_counter is not None, PRECISION=_precision(query.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), num_warps=warps, num_stages=stages)


def attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                       attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool,
                       dropout_p: float, scale: float, rng_state: Optional[Tensor], *,
                       blocks: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_query, grad_key, grad_value)."""
    _check_qkv(query, key, value)
    B, H, Lq, _ = query.shape
    Hk, Lk, DV = key.shape[1], key.shape[2], value.shape[3]
    if tuple(grad_out.shape) != (B, H, Lq, DV) or tuple(out.shape) != (B, H, Lq, DV):
        raise RuntimeError(f"grad_out and out must be {(B, H, Lq, DV)}, got {tuple(grad_out.shape)} and "
                           f"{tuple(out.shape)}")
    if tuple(lse.shape) != (B, H, Lq):
        raise RuntimeError(f"lse must be {(B, H, Lq)}, got {tuple(lse.shape)}")
    masks = _Masks(query, key, attn_mask, key_padding_mask)
    drop = _Dropout(dropout_p, rng_state)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    grad_out = grad_out.to(query.dtype)
    out = out.to(query.dtype)
    lse = lse.to(acc).contiguous()
    grad_query = torch.empty_like(query, memory_format=torch.contiguous_format)
    grad_key = torch.empty_like(key, memory_format=torch.contiguous_format)
    grad_value = torch.empty_like(value, memory_format=torch.contiguous_format)
    if B * Hk * Lk == 0 or Lq == 0:
        grad_key.zero_(), grad_value.zero_()
        return grad_query.zero_(), grad_key, grad_value
    with _on_device(query):
        _launch_backward(grad_out, query, key, value, out, lse, grad_query, grad_key, grad_value, masks, drop,
                         is_causal, scale, blocks)
    return grad_query, grad_key, grad_value


def _launch_backward(grad_out, query, key, value, out, lse, grad_query, grad_key, grad_value, masks, drop,
                     is_causal, scale, blocks):
    B, H, Lq, D = query.shape
    Hk, Lk, DV = key.shape[1], key.shape[2], value.shape[3]
    acc = lse.dtype
    common = dict(HAS_MASK=masks.has_mask, MASK_BOOL=masks.mask_bool, HAS_KPM=masks.has_kpm,
                  IS_CAUSAL=bool(is_causal), DROPOUT=drop.enabled, PRECISION=_precision(query.dtype),
                  BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    scalars = (*_split(scale * LOG2E), drop.k0, drop.k1, drop.offset, drop.threshold, *_split(drop.inv_keep))

    delta = torch.empty((B, H, Lq), dtype=acc, device=query.device)
    delta_rows = 64 if blocks is None else blocks[0]
    _attn_bwd_delta[(triton.cdiv(Lq, delta_rows), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Lq, DV, BLOCK_M=delta_rows,
        BLOCK_DV=_pow2(DV))

    block_m, block_n, warps, stages = _blocks("dkdv", max(D, DV), blocks)
    _attn_bwd_dkdv[(triton.cdiv(Lk, block_n), B * Hk)](
        query, key, value, grad_out, lse, delta, grad_key, grad_value, masks.mask, masks.kpm, masks.kv_end,
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *grad_key.stride(),
        *grad_value.stride(), *masks.mask_strides, *masks.kpm_strides,
        H, Hk, H // Hk, Lq, Lk, D, DV, *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)

    block_m, block_n, warps, stages = _blocks("dq", max(D, DV), blocks)
    _attn_bwd_dq[(triton.cdiv(Lq, block_m), B * H)](
        query, key, value, grad_out, lse, delta, grad_query, masks.mask, masks.kpm, masks.kv_end,
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *grad_query.stride(),
        *masks.mask_strides, *masks.kpm_strides,
        H, H // Hk, Lq, Lk, D, DV, *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)


def attention_dropout_mask(query: Tensor, key: Tensor, dropout_p: float, rng_state: Tensor) -> Tensor:
    """The dense keep-mask (B, H, Lq, Lk) the kernels draw for this rng_state."""
    B, H, Lq = query.shape[:3]
    Lk = key.shape[2]
    keep = torch.ones((B, H, Lq, Lk), dtype=torch.bool, device=query.device)
    drop = _Dropout(dropout_p, rng_state)
    if not drop.enabled or keep.numel() == 0:
        return keep
    with _on_device(query):
        _dropout_mask_kernel[(triton.cdiv(Lq, 32), B * H)](
            keep.view(torch.int8), Lq, Lk, drop.k0, drop.k1, drop.offset, drop.threshold, BLOCK_M=32, BLOCK_N=64)
    return keep
