// Shared helpers of the native dMoE CPU kernels (dmoe_cpu.cpp: experts, dmoe_router_cpu.cpp: router).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace fairdro_dmoe {

constexpr int64_t kBlock = 64;  // tokens loaded, computed and stored together
// below this many multiply-adds a call runs on the calling thread: on the deep, small stages the cost of a thread
// team and of one gradient accumulator per thread exceeds the work
constexpr int64_t kSerialWork = int64_t(1) << 19;

// body(first block, end block, accumulator slot) over n blocks: split across torch's threads (slot = thread
// number), or in one call with slot 0 when serial
template <typename F>
inline void run_blocks(int64_t n, bool serial, const F& body) {
  if (serial) {
    body(int64_t(0), n, int64_t(0));
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) { body(i0, i1, int64_t(at::get_thread_num())); });
}

// accumulator rows needed by run_blocks
inline int64_t accumulator_slots(bool serial) {
  return serial ? 1 : at::get_num_threads();
}

// vectors of T (GCC vector extension: element-wise arithmetic, compiled with the same contraction into fused
// multiply-adds as scalar code), loaded and stored unaligned. Vec: kLanes tokens' values, one per SIMD lane. Wide:
// rows of 32 values (the hidden layer of C = 8) in the widest vectors the build has, 64 bytes with AVX-512 (16
// floats), else 32 bytes; lanes are independent, so the lane count does not change a result
constexpr int64_t kLanes = 8;
#if defined(__AVX512F__)
constexpr int64_t kWideBytes = 64;
#else
constexpr int64_t kWideBytes = 32;
#endif
template <typename T, int64_t Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename T>
using Vec = typename VecOf<T, kLanes * sizeof(T)>::type;
template <typename T>
using Wide = typename VecOf<T, kWideBytes>::type;
template <typename T>
constexpr int64_t kWideLanes = kWideBytes / sizeof(T);

// a vector V from memory at p
template <typename V, typename T>
inline V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline Vec<T> load_lanes(const T* p) {
  return load_vec<Vec<T>>(p);
}

template <typename T>
inline Wide<T> load_wide(const T* p) {
  return load_vec<Wide<T>>(p);
}

// the vector v to memory at p (either kind)
template <typename V, typename T>
inline void store_vec(const V& v, T* p) {
  std::memcpy(p, &v, sizeof(v));
}

// every lane = x
template <typename T>
inline Vec<T> splat(T x) {
  Vec<T> v;
  for (int64_t l = 0; l < kLanes; ++l) v[l] = x;
  return v;
}

// the 8 x 8 tile at s (row stride ss) transposed to d (row stride ds) in AVX registers; false (nothing done) where
// there is no such code: other types, or no AVX
template <typename T>
inline bool transpose_tile(const T*, int64_t, T*, int64_t) {
  return false;
}

#if defined(__AVX__)
template <>
inline bool transpose_tile<float>(const float* s, int64_t ss, float* d, int64_t ds) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ss);
  for (int i = 0; i < 8; i += 2) {  // t[i]: rows i, i+1 interleaved by pairs of columns, low and high halves
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + m]: columns m and m + 4 of rows i .. i+3
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {
    _mm256_storeu_ps(d + m * ds, _mm256_permute2f128_ps(u[m], u[m + 4], 0x20));
    _mm256_storeu_ps(d + (m + 4) * ds, _mm256_permute2f128_ps(u[m], u[m + 4], 0x31));
  }
  return true;
}
#endif

// false: the kernels take the code the register paths replaced (set_register_path; the tests compare the two): the
// per-pair code for C = 8, H = 32 (dmoe_cpu.cpp), the general lane code of the router backward for float C = 8, E = 8
// (dmoe_router_cpu.cpp) and the row-by-row vec_mat below
inline std::atomic<bool> register_path{true};

