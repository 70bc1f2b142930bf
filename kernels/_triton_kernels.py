"""Triton kernel bodies for block-sparse flash attention (imported only when triton is).

The functions are left undecorated: ``triton_block_sparse`` wraps them with ``triton.jit`` (GPU) or Triton's
interpreter (``TRITON_INTERPRET=1`` semantics, CPU tensors) on first use, so one process can run both.

Forward: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", Algorithm 1) with the inner loop running only over the key blocks listed for the query block
(block-sparse FlashAttention, Dao et al. 2022, "FlashAttention", sec. 3.3). Online softmax in base 2:
``m_j = max(m_{j-1}, rowmax(S_j))``, ``l_j = 2^(m_{j-1}-m_j) l_{j-1} + rowsum(2^(S_j - m_j))``,
``O_j = 2^(m_{j-1}-m_j) O_{j-1} + 2^(S_j - m_j) V_j``; output ``O / l`` and ``LSE = m + log2 l`` (``-inf`` and a
zero output for a row with no key block).

Backward: FlashAttention-2 Algorithm 2 split in two kernels so that no atomics are needed: one program per key tile
accumulates dK, dV over the query blocks that attend it (the transposed block lists) and over the query heads of
its GQA group; one program per query tile accumulates dQ over its key blocks. With ``P = 2^(S - LSE)``,
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)``, ``delta = rowsum(dO * O)``, ``dQ = scale dS K``,
``dK = scale dS^T Q``.

``UPCAST`` turns the loaded tiles to fp32 before the dots: set for bf16 under Triton's interpreter, whose bf16
``tl.dot`` returns garbage in triton 3.7; compiled kernels keep fp16/bf16 tiles and fp32 accumulators.
"""

from __future__ import annotations

import triton.language as tl


def fwd_kernel(
    Q, K, V, O, LSE, KV_NUM, KV_IDX,
    sm_scale_log2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ik,
    H, GROUP, M, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    mb = pid_m // SUB_M

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    num = tl.load(KV_NUM + b * stride_nb + h * stride_nh + mb * stride_nm)
    idx_base = KV_IDX + b * stride_ib + h * stride_ih + mb * stride_im
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for j in range(0, num):
        kb = tl.load(idx_base + j * stride_ik)
        for s in tl.static_range(SUB_N):
            cols = (kb * SUB_N + s) * BLOCK_N + offs_n
            col_ok = cols < N
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(col_ok[None, :], qk * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_NUM, Q_IDX,
    sm_scale, sm_scale_log2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_nb, stride_nh, stride_nn,
    stride_ib, stride_ih, stride_in, stride_iq,
    H_KV, GROUP, M, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    nb = pid_n // SUB_N

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(0, GROUP):
        h = hk * GROUP + g
        num = tl.load(Q_NUM + b * stride_nb + h * stride_nh + nb * stride_nn)
        idx_base = Q_IDX + b * stride_ib + h * stride_ih + nb * stride_in
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        l_base = LSE + b * stride_lb + h * stride_lh
        d_base = DELTA + b * stride_lb + h * stride_lh
        for i in range(0, num):
            qb = tl.load(idx_base + i * stride_iq)
            for s in tl.static_range(SUB_M):
                rows = (qb * SUB_M + s) * BLOCK_M + offs_m
                row_ok = rows < M
                q_mask = row_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
                do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask,
                             other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(l_base + rows, mask=row_ok, other=0.0)
                delta = tl.load(d_base + rows, mask=row_ok, other=0.0)
                if IEEE:
                    qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    qk = tl.dot(q, tl.trans(k))
                p = tl.exp2(qk * sm_scale_log2 - lse[:, None])
                p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
                if IEEE:
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
                    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                else:
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                    dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                if IEEE:
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
                else:
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)

    dk = dk * sm_scale
    out_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


def bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_NUM, KV_IDX,
    sm_scale, sm_scale_log2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ik,
    H, GROUP, M, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    mb = pid_m // SUB_M

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    num = tl.load(KV_NUM + b * stride_nb + h * stride_nh + mb * stride_nm)
    idx_base = KV_IDX + b * stride_ib + h * stride_ih + mb * stride_im
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for j in range(0, num):
        kb = tl.load(idx_base + j * stride_ik)
        for s in tl.static_range(SUB_N):
            cols = (kb * SUB_N + s) * BLOCK_N + offs_n
            col_ok = cols < N
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
                dp = tl.dot(do, tl.trans(v))
            p = tl.exp2(qk * sm_scale_log2 - lse[:, None])
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
            ds = p * (dp - delta[:, None])
            if IEEE:
                dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(k.dtype), k)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)
