// Native CPU kernels of the dMoE expert bank (bundle/scripts/dmoe_native.py builds and loads this file).
//
// For every voxel (token) t of a channel-first feature map h (B, C, N) and each of its K gates (weight w, expert e):
//     y[t] = h[t] + dropout( sum_j w[j, t] * (relu(h[t] W1[e] + b1[e]) W2[e] + b2[e]) )
// (the dMoE layer's output: residual, and dropout with a mask drawn by torch, see Dropout) and the gradients of a
// loss with respect to h, w and the expert parameters. Each token is computed where it lies: no sort by expert, no
// gathered copies, no (tokens x hidden) intermediate in memory (the forward keeps each pair's expert output, C
// values, for the gate gradients; the backward recomputes the hidden layer). Tokens are processed in blocks of
// kBlock voxels, loaded to and stored from a small token-major buffer, so the channel rows are read and written
// contiguously. The blocks are shared out by at::parallel_for (torch's intra-op threads; small calls run on the
// calling thread); parameter gradients go to one accumulator per thread, summed in thread order at the end, so a
// run is deterministic for a given thread count.
//
// Shapes: h, y, gy, gh (B, C, N); w, e, gw (B, K, N), e int64; w1 (E, C, H), b1 (E, H), w2 (E, H, C), b2 (E, C).
// All tensors contiguous, float32 or float64 (checked by the Python wrapper). skip_zero: pairs of weight exactly
// zero contribute nothing and get zero weight gradient (the dense fallback gates of unknown subgroups).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "dmoe_cpu_common.h"
#include "dmoe_ops.h"

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

namespace {

using namespace fairdro_dmoe;

struct Dims {
  int64_t B, C, N, K, E, H;
};

template <typename T>
struct Params {
  const T *w1, *b1, *w2, *b2, *w1t, *w2t;
};

// Dropout of the mixture, drawn by torch: element i (token-major: i = token * C + channel) is kept, and scaled by
// `scale`, when its 16-bit lane L[(i / 3) * 4 + i % 3] of the int64 draws (viewed as int16) is >= threshold; the
// same lanes and test as scripts.dmoe._lane_mask. No draws: every element kept, scale 1 (evaluation).
struct Dropout {
  const int16_t* lanes;
  int64_t threshold;
  double scale;

  template <typename T>
  inline T factor(int64_t i) const {
    if (lanes == nullptr) return T(1);
    return lanes[(i / 3) * 4 + i % 3] >= threshold ? T(scale) : T(0);
  }

  // factor(first + k) for k in [0, n), into f: element i reads lane i + i / 3, so after the first multiple of 3
  // the lanes go in steps of three read, one skipped (no division per element)
  template <typename T>
  inline void factors(int64_t first, int64_t n, T* __restrict__ f) const {
    if (lanes == nullptr) {
      std::fill(f, f + n, T(1));
      return;
    }
    const T keep = T(scale);
    int64_t k = 0;
    for (; k < n && (first + k) % 3 != 0; ++k) f[k] = factor<T>(first + k);
    const int16_t* __restrict__ lane = lanes + ((first + k) / 3) * 4;
    for (; k + 3 <= n; k += 3, lane += 4) {  // keep * 1 or keep * 0: the values of factor(), without branches
      f[k] = keep * T(lane[0] >= threshold);
      f[k + 1] = keep * T(lane[1] >= threshold);
      f[k + 2] = keep * T(lane[2] >= threshold);
    }
    for (; k < n; ++k) f[k] = factor<T>(first + k);
  }
};

// One expert MLP on one token; CT/HT > 0 fix C and H at compile time (loops unrolled), 0 takes them from Dims.
template <typename T, int64_t CT, int64_t HT>
struct Mlp {
  int64_t c_, h_;
  explicit Mlp(const Dims& d) : c_(d.C), h_(d.H) {}
  constexpr int64_t C() const { return CT ? CT : c_; }
  constexpr int64_t H() const { return HT ? HT : h_; }

  // pre = x W1 + b1, z = relu(pre)
  inline void hidden(const T* x, const Params<T>& P, int64_t ex, T* pre, T* z) const {
    const int64_t C = this->C(), H = this->H();
    std::copy(P.b1 + ex * H, P.b1 + (ex + 1) * H, pre);
    vm<T, HT>(pre, x, P.w1 + ex * C * H, C, H);
    for (int64_t h = 0; h < H; ++h) z[h] = std::max(pre[h], T(0));
  }

