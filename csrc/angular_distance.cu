// CUDA kernel: sum over samples of the per-sample angular distances between layers.
// No torch headers: raw pointers, strides in elements, a cudaStream_t from the caller.
//
// Numerics: identical to the CPU kernel (angular_distance_cpu.cpp). Inputs are widened to
// double (exact), products of two fp32/bf16/fp16 values are exact in double, norms and
// Gram are summed in float64, then theta = 2 atan2(sqrt(1 - c), sqrt(1 + c)).
//
// Arithmetic intensity (n = 65536, L = 33, d = 4096, bf16): one sample is L*d*2 = 270 KB
// read once, and needs the upper triangle of its Gram, L(L+1)/2 * d = 2.3 M multiply-adds:
// (L+1)/4 = 8.5 FMA per byte. At H100 SXM's 3.35 TB/s that asks for 28 T FMA/s, but fp64
// FMA peaks at ~17 T FMA/s on the CUDA cores (~33 T on the fp64 tensor cores), so an
// exact-fp64 Gram is compute-bound at <= ~60% of HBM bandwidth on CUDA cores, and the
// 8x8 register tiles below (rows padded to 40, 15 tiles = 960 products instead of 561)
// lower that ceiling to ~35%. Cheaper accumulations do not meet the accuracy contract:
// theta = 1e-4 rad means 1 - c = 5e-9, and a 1e-3 relative error on theta needs c to
// ~1e-11, which rules out fp32 sums (even chunked ones, ~1e-8 relative) and needs
// fp64-grade accumulation. See csrc/README.md for the options left to reach the 80% goal.
//
// Work layout. A persistent grid of (occupancy x SMs) blocks strides over samples. For one
// sample, a block walks d in chunks of kChunk columns: it stages the chunk of every layer
// into shared memory as doubles (rows padded with zeros to a multiple of 8) -- reading 16
// bytes per thread per load (eight bf16 / fp16 or four fp32) where the layout allows it
// (unit feature stride, 16-byte aligned rows, d a multiple of the vector), with the next
// chunk's first kPrefetch vectors per thread loaded into registers before the current chunk
// is computed, so they are in flight during its FMAs; other layouts load one element at a
// time -- then each
// thread owns one 8x8 tile (bi, bj), bi <= bj, of the Gram and one residue class
// k = kg (mod KS) of the chunk's columns, with 64 fp64 accumulators in registers (16 shared
// loads per 64 FMA). After the last chunk the KS partial tiles are added in fixed kg order
// into a shared Gram, the norms are checked, and each thread adds theta_ij of its own
// (i, j) entries into this block's slice of `partials` (grid x L x L, no atomics). A final
// kernel sums the slices in block order: the result is deterministic.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "angular_common.h"