// out[j] += sum_i a[i] * m[i * cols + j]   (row-vector times matrix, accumulated), each out[j] a chain of
// multiply-adds over i in order. The register code holds 4 Wide vectors of out across all rows (the row-by-row loop
// stored and reloaded out after every row, so every step of each chain waited on a store); the same operations per
// element in the same order
template <typename T>
inline void vec_mat(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ m, int64_t rows,
                    int64_t cols) {
  constexpr int64_t L = kWideLanes<T>, U = 4;
  int64_t j = 0;
  if (register_path.load(std::memory_order_relaxed)) {
    for (; j + U * L <= cols; j += U * L) {
      Wide<T> acc[U];
      for (int64_t u = 0; u < U; ++u) acc[u] = load_wide(out + j + u * L);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t u = 0; u < U; ++u) acc[u] += a[i] * load_wide(m + i * cols + j + u * L);
      for (int64_t u = 0; u < U; ++u) store_vec(acc[u], out + j + u * L);
    }
    for (; j + L <= cols; j += L) {
      Wide<T> acc = load_wide(out + j);
      for (int64_t i = 0; i < rows; ++i) acc += a[i] * load_wide(m + i * cols + j);
      store_vec(acc, out + j);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {  // the remaining columns (all of them without the register code)
    const T ai = a[i];
    const T* __restrict__ row = m + i * cols;
    for (int64_t c = j; c < cols; ++c) out[c] += ai * row[c];
  }
}

// vec_mat for COLS known at compile time: the sum over rows in S interleaved partial sums, so that short rows
// (few independent columns) do not wait on one chain of dependent multiply-adds
template <typename T, int64_t COLS>
inline void vec_mat_c(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ m, int64_t rows) {
  constexpr int64_t S = COLS <= 8 ? 4 : (COLS <= 32 ? 2 : 1);
  T acc[S][COLS] = {};
  int64_t i = 0;
  for (; i + S <= rows; i += S)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < COLS; ++j) acc[s][j] += a[i + s] * m[(i + s) * COLS + j];
  for (; i < rows; ++i)
    for (int64_t j = 0; j < COLS; ++j) acc[0][j] += a[i] * m[i * COLS + j];
  for (int64_t s = 1; s < S; ++s)
    for (int64_t j = 0; j < COLS; ++j) acc[0][j] += acc[s][j];
  for (int64_t j = 0; j < COLS; ++j) out[j] += acc[0][j];
}

template <typename T, int64_t COLS>
inline void vm(T* out, const T* a, const T* m, int64_t rows, int64_t cols) {
  if constexpr (COLS > 0) {
    vec_mat_c<T, COLS>(out, a, m, rows);
  } else {
    vec_mat(out, a, m, rows, cols);
  }
}

// m[i * cols + j] += a[i] * b[j]   (outer product, accumulated)
template <typename T>
inline void add_outer(T* __restrict__ m, const T* __restrict__ a, const T* __restrict__ b, int64_t rows,
                      int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const T ai = a[i];
    T* __restrict__ row = m + i * cols;
    for (int64_t j = 0; j < cols; ++j) row[j] += ai * b[j];
  }
}

// add_outer for COLS known at compile time (one register row per i)
template <typename T, int64_t COLS>
inline void add_outer_c(T* __restrict__ m, const T* __restrict__ a, const T* __restrict__ b, int64_t rows) {
  T bv[COLS];
  for (int64_t j = 0; j < COLS; ++j) bv[j] = b[j];
  for (int64_t i = 0; i < rows; ++i) {
    const T ai = a[i];
    T* __restrict__ row = m + i * COLS;
    for (int64_t j = 0; j < COLS; ++j) row[j] += ai * bv[j];
  }
}

template <typename T, int64_t COLS>
inline void ao(T* m, const T* a, const T* b, int64_t rows, int64_t cols) {
  if constexpr (COLS > 0) {
    add_outer_c<T, COLS>(m, a, b, rows);
  } else {
    add_outer(m, a, b, rows, cols);
  }
}

// the (rows, cols) matrix at src (row stride ss) transposed to dst (row stride ds), in tiles of 8 x 8 so that both
// sides are read and written a cache line at a time: in registers where transpose_tile has code for T, element by
// element otherwise and at the edges. Copies only
template <typename T>
inline void transpose_block(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      if (r1 - r0 == kTile && c1 - c0 == kTile && transpose_tile(src + r0 * ss + c0, ss, dst + c0 * ds + r0, ds))
        continue;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ds + r] = src[r * ss + c];
    }
}

// the nb tokens of a block from channel-first rows (C, stride N) to token-major dst (nb, C)
template <typename T>
inline void load_block(const T* src, int64_t C, int64_t N, int64_t nb, T* dst) {
  transpose_block(src, N, dst, C, C, nb);
}

// token-major src (nb, C) back to channel-first rows (C, stride N)
template <typename T>
inline void store_block(const T* src, int64_t C, int64_t N, int64_t nb, T* dst) {
  transpose_block(src, C, dst, N, nb, C);
}

}  // namespace fairdro_dmoe