  // out = z W2 + b2
  inline void output(const T* z, const Params<T>& P, int64_t ex, T* out) const {
    const int64_t C = this->C(), H = this->H();
    std::copy(P.b2 + ex * C, P.b2 + (ex + 1) * C, out);
    vm<T, CT>(out, z, P.w2 + ex * H * C, H, C);
  }
};

// Per-thread gradient accumulators of the expert parameters, laid out [w1 | b1 | w2 transposed | b2]: (E, C, H),
// (E, H), (E, C, H), (E, C).
template <typename T>
struct Grads {
  T *w1, *b1, *w2t, *b2;
  Grads(T* acc, int64_t E, int64_t C, int64_t H)
      : w1(acc), b1(acc + E * C * H), w2t(acc + E * (C * H + H)), b2(acc + E * (2 * C * H + H)) {}
};

// ------------------------------------------------------------------------------------ C = 8, H = 32 in registers
// The first two stages of the default network. The same operations as Mlp and PairGrad on every element, in the
// same order (the partial sums of vec_mat_c, the accumulations pair by pair), so the results are bit-identical to the
// generic code; the hidden layer (Wide vectors: 2 of 16 floats with AVX-512, else 4 of 8) and the output (1 vector
// of 8) stay in registers instead of going through small buffers, and the backward adds each expert's parameter
// gradients for all its pairs of a block while they are held in registers (the pairs of one expert in the order the
// generic code adds them). Lanes are independent, so the vector width never changes a result.

template <typename T>
struct Hidden8 {
  static constexpr int64_t L = kWideLanes<T>, NV = 32 / L;  // 32 hidden units in NV vectors of L lanes
  Wide<T> pre[NV], z[NV];
};

// Mlp::hidden: pre = b1 + ((sum over even channels) + (sum over odd channels)), z = max(pre, 0)
template <typename T>
inline Hidden8<T> hidden8(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ b1) {
  constexpr int64_t L = Hidden8<T>::L, NV = Hidden8<T>::NV;
  Wide<T> a0[NV] = {}, a1[NV] = {};
  for (int64_t i = 0; i < 8; i += 2)
    for (int64_t v = 0; v < NV; ++v) {
      a0[v] += x[i] * load_wide(w1 + i * 32 + v * L);
      a1[v] += x[i + 1] * load_wide(w1 + (i + 1) * 32 + v * L);
    }
  Hidden8<T> r;
  const Wide<T> zero = {};
  for (int64_t v = 0; v < NV; ++v) {
    a0[v] += a1[v];
    r.pre[v] = load_wide(b1 + v * L) + a0[v];
    r.z[v] = r.pre[v] < zero ? zero : r.pre[v];  // std::max(pre, 0)
  }
  return r;
}

// ((s0 + s1) + s2) + s3 for the 8 columns of the (32, 8) matrix w, s the partial sums of z[h] * w[h] over the rows
// h = s mod 4 (Mlp::output's sum, vec_mat_c with S = 4); z: the 32 values in Hidden8's vectors
template <typename T>
inline Vec<T> rows8(const Wide<T>* z, const T* __restrict__ w) {
  alignas(64) T zs[32];
  for (int64_t v = 0; v < Hidden8<T>::NV; ++v) store_vec(z[v], zs + v * Hidden8<T>::L);
  Vec<T> o[4] = {};
  for (int64_t i = 0; i < 32; i += 4)
    for (int64_t s = 0; s < 4; ++s) o[s] += zs[i + s] * load_lanes(w + (i + s) * 8);
  o[0] += o[1];
  o[0] += o[2];
  o[0] += o[3];
  return o[0];
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// the same sums with AVX-512: the partial sums s0 | s1 and s2 | s3 in the two halves of two 16-float registers, so
// rows h and h + 1 of w (16 contiguous floats) are one load and one multiply-add; the same operations per element
template <>
inline Vec<float> rows8<float>(const Wide<float>* z, const float* __restrict__ w) {
  __m512 p01 = _mm512_setzero_ps(), p23 = _mm512_setzero_ps();
  for (int i = 0; i < 32; i += 4) {
    const __m512 zv = reinterpret_cast<const __m512&>(z[i / 16]);
    const int j = i % 16;  // z[i + s] is lane j + s of zv: [z[i] x 8 | z[i + 1] x 8] and [z[i + 2] x 8 | z[i + 3] x 8]
    const __m512i m01 = _mm512_set_epi32(j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j, j, j, j, j, j, j, j);
    const __m512i m23 = _mm512_add_epi32(m01, _mm512_set1_epi32(2));
    p01 = _mm512_fmadd_ps(_mm512_permutexvar_ps(m01, zv), _mm512_loadu_ps(w + i * 8), p01);
    p23 = _mm512_fmadd_ps(_mm512_permutexvar_ps(m23, zv), _mm512_loadu_ps(w + (i + 2) * 8), p23);
  }
  __m256 o = _mm256_add_ps(_mm512_castps512_ps256(p01), _mm512_extractf32x8_ps(p01, 1));
  o = _mm256_add_ps(o, _mm512_castps512_ps256(p23));
  o = _mm256_add_ps(o, _mm512_extractf32x8_ps(p23, 1));
  Vec<float> r;
  std::memcpy(&r, &o, sizeof(r));
  return r;
}
#endif

// Mlp::output: b2 + (((s0 + s1) + s2) + s3)
template <typename T>
inline Vec<T> output8(const Wide<T>* z, const T* __restrict__ w2, const T* __restrict__ b2) {
  return load_lanes(b2) + rows8(z, w2);
}

// the generic forward's pairs of one block (kBlock tokens at most) for C = 8, H = 32: the mixture into yb
template <typename T>
void forward_block8(const Dims& d, int64_t b, int64_t n0, int64_t nb, const T* xb, const T* wp, const int64_t* ep,
                    const Params<T>& P, bool skip_zero, std::atomic<bool>& valid, T* outs, T* yb) {
  const int64_t N = d.N, K = d.K;
  for (int64_t q = 0; q < nb; ++q) {
    Vec<T> acc = {};
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = (b * K + j) * N + n0 + q;
      const T wt = wp[p];
      if (skip_zero && wt == T(0)) continue;
      const int64_t ex = ep[p];
      if (ex < 0 || ex >= d.E) {
        valid.store(false, std::memory_order_relaxed);
        continue;
      }
      const Hidden8<T> hd = hidden8(xb + q * 8, P.w1 + ex * 256, P.b1 + ex * 32);
      const Vec<T> out = output8(hd.z, P.w2 + ex * 256, P.b2 + ex * 8);
      if (outs != nullptr) store_vec(out, outs + p * 8);
      acc += wt * out;
    }
    store_vec(acc, yb + q * 8);
  }
}

// per pair of a block, kept between the two passes of backward_block8
template <typename T>
struct PairBuf {
  alignas(64) T z[32];
  alignas(64) T gz[32];
  alignas(64) T go[8];
};

// acc rows (R rows of 32) += a(s)[i] * v(s) for the listed pairs s, in list order, the R rows held in registers
template <typename T, int64_t R, typename A, typename V>
inline void add_rows(T* __restrict__ acc, const int64_t* list, int64_t m, const A& a, const V& v) {
  constexpr int64_t L = Hidden8<T>::L, NV = Hidden8<T>::NV;
  Wide<T> r[R][NV];
  for (int64_t i = 0; i < R; ++i)
    for (int64_t u = 0; u < NV; ++u) r[i][u] = load_wide(acc + i * 32 + u * L);
  for (int64_t t = 0; t < m; ++t) {
    const T* av = a(list[t]);
    const T* vv = v(list[t]);
    for (int64_t i = 0; i < R; ++i) {
      const T ai = av[i];
      for (int64_t u = 0; u < NV; ++u) r[i][u] += ai * load_wide(vv + u * L);
    }
  }
  for (int64_t i = 0; i < R; ++i)
    for (int64_t u = 0; u < NV; ++u) store_vec(r[i][u], acc + i * 32 + u * L);
}

// backward_impl's pairs of one block for C = 8, H = 32. Pass 1, pair by pair: the hidden layer again, the gate
// gradient, the hidden gradient and the token gradient (into gxb, which holds the residual gradient); pass 2, expert by
// expert: the parameter gradients of its pairs in pair order (q, then j), as PairGrad adds them
template <typename T>
void backward_block8(const Dims& d, int64_t b, int64_t n0, int64_t nb, const T* xb, const T* gb, const T* wp,
                     const int64_t* ep, const Params<T>& P, bool skip_zero, const T* outs, Grads<T>& g, T* gxb,
                     T* gwp, PairBuf<T>* pb, int64_t* lists, int64_t* counts) {
  const int64_t N = d.N, K = d.K, E = d.E;
  std::fill(counts, counts + E, int64_t(0));
  for (int64_t q = 0; q < nb; ++q) {
    const T* gy = gb + q * 8;
    Vec<T> gx = load_lanes(gxb + q * 8);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = (b * K + j) * N + n0 + q;
      const T wt = wp[p];
      if (skip_zero && wt == T(0)) {
        gwp[p] = T(0);
        continue;
      }
      const int64_t ex = ep[p], slot = q * K + j;
      const Hidden8<T> hd = hidden8(xb + q * 8, P.w1 + ex * 256, P.b1 + ex * 32);
      const T* out = outs + p * 8;
      T dot = T(0);
      for (int64_t c = 0; c < 8; ++c) dot += out[c] * gy[c];
      gwp[p] = dot;
      const Vec<T> go = wt * load_lanes(gy);
      alignas(64) T gos[8];
      store_vec(go, gos);
      constexpr int64_t L = Hidden8<T>::L, NV = Hidden8<T>::NV;
      Wide<T> a0[NV] = {}, a1[NV] = {};
      const T* w2t = P.w2t + ex * 256;
      for (int64_t c = 0; c < 8; c += 2)
        for (int64_t u = 0; u < NV; ++u) {
          a0[u] += gos[c] * load_wide(w2t + c * 32 + u * L);
          a1[u] += gos[c + 1] * load_wide(w2t + (c + 1) * 32 + u * L);
        }
      PairBuf<T>& pr = pb[slot];
      const Wide<T> zero = {};
      Wide<T> gz[NV];
      for (int64_t u = 0; u < NV; ++u) {
        a0[u] += a1[u];
        gz[u] = zero + a0[u];
        gz[u] = hd.pre[u] > zero ? gz[u] : zero;
        store_vec(gz[u], pr.gz + u * L);
        store_vec(hd.z[u], pr.z + u * L);
      }
      store_vec(go, pr.go);
      gx += rows8(gz, P.w1t + ex * 256);
      lists[ex * kBlock * K + counts[ex]++] = slot;
    }
    store_vec(gx, gxb + q * 8);
  }
  for (int64_t ex = 0; ex < E; ++ex) {
    const int64_t m = counts[ex];
    if (m == 0) continue;
    const int64_t* list = lists + ex * kBlock * K;
    Vec<T> b2 = load_lanes(g.b2 + ex * 8);
    constexpr int64_t L = Hidden8<T>::L, NV = Hidden8<T>::NV, R = 8 / NV;  // R rows: 8 accumulators
    Wide<T> b1[NV];
    for (int64_t u = 0; u < NV; ++u) b1[u] = load_wide(g.b1 + ex * 32 + u * L);
    for (int64_t t = 0; t < m; ++t) {
      b2 += load_lanes(pb[list[t]].go);
      for (int64_t u = 0; u < NV; ++u) b1[u] += load_wide(pb[list[t]].gz + u * L);
    }
    store_vec(b2, g.b2 + ex * 8);
    for (int64_t u = 0; u < NV; ++u) store_vec(b1[u], g.b1 + ex * 32 + u * L);
    for (int64_t c = 0; c < 8; c += R) {
      add_rows<T, R>(
          g.w2t + ex * 256 + c * 32, list, m, [&](int64_t s) { return pb[s].go + c; },
          [&](int64_t s) { return pb[s].z; });
      add_rows<T, R>(
          g.w1 + ex * 256 + c * 32, list, m, [&](int64_t s) { return xb + (s / K) * 8 + c; },
          [&](int64_t s) { return pb[s].gz; });
    }
  }
}

