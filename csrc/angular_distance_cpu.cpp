// CPU kernel: sum over samples of the per-sample angular distances between layers.
//
// Numerics (the project's fixed formula, METHOD.md section 1): per sample the L x L Gram
// G = X X^T of the (L, d) slice is accumulated in float64. Every input is widened to
// double first; a product of two fp32 (or bf16 / fp16) values has at most 48 significant
// bits, so it is exact in double and the only rounding is the float64 summation
// (relative error ~ d * 2^-53 worst case). Then c = G_ij / sqrt(G_ii G_jj), clamped to
// [-1, 1], theta = 2 atan2(sqrt(1 - c), sqrt(1 + c)); 1 - c is exact in double near c = 1,
// which keeps nearly parallel vectors (theta ~ 1e-4 rad, 1 - c ~ 5e-9) accurate.
//
// Work layout: samples are split into contiguous ranges, one per std::thread (plain
// threads, so no second OpenMP runtime next to torch's). Each thread gathers one sample
// at a time, whatever the strides and dtype, into a zero-padded row-major buffer of
// doubles (rows padded to a multiple of 4, columns to a multiple of 4), computes the upper
// block triangle of the Gram with 2 x 4 register tiles of 4-wide double vectors, and adds
// the sample's angles into its own (L, L) sums. The per-thread sums are added in thread
// order at the end, so the result is deterministic for a given thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>
#include <vector>

#include "angular_common.h"

namespace {

typedef double v4d __attribute__((vector_size(32)));  // GCC / Clang vector extension

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// An AVX+FMA clone (256-bit double FMAs) and a portable one, picked at load time from
// the CPU's feature bits ("arch=..." clones would test the CPU model, not its features).
#define SL_CPU_DISPATCH __attribute__((target_clones("fma", "default")))
#else
#define SL_CPU_DISPATCH
#endif

constexpr int64_t kRowBlock = 4;  // Gram rows per block; rows are padded to a multiple
constexpr int64_t kLanes = 4;     // doubles per vector; columns are padded to a multiple

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

inline __attribute__((always_inline)) v4d load4(const double* p) {
  v4d v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// gram[r * ld + c] = <a_r, b_c> for r < 2, c < 4; rows are `dp` doubles long.
inline __attribute__((always_inline)) void tile_2x4(const double* a, const double* b,
                                                    int64_t dp, double* gram, int64_t ld) {
  v4d acc[2][4] = {};
  for (int64_t k = 0; k < dp; k += kLanes) {
    const v4d a0 = load4(a + k), a1 = load4(a + dp + k);
    for (int c = 0; c < 4; ++c) {
      const v4d bc = load4(b + c * dp + k);
      acc[0][c] += a0 * bc;
      acc[1][c] += a1 * bc;
    }
  }
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 4; ++c)
      gram[r * ld + c] = (acc[r][c][0] + acc[r][c][1]) + (acc[r][c][2] + acc[r][c][3]);
}

// Upper block triangle of the Gram of `lp` rows (lp a multiple of 4) of `dp` doubles:
// gram[i * lp + j] is valid for every i <= j. (Rows stream from L2; blocking the columns
// for L1 measured no faster.)
SL_CPU_DISPATCH void gram_upper(const double* rows, int64_t lp, int64_t dp, double* gram) {
  for (int64_t bi = 0; bi < lp; bi += kRowBlock)
    for (int64_t bj = bi; bj < lp; bj += kRowBlock)
      for (int64_t half = 0; half < kRowBlock; half += 2)
        tile_2x4(rows + (bi + half) * dp, rows + bj * dp, dp, gram + (bi + half) * lp + bj, lp);
}

struct Problem {
  const void* x;
  int64_t num_layers, num_samples, dim, stride_l, stride_n, stride_d;
};

// Lowers `target` to `key` if smaller (the error key is a running minimum).
void atomic_min(std::atomic<int64_t>& target, int64_t key) {
  int64_t seen = target.load(std::memory_order_relaxed);
  while (key < seen && !target.compare_exchange_weak(seen, key, std::memory_order_relaxed)) {
  }
}

// Adds theta_ij (not yet divided by pi) of samples [begin, end) into sums (L * L, i < j).
template <class E>
void sum_range(const Problem& p, int64_t begin, int64_t end, double* sums,
               std::atomic<int64_t>& error_key) {
  const int64_t L = p.num_layers, d = p.dim;
  const int64_t lp = round_up(L, kRowBlock), dp = round_up(d, kLanes);
  std::vector<double> rows(lp * dp, 0.0), gram(lp * lp), inv_norm(L);
  const auto* x = static_cast<const typename E::storage*>(p.x);
  for (int64_t s = begin; s < end; ++s) {
    // Every remaining sample comes after an error already found: nothing left to report.
    if (sl_error_key(s, 0, L, 0) > error_key.load(std::memory_order_relaxed)) return;
    for (int64_t l = 0; l < L; ++l) {
      const auto* src = x + l * p.stride_l + s * p.stride_n;
      double* row = rows.data() + l * dp;
      if (p.stride_d == 1)  // the common case, kept separate so that it vectorises
        for (int64_t k = 0; k < d; ++k) row[k] = E::load(src + k);
      else
        for (int64_t k = 0; k < d; ++k) row[k] = E::load(src + k * p.stride_d);
    }
    gram_upper(rows.data(), lp, dp, gram.data());
    for (int64_t l = 0; l < L; ++l) {
      // A square of a finite non-zero input is > 0 and finite in double (no underflow or
      // overflow from fp32 range), so the squared norm alone tells zero and NaN/Inf apart.
      const double norm2 = gram[l * lp + l];
      if (!(norm2 > 0.0) || !std::isfinite(norm2)) {
        atomic_min(error_key, sl_error_key(s, l, L, norm2 == 0.0 ? SL_ZERO_NORM : SL_NON_FINITE));
        return;  // later samples of this range can only have larger keys
      }
      inv_norm[l] = 1.0 / std::sqrt(norm2);
    }
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = i + 1; j < L; ++j) {
        double c = gram[i * lp + j] * inv_norm[i] * inv_norm[j];
        c = std::min(1.0, std::max(-1.0, c));
        sums[i * L + j] += 2.0 * std::atan2(std::sqrt(1.0 - c), std::sqrt(1.0 + c));
      }
  }
}

