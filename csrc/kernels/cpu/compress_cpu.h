// CPU implementation of the compression family on the same params as the CUDA kernels.
// Element type T is float or double (the torch layer upcasts half types); accumulation in
// double. Used by the extension's CPU path and as the C++ benchmarks' reference.
#pragma once

#include "../compress.h"

namespace nsa {
namespace cpu {

template <typename T>
void compress_fwd(const CompressParams& p);

// Fills dx (and dw, dpe in linear mode). Needs no workspace.
template <typename T>
void compress_bwd(const CompressBwdParams& p);

}  // namespace cpu
}  // namespace nsa