// returns false (the output is then garbage) if an expert index lies outside [0, E): checked as the pairs are met,
// so valid inputs pay one predictable branch per pair instead of extra passes over the indices
template <typename T, int64_t CT, int64_t HT>
bool forward_impl(const Dims d, const T* hp, const T* wp, const int64_t* ep, Params<T> P, bool skip_zero,
                  Dropout drop, bool serial, T* yp, T* outs) {
  std::atomic<bool> valid{true};
  const bool registers = register_path.load();
  const Mlp<T, CT, HT> mlp(d);
  const int64_t C = mlp.C(), H = mlp.H(), N = d.N, K = d.K, nblk = (N + kBlock - 1) / kBlock;
  run_blocks(d.B * nblk, serial, [&](int64_t i0, int64_t i1, int64_t) {
    std::vector<T> buf(3 * kBlock * C + C + 2 * H);
    T *xb = buf.data(), *yb = xb + kBlock * C, *fb = yb + kBlock * C, *out = fb + kBlock * C, *pre = out + C;
    T* z = pre + H;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nblk, n0 = (i % nblk) * kBlock, nb = std::min(kBlock, N - n0);
      load_block(hp + b * C * N + n0, C, N, nb, xb);
      if (CT == 8 && HT == 32 && registers) {
        forward_block8(d, b, n0, nb, xb, wp, ep, P, skip_zero, valid, outs, yb);
      } else {
        std::fill(yb, yb + nb * C, T(0));
        for (int64_t q = 0; q < nb; ++q) {
          for (int64_t j = 0; j < K; ++j) {
            const int64_t p = (b * K + j) * N + n0 + q;
            const T wt = wp[p];
            if (skip_zero && wt == T(0)) continue;
            if (ep[p] < 0 || ep[p] >= d.E) {
              valid.store(false, std::memory_order_relaxed);
              continue;
            }
            mlp.hidden(xb + q * C, P, ep[p], pre, z);
            mlp.output(z, P, ep[p], out);
            if (outs != nullptr) std::copy(out, out + C, outs + p * C);  // kept for the backward
            T* __restrict__ acc = yb + q * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += wt * out[c];
          }
        }
      }
      drop.factors((b * N + n0) * C, nb * C, fb);  // from the token-major index of the block's first element
      for (int64_t k = 0; k < nb * C; ++k) yb[k] = xb[k] + fb[k] * yb[k];
      store_block(yb, C, N, nb, yp + b * C * N + n0);
    }
  });
  return valid.load();
}