namespace {

constexpr int kTile = 8;            // Gram tile per thread: kTile x kTile accumulators
constexpr int kChunk = 64;          // columns of d staged in shared memory at a time
constexpr int kRowStride = kChunk + 1;  // odd stride: rows of one column hit different banks
constexpr int kMaxThreads = 256;
constexpr int kMaxLayers = 128;     // shared Gram of 128 x 128 doubles = 128 KB
constexpr int kPrefetch = 4;        // 16-byte vectors per thread of the next chunk held in registers

struct Problem {
  const void* x;
  int64_t num_layers, num_samples, dim, stride_l, stride_n, stride_d;
  bool vectorized;  // 16-byte loads: see vectorizable()
};

// Elements of type E in one 16-byte load.
template <class E>
__host__ __device__ constexpr int vector_width() { return 16 / static_cast<int>(sizeof(typename E::storage)); }

// Whether every vector of a chunk is one aligned 16-byte load of valid columns: unit feature
// stride, layer and sample strides and the base 16-byte aligned, d a multiple of the width
// (chunks start at multiples of kChunk, itself a multiple of the width).
template <class E>
bool vectorizable(const Problem& p) {
  const int64_t w = vector_width<E>();
  return p.stride_d == 1 && p.stride_l % w == 0 && p.stride_n % w == 0 && p.dim % w == 0 &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
}

// Vector e of the chunk at column k0 of sample s (row l = e / (kChunk / W), columns
// k = (e % (kChunk / W)) * W ...): its 16 bytes, zeros past the rows or columns.
template <class E>
__device__ __forceinline__ uint4 load_vector(const Problem& p, const typename E::storage* x, int L,
                                             int64_t s, int64_t k0, int e) {
  constexpr int kVectors = kChunk / vector_width<E>();
  const int l = e / kVectors, k = (e % kVectors) * vector_width<E>();
  if (l >= L || k0 + k >= p.dim) return make_uint4(0, 0, 0, 0);
  return __ldg(reinterpret_cast<const uint4*>(x + l * p.stride_l + s * p.stride_n + k0 + k));
}

// Write vector e (see load_vector) into the staged rows as doubles.
template <class E>
__device__ __forceinline__ void stage_vector(double* rows, int e, uint4 v) {
  constexpr int kWidth = vector_width<E>(), kVectors = kChunk / kWidth;
  const int l = e / kVectors, k = (e % kVectors) * kWidth;
  typename E::storage elements[kWidth];
  memcpy(elements, &v, sizeof v);
#pragma unroll
  for (int j = 0; j < kWidth; ++j) rows[l * kRowStride + k + j] = E::load(elements + j);
}

struct Shape {  // launch geometry derived from L only
  int padded_layers, tiles_per_side, tile_pairs, threads, k_split;
  size_t shared_bytes;
};

Shape shape_for(int64_t num_layers) {
  Shape s;
  s.tiles_per_side = static_cast<int>((num_layers + kTile - 1) / kTile);
  s.padded_layers = s.tiles_per_side * kTile;
  s.tile_pairs = s.tiles_per_side * (s.tiles_per_side + 1) / 2;
  s.threads = s.tile_pairs <= 128 ? 128 : kMaxThreads;
  s.k_split = s.threads / s.tile_pairs;  // >= 1 because L <= kMaxLayers
  const size_t staged = size_t(s.padded_layers) * kRowStride;
  const size_t gram = size_t(s.padded_layers) * s.padded_layers;
  // The Gram reuses the staging buffer once the last chunk is consumed.
  s.shared_bytes = (staged > gram ? staged : gram) * sizeof(double) +
                   s.padded_layers * sizeof(double);  // + inverse norms
  return s;
}

template <class E>
__global__ void __launch_bounds__(kMaxThreads)
angular_partials_kernel(Problem p, Shape shape, double* __restrict__ partials,
                        unsigned long long* error_key) {
  extern __shared__ double shared[];
  double* rows = shared;  // padded_layers x kRowStride, then reused as the Gram
  double* gram = shared;  // padded_layers x padded_layers
  const int lp = shape.padded_layers;
  double* inv_norm = shared + (shape.shared_bytes / sizeof(double) - lp);

  const int L = static_cast<int>(p.num_layers), tid = threadIdx.x;
  const auto* x = static_cast<const typename E::storage*>(p.x);
  // This thread's work item: k residue kg (fastest, so a warp's lanes read neighbouring
  // columns of the same rows) and tile pair (bi, bj) of the upper block triangle.
  const int kg = tid % shape.k_split, pair = tid / shape.k_split;
  const bool computes = pair < shape.tile_pairs;
  int bi = 0, bj = pair;
  while (computes && bj >= shape.tiles_per_side - bi) bj -= shape.tiles_per_side - bi++;
  bj += bi;

  double* my_partials = partials + size_t(blockIdx.x) * L * L;
  for (int q = tid; q < L * L; q += blockDim.x) my_partials[q] = 0.0;

  for (int64_t s = blockIdx.x; s < p.num_samples; s += gridDim.x) {
    // Stop once an error is known for an earlier sample (block-uniform decision).
    const unsigned long long first_possible = sl_error_key(s, 0, L, 0);
    if (__syncthreads_or(tid == 0 && first_possible > *(volatile unsigned long long*)error_key))
      break;
    double acc[kTile][kTile] = {};
    const int vectors = lp * (kChunk / vector_width<E>());
    uint4 next[kPrefetch];  // the first kPrefetch vectors of this thread in the next chunk
    if (p.vectorized)
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) {
        const int e = tid + i * blockDim.x;
        if (e < vectors) next[i] = load_vector<E>(p, x, L, s, 0, e);
      }
    for (int64_t k0 = 0; k0 < p.dim; k0 += kChunk) {
      __syncthreads();  // the previous chunk (or Gram) is no longer read
      if (p.vectorized) {
#pragma unroll
        for (int i = 0; i < kPrefetch; ++i) {
          const int e = tid + i * blockDim.x;
          if (e < vectors) stage_vector<E>(rows, e, next[i]);
        }
        for (int e = tid + kPrefetch * blockDim.x; e < vectors; e += blockDim.x)
          stage_vector<E>(rows, e, load_vector<E>(p, x, L, s, k0, e));
      } else {
        for (int e = tid; e < lp * kChunk; e += blockDim.x) {
          const int l = e / kChunk, k = e % kChunk;
          double v = 0.0;  // zero padding: rows >= L and columns >= d
          if (l < L && k0 + k < p.dim)
            v = E::load(x + l * p.stride_l + s * p.stride_n + (k0 + k) * p.stride_d);
          rows[l * kRowStride + k] = v;
        }
      }
      __syncthreads();
      if (p.vectorized && k0 + kChunk < p.dim)  // in flight while this chunk is computed
#pragma unroll
        for (int i = 0; i < kPrefetch; ++i) {
          const int e = tid + i * blockDim.x;
          if (e < vectors) next[i] = load_vector<E>(p, x, L, s, k0 + kChunk, e);
        }
      if (computes) {
        for (int k = kg; k < kChunk; k += shape.k_split) {
          double a[kTile], b[kTile];
#pragma unroll
          for (int r = 0; r < kTile; ++r) {
            a[r] = rows[(bi * kTile + r) * kRowStride + k];
            b[r] = rows[(bj * kTile + r) * kRowStride + k];
          }
#pragma unroll
          for (int r = 0; r < kTile; ++r)
#pragma unroll
            for (int c = 0; c < kTile; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
        }
      }
    }
    // Sum the k_split partial tiles into the shared Gram, in fixed kg order.
    for (int g = 0; g < shape.k_split; ++g) {
      __syncthreads();
      if (computes && kg == g)
#pragma unroll
        for (int r = 0; r < kTile; ++r)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            double& entry = gram[(bi * kTile + r) * lp + bj * kTile + c];
            entry = (g == 0 ? 0.0 : entry) + acc[r][c];
          }
    }
    __syncthreads();
    bool bad = false;
    if (tid < L) {
      // Squares of finite non-zero inputs are > 0 and finite in double: the squared norm
      // tells zero vectors and NaN/Inf apart without a separate scan of the input.
      const double norm2 = gram[tid * lp + tid];
      bad = !(norm2 > 0.0) || !isfinite(norm2);
      if (bad)
        atomicMin(error_key, (unsigned long long)sl_error_key(
                                 s, tid, L, norm2 == 0.0 ? SL_ZERO_NORM : SL_NON_FINITE));
      inv_norm[tid] = bad ? 0.0 : 1.0 / sqrt(norm2);
    }
    if (__syncthreads_or(bad)) break;  // later samples of this block have larger keys
    for (int q = tid; q < L * L; q += blockDim.x) {
      const int i = q / L, j = q % L;
      if (i >= j) continue;
      const double c = fmin(1.0, fmax(-1.0, gram[i * lp + j] * inv_norm[i] * inv_norm[j]));
      my_partials[q] += 2.0 * atan2(sqrt(1.0 - c), sqrt(1.0 + c));
    }
  }
}

