// The compressed-attention forward is the contiguous-key-range kernel with kCompressed = true
// (range_attn_fwd_kernel.cuh); this header stays for the backward, which uses num_visible and
// the sparse kernels' pieces.
#pragma once

#include "range_attn_fwd_kernel.cuh"
#include "sparse_attn_fwd_kernel.cuh"