template <typename T, int64_t CT, int64_t HT>
struct PairGrad {
  Mlp<T, CT, HT> mlp;
  T *pre, *z, *gz, *go;

  // one (token, expert) pair: adds to the expert's parameter gradients and to gx; returns d loss / d gate weight.
  // out: the expert's output kept by the forward (the hidden layer is recomputed: cheaper than keeping it)
  inline T operator()(const T* x, const T* gy, T wt, const Params<T>& P, int64_t ex, const T* out, Grads<T>& g,
                      T* gx) const {
    const int64_t C = mlp.C(), H = mlp.H();
    mlp.hidden(x, P, ex, pre, z);
    T dot = T(0);
    for (int64_t c = 0; c < C; ++c) dot += out[c] * gy[c];
    for (int64_t c = 0; c < C; ++c) go[c] = wt * gy[c];
    for (int64_t c = 0; c < C; ++c) g.b2[ex * C + c] += go[c];
    ao<T, HT>(g.w2t + ex * C * H, go, z, C, H);  // W2's gradient transposed: (C, H) rows are faster
    std::fill(gz, gz + H, T(0));
    vm<T, HT>(gz, go, P.w2t + ex * C * H, C, H);
    for (int64_t h = 0; h < H; ++h) gz[h] = pre[h] > T(0) ? gz[h] : T(0);
    for (int64_t h = 0; h < H; ++h) g.b1[ex * H + h] += gz[h];
    ao<T, HT>(g.w1 + ex * C * H, x, gz, C, H);
    vm<T, CT>(gx, gz, P.w1t + ex * H * C, H, C);
    return dot;
  }
};

