// Shared by the CPU (.cpp) and CUDA (.cu) angular-distance kernels: the C ABI that
// sharelora_kernels/extension.py calls through ctypes, the dtype codes, the error-key
// encoding and the exact fp16/bf16 -> float decoders. No torch, no Python headers.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SL_HD __host__ __device__ __forceinline__
#else
#define SL_HD inline
#endif

// Element type of the input tensor (keep in sync with extension.py: _DTYPE_CODES).
enum SlDtype : int32_t { SL_FLOAT32 = 0, SL_BFLOAT16 = 1, SL_FLOAT16 = 2 };

// Return codes of the C entry points (the data errors go through the error key instead).
enum SlStatus : int32_t { SL_OK = 0, SL_BAD_ARGUMENT = 1, SL_CUDA_ERROR = 2, SL_INTERNAL_ERROR = 3 };

// Data errors are reported as one int64 "error key", initialised by the caller to
// SL_NO_ERROR and lowered with min(): key = (sample * L + layer) * 2 + kind. The minimum
// over all offenders is therefore the first offending (sample, layer) in row-major order,
// whatever order threads or blocks find them in.
enum SlErrorKind : int64_t { SL_ZERO_NORM = 0, SL_NON_FINITE = 1 };
constexpr int64_t SL_NO_ERROR = INT64_MAX;

SL_HD int64_t sl_error_key(int64_t sample, int64_t layer, int64_t num_layers, int64_t kind) {
  return (sample * num_layers + layer) * 2 + kind;
}

// Both decoders are exact: every bf16 / fp16 value is a float.
SL_HD float sl_bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;  // bf16 is the top half of a float
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

SL_HD float sl_fp16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  float magnitude;
  if (exponent == 0x1fu) {  // inf / nan: all-ones float exponent, keep the payload
    uint32_t u = 0x7f800000u | (mantissa << 13);
    memcpy(&magnitude, &u, sizeof magnitude);
  } else if (exponent == 0) {  // zero / subnormal: mantissa * 2^-24, exact in float
    magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  } else {  // normal: rebias the exponent from 15 to 127
    uint32_t u = ((exponent + 112u) << 23) | (mantissa << 13);
    memcpy(&magnitude, &u, sizeof magnitude);
  }
  uint32_t u;
  memcpy(&u, &magnitude, sizeof u);
  u |= sign;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// Element decoders, one per dtype code: the kernels are templated on these.
struct SlF32 {
  using storage = float;
  static SL_HD float load(const float* p) { return *p; }
};
struct SlBF16 {
  using storage = uint16_t;
  static SL_HD float load(const uint16_t* p) { return sl_bf16_to_float(*p); }
};
struct SlF16 {
  using storage = uint16_t;
  static SL_HD float load(const uint16_t* p) { return sl_fp16_to_float(*p); }
};

extern "C" {
// Sum over samples of the per-sample angular distances theta_ij / pi.
// x: element (layer l, sample s, feature k) lives at x[l*stride_l + s*stride_n + k*stride_d]
// (strides in elements, non-negative). out: L*L doubles, overwritten (symmetric,
// zero diagonal). error_key: one int64, must hold SL_NO_ERROR on entry.
int32_t sharelora_angular_sums_cpu(const void* x, int32_t dtype, int64_t num_layers,
                                   int64_t num_samples, int64_t dim, int64_t stride_l,
                                   int64_t stride_n, int64_t stride_d, double* out,
                                   int64_t* error_key, int32_t num_threads);

// CUDA version of the above; every pointer is device memory, the work is queued on
// `stream` (a cudaStream_t) and nothing synchronises. `partials` is scratch of
// sharelora_angular_cuda_partials(...) doubles (-1: unsupported, e.g. L > 128).
int64_t sharelora_angular_cuda_partials(int64_t num_layers, int64_t num_samples, int32_t dtype,
                                        int32_t device);
int32_t sharelora_angular_sums_cuda(const void* x, int32_t dtype, int64_t num_layers,
                                    int64_t num_samples, int64_t dim, int64_t stride_l,
                                    int64_t stride_n, int64_t stride_d, double* out,
                                    double* partials, int64_t* error_key, int32_t device,
                                    void* stream);

// The digest of the csrc/ sources this library was built from (build.py: sources_digest, passed
// as -DSL_SOURCES_DIGEST): extension.py uses an install-time library only while it matches the
// csrc/ sources present. Each library's source defines it, returning SL_SOURCES_DIGEST.
const char* sharelora_sources_digest(void);
}

#ifndef SL_SOURCES_DIGEST
#define SL_SOURCES_DIGEST ""  // built without build.py: matches no sources
#endif
