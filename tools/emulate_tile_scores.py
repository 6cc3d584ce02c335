"""CPU emulation of the decode step's per-tile block scores (csrc/kernels/decode_kernel.cuh:
tile_block_scores in kernel 1, the tile loop of decode_select_kernel): the index arithmetic of
both sides in integers, the arithmetic in float64, against the direct sum of §1.3,
S[j] = sum_h sum_i overlap(i, j) exp(s_hi - lse_h). Run: python tools/emulate_tile_scores.py"""
import itertools
import math
import random

TILE = 32


def tile_blocks(a, b):  # decode.h: decode_tile_blocks
    return (TILE - 2 + a) // b + 2


def tokens_of_block(j, l, d, lp):  # decode_kernel.cuh: tokens_of_block
    num = j * lp - l + 1
    first = 0 if num <= 0 else (num + d - 1) // d
    last = ((j + 1) * lp - 1) // d
    return first, last


def overlap_units(i, j, a, b):
    return max(0, min(i + a, (j + 1) * b) - max(i, j * b))


def run_case(l, d, lp, nvis, G, splits, warps, rng):
    a, b = l // d, lp // d
    chunk = -(-max(nvis, 1) // splits)
    chunk = -(-chunk // TILE) * TILE
    tiles = splits * chunk // TILE
    nbt = tile_blocks(a, b)
    s = [[rng.gauss(0, 3) for _ in range(nvis)] for _ in range(G)]
    # kernel 1: per split, warp w takes tiles w, w + warps, ...; running max per (warp, head)
    bs = {}
    for sp in range(splits):
        c0, c_end = sp * chunk, min(sp * chunk + chunk, nvis)
        for w in range(warps):
            m_run = [-math.inf] * G
            for it in range(w, chunk // TILE, warps):
                s0 = c0 + it * TILE
                if s0 >= c_end:
                    continue
                k = s0 // TILE
                for h in range(G):
                    vals = [s[h][i] for i in range(s0, min(s0 + TILE, c_end))]
                    m_run[h] = max(m_run[h], max(vals))
                    x = [math.exp(s[h][i] - m_run[h]) if i < c_end else 0.0 for i in range(s0, s0 + TILE)]
                    jfirst = s0 // b
                    for jj in range(nbt):
                        j_lo = (jfirst + jj) * b
                        j_hi = j_lo + b
                        i_lo, i_hi = max(j_lo - a + 1, s0), min(j_hi - 1, s0 + TILE - 1)
                        acc = 0.0
                        for i in range(i_lo, i_hi + 1):
                            acc += (min(i + a, j_hi) - max(i, j_lo)) * x[i - s0]
                        bs[(k, h, jj)] = acc
                    bs[(k, h, nbt)] = m_run[h]
    assert all(key[0] < tiles for key in bs)
    # lse per head (kernel 2 merges the split partials; here directly)
    M = [max(row) for row in s]
    L = [sum(math.exp(v - M[h]) for v in s[h]) for h, row in enumerate(s)]
    nv = 10 ** 9  # every block whose tokens are visible
    got, want = {}, {}
    jmax = (nvis - 1) * d // lp + 2
    for j in range(min(jmax, nv)):
        i_lo, i_hi = tokens_of_block(j, l, d, lp)
        i_hi = min(i_hi, nvis - 1)
        acc = 0.0
        if i_lo <= i_hi:
            for k in range(i_lo // TILE, i_hi // TILE + 1):
                slot = j - (k * TILE) // b
                assert 0 <= slot < nbt, (l, d, lp, j, k, slot, nbt)
                for h in range(G):
                    wgt = math.exp(bs[(k, h, nbt)] - M[h]) / L[h]
                    acc += bs[(k, h, slot)] * wgt
        got[j] = acc
        want[j] = sum(overlap_units(i, j, a, b) * math.exp(s[h][i] - M[h]) / L[h]
                      for h in range(G) for i in range(nvis))
    for j in got:
        assert abs(got[j] - want[j]) <= 1e-9 * max(1.0, abs(want[j])), (l, d, lp, nvis, j, got[j], want[j])


def main():
    rng = random.Random(0)
    n = 0
    for (l, d, lp) in [(32, 16, 64), (16, 16, 16), (32, 32, 32), (64, 16, 32), (128, 16, 64), (32, 8, 128),
                       (48, 16, 16), (64, 64, 64), (32, 16, 16), (96, 32, 64)]:
        for nvis, splits, warps in itertools.product((1, 5, 31, 32, 33, 100, 257), (1, 2, 3), (1, 4)):
            run_case(l, d, lp, nvis, 2, splits, warps, rng)
            n += 1
    print(f"tile block scores: {n} cases agree with the direct sums")


if __name__ == "__main__":
    main()