template <typename T, int64_t CT, int64_t HT>
void backward_impl(const Dims d, const T* gyp, const T* hp, const T* wp, const int64_t* ep, Params<T> P,
                   bool skip_zero, Dropout drop, bool serial, const T* outs, T* ghp, T* gwp, T* accp,
                   int64_t stride) {
  const bool registers = register_path.load();
  const Mlp<T, CT, HT> mlp(d);
  const int64_t C = mlp.C(), H = mlp.H(), N = d.N, K = d.K, nblk = (N + kBlock - 1) / kBlock;
  run_blocks(d.B * nblk, serial, [&](int64_t i0, int64_t i1, int64_t slot) {
    Grads<T> g(accp + slot * stride, d.E, C, H);
    std::vector<T> buf(4 * kBlock * C + 2 * C + 3 * H);
    T *xb = buf.data(), *gb = xb + kBlock * C, *gxb = gb + kBlock * C, *fb = gxb + kBlock * C;
    T* rest = fb + kBlock * C;
    const PairGrad<T, CT, HT> pair{mlp, rest, rest + H, rest + 2 * H, rest + 3 * H};
    const bool fast = CT == 8 && HT == 32 && registers;
    std::vector<PairBuf<T>> pbuf(fast ? kBlock * K : 0);
    std::vector<int64_t> lists(fast ? d.E * kBlock * K : 0), counts(fast ? d.E : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nblk, n0 = (i % nblk) * kBlock, nb = std::min(kBlock, N - n0);
      load_block(hp + b * C * N + n0, C, N, nb, xb);
      load_block(gyp + b * C * N + n0, C, N, nb, gb);
      drop.factors((b * N + n0) * C, nb * C, fb);
      for (int64_t k = 0; k < nb * C; ++k) gxb[k] = gb[k], gb[k] *= fb[k];  // residual; mask
      if (CT == 8 && HT == 32 && registers) {
        backward_block8(d, b, n0, nb, xb, gb, wp, ep, P, skip_zero, outs, g, gxb, gwp, pbuf.data(), lists.data(),
                        counts.data());
      } else {
        for (int64_t q = 0; q < nb; ++q) {
          for (int64_t j = 0; j < K; ++j) {
            const int64_t p = (b * K + j) * N + n0 + q;
            const bool skip = skip_zero && wp[p] == T(0);
            gwp[p] = skip ? T(0) : pair(xb + q * C, gb + q * C, wp[p], P, ep[p], outs + p * C, g, gxb + q * C);
          }
        }
      }
      store_block(gxb, C, N, nb, ghp + b * C * N + n0);
    }
  });
}