// out[i, j] = out[j, i] = sum over blocks of partials[b, min(i,j), max(i,j)] / pi; out[i, i] = 0.
__global__ void finalize_kernel(const double* __restrict__ partials, int num_blocks,
                                int num_layers, double* __restrict__ out) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x, L = num_layers;
  if (q >= L * L) return;
  const int i = q / L, j = q % L;
  const int upper = i < j ? q : j * L + i;
  double total = 0.0;
  if (i != j)
    for (int b = 0; b < num_blocks; ++b) total += partials[size_t(b) * L * L + upper];
  out[q] = total * (1.0 / M_PI);
}

template <class E>
cudaError_t grid_size(const Shape& shape, int64_t num_samples, int device, int* grid) {
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(angular_partials_kernel<E>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shape.shared_bytes));
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, angular_partials_kernel<E>,
                                                        shape.threads, shape.shared_bytes);
  const int64_t wanted = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = static_cast<int>(num_samples < wanted ? num_samples : wanted);
  return err;
}

template <class E>
cudaError_t launch(Problem p, double* out, double* partials, int64_t* error_key,
                   int device, cudaStream_t stream) {
  p.vectorized = vectorizable<E>(p);
  const Shape shape = shape_for(p.num_layers);
  int grid = 0;
  cudaError_t err = grid_size<E>(shape, p.num_samples, device, &grid);
  if (err != cudaSuccess) return err;
  if (grid > 0)
    angular_partials_kernel<E><<<grid, shape.threads, shape.shared_bytes, stream>>>(
        p, shape, partials, reinterpret_cast<unsigned long long*>(error_key));
  const int entries = static_cast<int>(p.num_layers * p.num_layers);
  finalize_kernel<<<(entries + 255) / 256, 256, 0, stream>>>(partials, grid,
                                                               static_cast<int>(p.num_layers), out);
  return cudaGetLastError();
}

}  // namespace

