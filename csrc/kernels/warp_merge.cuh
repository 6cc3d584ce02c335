// Merging the online softmax of several warps that own the same 16 query rows (the decode
// kernel's slices, the selected branch's split walk): one thread (gid, tig) holds rows gid and
// gid + 8 of mma_sm80.cuh's C layout.
#pragma once

namespace nsa {

// The warp's row max and quad-summed row sum to s_m / s_l [warp][16] (the caller syncs before
// reading them).
__device__ __forceinline__ void publish_row_stats(float* s_m, float* s_l, int warp, const float (&m_run)[2],
                                                  const float (&l_run)[2], int gid, int tig) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float l = l_run[ri];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (tig == 0) {
      s_m[warp * 16 + gid + ri * 8] = m_run[ri];
      s_l[warp * 16 + gid + ri * 8] = l;
    }
  }
}

}  // namespace nsa