// dst[e] = src[e] transposed for each of the n matrices (rows, cols) of src (transpose_block's tiles: torch's strided
// copy of the same transpose took several times as long, a fixed cost that dominated the backward of the deep
// stages, whose few voxels make little other work). Copies only
template <typename T>
void transpose_each(const T* __restrict__ src, T* __restrict__ dst, int64_t n, int64_t rows, int64_t cols) {
  for (int64_t e = 0; e < n; ++e) transpose_block(src + e * rows * cols, cols, dst + e * rows * cols, rows, rows, cols);
}

// the (E, rows, cols) tensor t transposed to (E, cols, rows), contiguous; the experts shared out among torch's threads
// when there are at least kParallelCopy values (the deep stages' weights: 0.5 MB per tensor at C = 64)
constexpr int64_t kParallelCopy = int64_t(1) << 15;
at::Tensor transposed(const at::Tensor& tensor) {
  const at::Tensor t = tensor.contiguous();
  const int64_t rows = t.size(1), cols = t.size(2), size = rows * cols;
  at::Tensor out = at::empty({t.size(0), cols, rows}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "dmoe_transpose", [&] {
    const scalar_t* src = t.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    run_blocks(t.size(0), t.numel() < kParallelCopy, [&](int64_t e0, int64_t e1, int64_t) {
      transpose_each(src + e0 * size, dst + e0 * size, e1 - e0, rows, cols);
    });
  });
  return out;
}

// C = 8, H = 32 (the first two stages of the default network, most of the work) get compile-time sizes and the
// register code; every other size the generic loops (with AVX2, GCC 12 compiled the C = 16 specialisation 3-4x slower
// than the generic loops)
template <typename F>
void by_size(int64_t C, int64_t H, F&& f) {
  using std::integral_constant;
  if (C == 8 && H == 32) return f(integral_constant<int64_t, 8>{}, integral_constant<int64_t, 32>{});
  return f(integral_constant<int64_t, 0>{}, integral_constant<int64_t, 0>{});
}