template <class E>
void run(const Problem& p, double* out, int64_t* error_key, int32_t num_threads) {
  const int64_t L = p.num_layers, n = p.num_samples;
  // Below ~1M multiply-adds per thread, starting threads costs more than it saves.
  const int64_t work = n * L * L * p.dim / 2;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({num_threads, n, work >> 20}));
  std::vector<std::vector<double>> sums(threads, std::vector<double>(L * L, 0.0));
  std::atomic<int64_t> first_error(*error_key);
  std::vector<std::thread> pool;
  try {
    for (int64_t t = 1; t < threads; ++t)
      pool.emplace_back(sum_range<E>, std::cref(p), n * t / threads, n * (t + 1) / threads,
                        sums[t].data(), std::ref(first_error));
  } catch (...) {  // could not start a thread: let the started ones finish, then report
    for (auto& worker : pool) worker.join();
    throw;
  }
  sum_range<E>(p, 0, n / threads, sums[0].data(), first_error);
  for (auto& worker : pool) worker.join();
  *error_key = first_error.load();
  const double inv_pi = 1.0 / M_PI;
  for (int64_t i = 0; i < L; ++i) {
    out[i * L + i] = 0.0;
    for (int64_t j = i + 1; j < L; ++j) {
      double total = 0.0;
      for (const auto& partial : sums) total += partial[i * L + j];
      out[i * L + j] = out[j * L + i] = total * inv_pi;
    }
  }
}

}  // namespace

extern "C" const char* sharelora_sources_digest(void) { return SL_SOURCES_DIGEST; }

extern "C" int32_t sharelora_angular_sums_cpu(const void* x, int32_t dtype, int64_t num_layers,
                                              int64_t num_samples, int64_t dim, int64_t stride_l,
                                              int64_t stride_n, int64_t stride_d, double* out,
                                              int64_t* error_key, int32_t num_threads) {
  if (num_layers < 1 || num_samples < 0 || dim < 1 || stride_l < 0 || stride_n < 0 ||
      stride_d < 0 || out == nullptr || error_key == nullptr)
    return SL_BAD_ARGUMENT;
  const Problem p{x, num_layers, num_samples, dim, stride_l, stride_n, stride_d};
  try {
    switch (dtype) {
      case SL_FLOAT32: run<SlF32>(p, out, error_key, num_threads); break;
      case SL_BFLOAT16: run<SlBF16>(p, out, error_key, num_threads); break;
      case SL_FLOAT16: run<SlF16>(p, out, error_key, num_threads); break;
      default: return SL_BAD_ARGUMENT;
    }
  } catch (...) {  // std::bad_alloc, std::system_error from std::thread
    return SL_INTERNAL_ERROR;
  }
  return SL_OK;
}