extern "C" const char* sharelora_sources_digest(void) { return SL_SOURCES_DIGEST; }

// Doubles of scratch that sharelora_angular_sums_cuda needs for `partials` (grid x L x L),
// or -1 if the problem is not supported (L > kMaxLayers, bad dtype, CUDA error).
extern "C" int64_t sharelora_angular_cuda_partials(int64_t num_layers, int64_t num_samples,
                                                   int32_t dtype, int32_t device) {
  if (num_layers < 1 || num_layers > kMaxLayers || num_samples < 0) return -1;
  const Shape shape = shape_for(num_layers);
  int grid = 0;
  cudaError_t err = cudaErrorInvalidValue;
  if (cudaSetDevice(device) != cudaSuccess) return -1;
  switch (dtype) {
    case SL_FLOAT32: err = grid_size<SlF32>(shape, num_samples, device, &grid); break;
    case SL_BFLOAT16: err = grid_size<SlBF16>(shape, num_samples, device, &grid); break;
    case SL_FLOAT16: err = grid_size<SlF16>(shape, num_samples, device, &grid); break;
  }
  return err == cudaSuccess ? int64_t(grid) * num_layers * num_layers : -1;
}

extern "C" int32_t sharelora_angular_sums_cuda(const void* x, int32_t dtype, int64_t num_layers,
                                               int64_t num_samples, int64_t dim, int64_t stride_l,
                                               int64_t stride_n, int64_t stride_d, double* out,
                                               double* partials, int64_t* error_key,
                                               int32_t device, void* stream) {
  if (num_layers < 1 || num_layers > kMaxLayers || num_samples < 0 || dim < 1 ||
      stride_l < 0 || stride_n < 0 || stride_d < 0)
    return SL_BAD_ARGUMENT;
  if (cudaSetDevice(device) != cudaSuccess) return SL_CUDA_ERROR;
  const Problem p{x, num_layers, num_samples, dim, stride_l, stride_n, stride_d, false};
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (dtype) {
    case SL_FLOAT32: err = launch<SlF32>(p, out, partials, error_key, device, s); break;
    case SL_BFLOAT16: err = launch<SlBF16>(p, out, partials, error_key, device, s); break;
    case SL_FLOAT16: err = launch<SlF16>(p, out, partials, error_key, device, s); break;
    default: return SL_BAD_ARGUMENT;
  }
  return err == cudaSuccess ? SL_OK : SL_CUDA_ERROR;
}