template <typename T>
Params<T> params(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                 const at::Tensor& w1t, const at::Tensor& w2t) {
  return {w1.data_ptr<T>(), b1.data_ptr<T>(), w2.data_ptr<T>(),
          b2.data_ptr<T>(), w1t.data_ptr<T>(), w2t.data_ptr<T>()};
}

bool serial(const Dims& d) {
  return d.B * d.N * d.K * d.C * d.H < kSerialWork;
}

Dropout dropout(const at::Tensor& draws, int64_t threshold, double scale) {
  return {draws.numel() ? reinterpret_cast<const int16_t*>(draws.data_ptr<int64_t>()) : nullptr, threshold, scale};
}

// clear errors for inputs the kernels cannot take (they index memory with the expert numbers)
Dims checked_dims(const at::Tensor& h, const at::Tensor& w, const at::Tensor& e, const at::Tensor& w1) {
  TORCH_CHECK(h.dim() == 3 && w.dim() == 3 && e.dim() == 3 && w1.dim() == 3,
              "dmoe experts: expected 3-d h, weights, experts and w1");
  const Dims d{h.size(0), h.size(1), h.size(2), w.size(1), w1.size(0), w1.size(2)};
  TORCH_CHECK(w.sizes() == e.sizes() && w.size(0) == d.B && w.size(2) == d.N && w1.size(1) == d.C,
              "dmoe experts: shapes of h ", h.sizes(), ", weights ", w.sizes(), ", experts ", e.sizes(), ", w1 ",
              w1.sizes(), " do not match");
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous() && e.is_contiguous() && e.scalar_type() == at::kLong,
              "dmoe experts: h, weights and int64 experts must be contiguous");
  return d;
}

// keep_out: also return every pair's expert output (B, K, N, C) for the backward (else an empty tensor)
std::vector<at::Tensor> experts_forward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& e,
                                        const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                        const at::Tensor& b2, bool skip_zero, const at::Tensor& draws,
                                        int64_t threshold, double scale, bool keep_out) {
  const Dims d = checked_dims(h, w, e, w1);
  at::Tensor y = at::empty_like(h);
  at::Tensor outs = at::empty({keep_out ? d.B * d.K * d.N * d.C : 0}, h.options());  // skipped pairs: never read
  bool valid = true;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dmoe_experts_forward", [&] {
    const Params<scalar_t> P = params<scalar_t>(w1, b1, w2, b2, w1, w2);  // the transposes: backward only
    by_size(d.C, d.H, [&](auto ct, auto ht) {
      valid = forward_impl<scalar_t, decltype(ct)::value, decltype(ht)::value>(
          d, h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), e.data_ptr<int64_t>(), P, skip_zero,
          dropout(draws, threshold, scale), serial(d), y.data_ptr<scalar_t>(),
          keep_out ? outs.data_ptr<scalar_t>() : nullptr);
    });
  });
  TORCH_CHECK(valid, "dmoe experts: expert indices must lie in [0, ", d.E, ")");
  return {y, outs};
}

std::vector<at::Tensor> experts_backward(const at::Tensor& gy, const at::Tensor& h, const at::Tensor& w,
                                         const at::Tensor& e, const at::Tensor& w1, const at::Tensor& b1,
                                         const at::Tensor& w2, const at::Tensor& b2, bool skip_zero,
                                         const at::Tensor& draws, int64_t threshold, double scale,
                                         const at::Tensor& outs) {
  const Dims d{h.size(0), h.size(1), h.size(2), w.size(1), w1.size(0), w1.size(2)};
  TORCH_CHECK(outs.numel() == d.B * d.K * d.N * d.C, "experts_backward: outs must be the forward's keep_out output");
  const int64_t E = d.E, C = d.C, H = d.H, stride = E * (2 * C * H + H + C);
  at::Tensor acc = at::zeros({accumulator_slots(serial(d)), stride}, h.options());
  at::Tensor gh = at::empty_like(h), gw = at::empty_like(w);
  at::Tensor w1t = transposed(w1), w2t = transposed(w2);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dmoe_experts_backward", [&] {
    const Params<scalar_t> P = params<scalar_t>(w1, b1, w2, b2, w1t, w2t);
    by_size(C, H, [&](auto ct, auto ht) {
      backward_impl<scalar_t, decltype(ct)::value, decltype(ht)::value>(
          d, gy.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), e.data_ptr<int64_t>(), P,
          skip_zero, dropout(draws, threshold, scale), serial(d),
          outs.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
          acc.data_ptr<scalar_t>(), stride);
    });
  });
  // one accumulator (a serial call) is the total already: it starts at +0 and is never -0, so summing the single
  // row would give the same bits
  auto parts = (acc.size(0) == 1 ? acc[0] : acc.sum(0)).split_with_sizes({E * C * H, E * H, E * H * C, E * C});
  at::Tensor gw2 = transposed(parts[2].view({E, C, H}));
  return {gh, gw, parts[0].view({E, C, H}), parts[1].view({E, H}), gw2, parts[3].view({E, C})};
}

