// Runtime value -> template parameter dispatch. Every switch from a runtime dtype, head dim or
// flag to a kernel template goes through these macros, so a build that compiled only some
// instantiations (NSA_CUDA_DTYPES / NSA_CUDA_HEADDIMS) reports what is missing instead of
// failing to link. The NSA_ENABLE_* macros come from setup.py / CMake.
#pragma once

#include "nsa_common.h"

#if !defined(NSA_ENABLE_BF16) && !defined(NSA_ENABLE_FP16)
// A build with no dtype knob compiles everything (the default full build).
#define NSA_ENABLE_BF16
#define NSA_ENABLE_FP16
#endif
#if !defined(NSA_ENABLE_HDIM64) && !defined(NSA_ENABLE_HDIM128) && !defined(NSA_ENABLE_HDIM192) && \
    !defined(NSA_ENABLE_HDIM256)
#define NSA_ENABLE_HDIM64
#define NSA_ENABLE_HDIM128
#define NSA_ENABLE_HDIM192
#define NSA_ENABLE_HDIM256
#endif

// Lanes per vector of the memory-bound row kernels (delta, combine backward): the vector's 16-byte
// chunks rounded up to a power of two, 8 to 32 (32 / lanes vectors per warp).
inline int nsa_vec_lanes(int chunks) { return chunks <= 8 ? 8 : (chunks <= 16 ? 16 : 32); }

#define NSA_LANES_SWITCH(LANES, CONST_NAME, ...) \
  [&] {                                          \
    if ((LANES) == 8) {                          \
      constexpr static int CONST_NAME = 8;       \
      return __VA_ARGS__();                      \
    } else if ((LANES) == 16) {                  \
      constexpr static int CONST_NAME = 16;      \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr static int CONST_NAME = 32;      \
      return __VA_ARGS__();                      \
    }                                            \
  }()

#define NSA_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                   \
    }                                         \
  }()

#ifdef NSA_ENABLE_BF16
#define NSA_CASE_BF16(TYPE_NAME, ...) \
  case ::nsa::DType::kBFloat16: {    \
    using TYPE_NAME = __nv_bfloat16; \
    return __VA_ARGS__();            \
  }
#else
#define NSA_CASE_BF16(TYPE_NAME, ...)
#endif
#ifdef NSA_ENABLE_FP16
#define NSA_CASE_FP16(TYPE_NAME, ...) \
  case ::nsa::DType::kFloat16: {     \
    using TYPE_NAME = __half;        \
    return __VA_ARGS__();            \
  }
#else
#define NSA_CASE_FP16(TYPE_NAME, ...)
#endif

// DTYPE: nsa::DType; binds TYPE_NAME to __nv_bfloat16 / __half. Falls through to
// `return ::nsa::Status{1, "..."}` for a dtype this build did not compile.
#define NSA_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                                   \
  [&]() -> ::nsa::Status {                                                        \
    switch (DTYPE) {                                                              \
      NSA_CASE_BF16(TYPE_NAME, __VA_ARGS__)                                       \
      NSA_CASE_FP16(TYPE_NAME, __VA_ARGS__)                                       \
      default:                                                                    \
        return ::nsa::Status{1, "dtype not compiled in this build (NSA_CUDA_DTYPES)"}; \
    }                                                                             \
  }()

#ifdef NSA_ENABLE_HDIM64
#define NSA_CASE_HDIM64(NAME, ...) case 64: { constexpr static int NAME = 64; return __VA_ARGS__(); }
#else
#define NSA_CASE_HDIM64(NAME, ...)
#endif
#ifdef NSA_ENABLE_HDIM128
#define NSA_CASE_HDIM128(NAME, ...) case 128: { constexpr static int NAME = 128; return __VA_ARGS__(); }
#else
#define NSA_CASE_HDIM128(NAME, ...)
#endif
#ifdef NSA_ENABLE_HDIM192
#define NSA_CASE_HDIM192(NAME, ...) case 192: { constexpr static int NAME = 192; return __VA_ARGS__(); }
#else
#define NSA_CASE_HDIM192(NAME, ...)
#endif
#ifdef NSA_ENABLE_HDIM256
#define NSA_CASE_HDIM256(NAME, ...) case 256: { constexpr static int NAME = 256; return __VA_ARGS__(); }
#else
#define NSA_CASE_HDIM256(NAME, ...)
#endif

// HEADDIM: int (Dk of the kernel family); binds constexpr NAME. Head dims 64/128/192/256.
#define NSA_HEADDIM_SWITCH(HEADDIM, NAME, ...)                                       \
  [&]() -> ::nsa::Status {                                                           \
    switch (HEADDIM) {                                                               \
      NSA_CASE_HDIM64(NAME, __VA_ARGS__)                                             \
      NSA_CASE_HDIM128(NAME, __VA_ARGS__)                                            \
      NSA_CASE_HDIM192(NAME, __VA_ARGS__)                                            \
      NSA_CASE_HDIM256(NAME, __VA_ARGS__)                                            \
      default:                                                                       \
        return ::nsa::Status{1, "head dim not compiled in this build (NSA_CUDA_HEADDIMS)"}; \
    }                                                                                \
  }()