// the experts' mixture, residual and dropout as one autograd node with the kernels above as its forward and backward
// (written in C++ so that a training step does not pay Python's call overhead for it, twice per layer). keep: the
// forward keeps every pair's output for the backward (set by experts() below when a gradient will be needed)
struct ExpertsNode : public torch::autograd::Function<ExpertsNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w,
                            const at::Tensor& e, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                            const at::Tensor& b2, bool skip_zero, const at::Tensor& draws, int64_t threshold,
                            double scale, bool keep) {
    std::vector<at::Tensor> r = experts_forward(h, w, e, w1, b1, w2, b2, skip_zero, draws, threshold, scale, keep);
    ctx->save_for_backward({h, w, e, w1, b1, w2, b2, draws, r[1]});
    ctx->saved_data["skip_zero"] = skip_zero;
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["scale"] = scale;
    return r[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list s = ctx->get_saved_variables();
    const at::Tensor gy = grads[0].to(s[0].scalar_type()).contiguous();
    std::vector<at::Tensor> g = experts_backward(gy, s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                                                 ctx->saved_data["skip_zero"].toBool(), s[7],
                                                 ctx->saved_data["threshold"].toInt(),
                                                 ctx->saved_data["scale"].toDouble(), s[8]);
    const at::Tensor none;
    return {g[0], g[1], none, g[2], g[3], g[4], g[5], none, none, none, none, none};
  }
};

// switch the C = 8, H = 32 register code on (default) or off; returns the previous setting
bool set_register_path(bool enabled) {
  return register_path.exchange(enabled);
}

}  // namespace

namespace fairdro_dmoe {

at::Tensor experts(const at::Tensor& h, const at::Tensor& w, const at::Tensor& e, const at::Tensor& w1,
                   const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, bool skip_zero,
                   const at::Tensor& draws, int64_t threshold, double scale) {
  const bool keep = at::GradMode::is_enabled() && (h.requires_grad() || w.requires_grad() || w1.requires_grad() ||
                                                   b1.requires_grad() || w2.requires_grad() || b2.requires_grad());
  return ExpertsNode::apply(h, w, e, w1, b1, w2, b2, skip_zero, draws, threshold, scale, keep);
}

}  // namespace fairdro_dmoe

TORCH_LIBRARY(fairdro_dmoe, m) {
  m.def(
      "experts_forward(Tensor h, Tensor w, Tensor e, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool skip_zero,"
      " Tensor draws, int threshold, float scale, bool keep_out) -> Tensor[]");
  m.def(
      "experts_backward(Tensor gy, Tensor h, Tensor w, Tensor e, Tensor w1, Tensor b1, Tensor w2, Tensor b2,"
      " bool skip_zero, Tensor draws, int threshold, float scale, Tensor outs) -> Tensor[]");
  m.def(
      "experts(Tensor h, Tensor w, Tensor e, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool skip_zero,"
      " Tensor draws, int threshold, float scale) -> Tensor",
      &fairdro_dmoe::experts);
  m.def("set_register_path(bool enabled) -> bool", &set_register_path);
}

TORCH_LIBRARY_IMPL(fairdro_dmoe, CPU, m) {
  m.impl("experts_forward", &experts_forward);
  m.impl("experts_backward", &experts_backward);
}
