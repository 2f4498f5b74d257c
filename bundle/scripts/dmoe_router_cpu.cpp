// Native CPU kernels of the dMoE router for cases with a named subgroup (bundle/scripts/dmoe_native.py builds them
// with dmoe_cpu.cpp into one extension).
//
// For every voxel t of case b, with subgroup a = sub[b] and router weights W (G, C, E):
//     logit[e] = h[t] W[a][:, e] + offset[b, e, t]          (offset: the router noise term, if given)
// then the k largest logits (ties: the lowest expert index, as scripts.dmoe.top_k_along) and a softmax over them:
// weights (B, k, N) and experts (B, k, N). The noise term randn * softplus(h W_noise) is computed by torch (its
// vectorised softplus; the random numbers are those of the Python router) and its gradient flows back through
// torch's autograd from goffset. Only the k chosen logits get gradient, as through the gather of the Python top-k.
// Router-weight gradients go to one accumulator per thread, summed in thread order.
//
// Shapes: h, gh (B, C, N); offset, goffset (B, E, N) or empty; sub (B,) int64 in [0, G);
// weights, experts, gweights (B, k, N).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "dmoe_cpu_common.h"
#include "dmoe_ops.h"

namespace {

using namespace fairdro_dmoe;

struct RouterDims {
  int64_t B, C, N, E, K, G;
};

// logits of one token: x (C) against the subgroup's W (C, E), plus its offset (E) if given
template <typename T, int64_t ET>
inline void logits(const RouterDims& d, const T* x, const T* w, const T* off, T* out) {
  const int64_t E = ET ? ET : d.E;
  if (off != nullptr) {
    std::copy(off, off + E, out);
  } else {
    std::fill(out, out + E, T(0));
  }
  vm<T, ET>(out, x, w, d.C, E);
}

// k rounds of "first maximum among the experts not yet taken", then the softmax over the k chosen logits
template <typename T, int64_t ET>
inline void top_k_softmax(const RouterDims& d, T* lg, T* p, int64_t* sel) {
  const int64_t E = ET ? ET : d.E;
  T total = T(0), top = T(0);
  for (int64_t j = 0; j < d.K; ++j) {
    int64_t best = 0;
    for (int64_t e = 1; e < E; ++e) best = lg[e] > lg[best] ? e : best;
    sel[j] = best;
    if (j == 0) top = lg[best];
    p[j] = j == 0 ? T(1) : std::exp(lg[best] - top);  // exp(0) = 1 exactly
    total += p[j];
    lg[best] = -std::numeric_limits<T>::infinity();  // taken
  }
  for (int64_t j = 0; j < d.K; ++j) p[j] /= total;
}

// ------------------------------------------------------------------------------------------------- lane kernels
// Full blocks are computed kLanes tokens at a time, one token per SIMD lane, reading the channel-first rows in place.
// Every lane performs the operations of the per-token code above on its token in the same order (the logits'
// partial sums of vec_mat_c<T, 8>, the first maximum in each round, std::exp, the softmax sums), so the results are
// bit-identical to it; the router-weight gradients are added token by token in the per-token code's order.

// logits of kLanes tokens (E = 8): h rows from hx (stride N), W (C, 8), offset rows from off (stride N) or none
template <typename T>
inline void lane_logits(const T* hx, const T* w, const T* off, int64_t C, int64_t N, Vec<T>* lg) {
  for (int64_t e = 0; e < 8; ++e) {
    Vec<T> acc[4] = {};
    int64_t i = 0;
    for (; i + 4 <= C; i += 4)
      for (int64_t s = 0; s < 4; ++s) acc[s] += load_lanes(hx + (i + s) * N) * w[(i + s) * 8 + e];
    for (; i < C; ++i) acc[0] += load_lanes(hx + i * N) * w[i * 8 + e];
    acc[0] += acc[1];
    acc[0] += acc[2];
    acc[0] += acc[3];
    lg[e] = (off != nullptr ? load_lanes(off + e * N) : Vec<T>{}) + acc[0];
  }
}

// top_k_softmax for kLanes tokens: p[j] the gates, sel[j] the experts (as T)
template <typename T>
inline void lane_top_k_softmax(int64_t K, Vec<T>* lg, Vec<T>* p, Vec<T>* sel) {
  Vec<T> total = {}, top = {};
  for (int64_t j = 0; j < K; ++j) {
    Vec<T> best = lg[0], at = {};
    for (int64_t e = 1; e < 8; ++e) {
      const auto more = lg[e] > best;
      at = more ? splat(T(e)) : at;
      best = more ? lg[e] : best;
    }
    sel[j] = at;
    if (j == 0) top = best;
    if (j == 0) {
      p[j] = splat(T(1));
    } else {
      const Vec<T> d = best - top;
      for (int64_t l = 0; l < kLanes; ++l) p[j][l] = std::exp(d[l]);
    }
    total += p[j];
    for (int64_t e = 0; e < 8; ++e) lg[e] = at == splat(T(e)) ? splat(-std::numeric_limits<T>::infinity()) : lg[e];
  }
  for (int64_t j = 0; j < K; ++j) p[j] /= total;
}

// a full block of kLanes-token groups (E = 8, k <= 8)
template <typename T>
void lane_forward_block(const RouterDims& d, int64_t b, int64_t n0, const T* hp, const T* w, const T* offset, T* outw,
                        int64_t* oute) {
  const int64_t C = d.C, K = d.K, N = d.N;
  Vec<T> lg[8], p[8], sel[8];
  for (int64_t q = 0; q < kBlock; q += kLanes) {
    const int64_t n = n0 + q;
    lane_logits<T>(hp + b * C * N + n, w, offset != nullptr ? offset + b * 8 * N + n : nullptr, C, N, lg);
    lane_top_k_softmax<T>(K, lg, p, sel);
    for (int64_t j = 0; j < K; ++j) {
      store_vec(p[j], outw + (b * K + j) * N + n);
      for (int64_t l = 0; l < kLanes; ++l) oute[(b * K + j) * N + n + l] = static_cast<int64_t>(sel[j][l]);
    }
  }
}

template <typename T, int64_t ET>
void forward_impl(const RouterDims d, const T* hp, const T* wp, const int64_t* sub, const T* offset, T* outw,
                  int64_t* oute) {
  const bool serial = d.B * d.N * d.C * d.E < kSerialWork;
  const int64_t C = d.C, E = d.E, K = d.K, N = d.N, nblk = (N + kBlock - 1) / kBlock;
  run_blocks(d.B * nblk, serial, [&](int64_t i0, int64_t i1, int64_t) {
    std::vector<T> buf(kBlock * (C + E + K) + E);
    std::vector<int64_t> eb(kBlock * K);
    T *xb = buf.data(), *ob = xb + kBlock * C, *pb = ob + kBlock * E, *lg = pb + kBlock * K;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nblk, n0 = (i % nblk) * kBlock, nb = std::min(kBlock, N - n0);
      if (ET == 8 && nb == kBlock && K <= 8) {
        lane_forward_block(d, b, n0, hp, wp + sub[b] * C * E, offset, outw, oute);
        continue;
      }
      load_block(hp + b * C * N + n0, C, N, nb, xb);
      if (offset != nullptr) load_block(offset + b * E * N + n0, E, N, nb, ob);
      for (int64_t q = 0; q < nb; ++q) {
        logits<T, ET>(d, xb + q * C, wp + sub[b] * C * E, offset != nullptr ? ob + q * E : nullptr, lg);
        top_k_softmax<T, ET>(d, lg, pb + q * K, eb.data() + q * K);
      }
      store_block(pb, K, N, nb, outw + b * K * N + n0);
      store_block(eb.data(), K, N, nb, oute + b * K * N + n0);
    }
  });
}

// gradients of one token: softmax backward over its k gates into the chosen logits (-> gl, written to the token's
// offset gradient go if given), then into the logits' dot products: x's gradient gx and the subgroup's gw (C, E)
template <typename T>
inline void token_backward(const RouterDims& d, const T* x, const T* gp, const T* p, const int64_t* sel, const T* w,
                           T* gw, T* gx, T* go) {
  T dot = T(0);
  for (int64_t j = 0; j < d.K; ++j) dot += p[j] * gp[j];
  for (int64_t j = 0; j < d.K; ++j) {
    const int64_t e = sel[j];
    const T gl = p[j] * (gp[j] - dot);
    if (go != nullptr) go[e] = gl;
    for (int64_t c = 0; c < d.C; ++c) {
      gx[c] += gl * w[c * d.E + e];
      gw[c * d.E + e] += x[c] * gl;
    }
  }
}

// Whether lane_backward_block gives token_backward's bits for k gates. token_backward's sum over the k gates is one
// fused multiply-add per gate in order where GCC 12 (-O3 -mavx2 -mfma) leaves that loop scalar: for k up to 3 in
// float32 and k = 1 in float64; for more gates it vectorises the products (rounded apart, added in order), which the
// lanes do not copy, so those cases keep the per-token code (tests/test_dmoe_lanes.py compares the two paths).
template <typename T>
constexpr bool lane_backward_matches(int64_t k) {
  return std::is_same_v<T, float> ? k <= 3 : k == 1;
}

// token_backward's gate gradients for kLanes tokens, one per lane: gl[j] = p[j] (gp[j] - sum_i p[i] gp[i]), the
// gates p and their gradients gp read from rows of stride N (the first at pp, gpp)
template <typename T>
inline void lane_gate_grads(int64_t K, int64_t N, const T* pp, const T* gpp, Vec<T>* gl) {
  Vec<T> dot = {}, p[8];
  for (int64_t j = 0; j < K; ++j) {
    p[j] = load_lanes(pp + j * N);
    dot += p[j] * load_lanes(gpp + j * N);
  }
  for (int64_t j = 0; j < K; ++j) gl[j] = p[j] * (load_lanes(gpp + j * N) - dot);
}

// the offset gradient of kLanes tokens for each of the E experts (rows of stride N from go): gl[j] where expert e is
// the lane's j-th choice sel[j], else 0
template <typename T>
inline void store_offset_grads(int64_t K, int64_t E, int64_t N, const Vec<T>* gl, const Vec<T>* sel, T* go) {
  for (int64_t e = 0; e < E; ++e) {
    Vec<T> g = {};
    for (int64_t j = 0; j < K; ++j) g = sel[j] == splat(T(e)) ? gl[j] : g;
    store_vec(g, go + e * N);
  }
}

// token_backward for a full block, kLanes tokens at a time (k <= 8): the gate and logit gradients, the offset
// gradient and gx per lane; then the router-weight gradients token by token, in token_backward's order
template <typename T>
void lane_backward_block(const RouterDims& d, int64_t b, int64_t n0, const T* gpp, const T* hp, const T* w,
                         const int64_t* ep, const T* pp, T* ghp, T* gop, T* gw) {
  const int64_t C = d.C, E = d.E, K = d.K, N = d.N;
  Vec<T> gl[8], sel[8];
  for (int64_t q = 0; q < kBlock; q += kLanes) {
    const int64_t n = n0 + q;
    lane_gate_grads(K, N, pp + b * K * N + n, gpp + b * K * N + n, gl);
    for (int64_t j = 0; j < K; ++j)
      for (int64_t l = 0; l < kLanes; ++l) sel[j][l] = T(ep[(b * K + j) * N + n + l]);
    if (gop != nullptr) store_offset_grads(K, E, N, gl, sel, gop + b * E * N + n);
    for (int64_t c = 0; c < C; ++c) {
      Vec<T> gx = {};
      for (int64_t j = 0; j < K; ++j) {
        Vec<T> wc;
        for (int64_t l = 0; l < kLanes; ++l) wc[l] = w[c * E + static_cast<int64_t>(sel[j][l])];
        gx += gl[j] * wc;
      }
      store_vec(gx, ghp + (b * C + c) * N + n);
    }
    for (int64_t l = 0; l < kLanes; ++l)
      for (int64_t j = 0; j < K; ++j) {
        const int64_t e = static_cast<int64_t>(sel[j][l]);
        const T g = gl[j][l];
        for (int64_t c = 0; c < C; ++c) gw[c * E + e] += hp[(b * C + c) * N + n + l] * g;
      }
  }
}

#if defined(__AVX2__)
// lane_backward_block for float with C = 8 channels and E = 8 experts (the first two stages of the default network),
// the same operations per element in the same order: each lane's router-weight entry w[c, e] comes from the row
// w[c, :] by one permute per channel and gate (instead of eight scalar loads), and the router-weight gradients are
// added as rows per expert, gwt = gw transposed (E, C), one vector multiply-add per token and gate on the token's 8
// channels (the block's 8 x 8 tiles of h transposed to token-major). gw is transposed into gwt before the block and
// back after it (exact copies), so the accumulator keeps its layout for the per-token code. With register_path off
// (the tests) these blocks take lane_backward_block.
inline void lane_backward_block8(const RouterDims& d, int64_t b, int64_t n0, const float* gpp, const float* hp,
                                 const float* w, const int64_t* ep, const float* pp, float* ghp, float* gop,
                                 float* gw) {
  const int64_t K = d.K, N = d.N;
  __m256 wrow[8];
  for (int64_t c = 0; c < 8; ++c) wrow[c] = _mm256_loadu_ps(w + c * 8);
  alignas(32) float gwt[64], ht[64];
  transpose_tile(gw, 8, gwt, 8);
  Vec<float> gl[8], sel[8];
  __m256i idx[8];
  for (int64_t q = 0; q < kBlock; q += kLanes) {
    const int64_t n = n0 + q;
    lane_gate_grads(K, N, pp + b * K * N + n, gpp + b * K * N + n, gl);
    for (int64_t j = 0; j < K; ++j) {
      alignas(32) int32_t e32[8];
      for (int64_t l = 0; l < kLanes; ++l) {
        e32[l] = static_cast<int32_t>(ep[(b * K + j) * N + n + l]);
        sel[j][l] = float(e32[l]);
      }
      idx[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(e32));
    }
    if (gop != nullptr) store_offset_grads(K, int64_t(8), N, gl, sel, gop + b * 8 * N + n);
    for (int64_t c = 0; c < 8; ++c) {
      Vec<float> gx = {};
      for (int64_t j = 0; j < K; ++j) {
        Vec<float> wc;
        const __m256 v = _mm256_permutevar8x32_ps(wrow[c], idx[j]);  // lane l: w[c, sel[j][l]]
        std::memcpy(&wc, &v, sizeof(wc));
        gx += gl[j] * wc;
      }
      store_vec(gx, ghp + (b * 8 + c) * N + n);
    }
    transpose_tile(hp + b * 8 * N + n, N, ht, 8);  // ht[l * 8 + c] = h[c] of token n + l
    for (int64_t l = 0; l < kLanes; ++l)
      for (int64_t j = 0; j < K; ++j) {
        float* row = gwt + static_cast<int64_t>(sel[j][l]) * 8;
        store_vec(load_lanes(row) + load_lanes(ht + l * 8) * gl[j][l], row);
      }
  }
  transpose_tile(gwt, 8, gw, 8);
}
#endif

template <typename T>
void backward_impl(const RouterDims d, const T* gpp, const T* hp, const T* wp, const int64_t* sub, const int64_t* ep,
                   const T* pp, T* ghp, T* gop, T* accp, bool serial) {
  const int64_t C = d.C, E = d.E, K = d.K, N = d.N, nblk = (N + kBlock - 1) / kBlock;
  const int64_t stride = d.G * C * E;
  run_blocks(d.B * nblk, serial, [&](int64_t i0, int64_t i1, int64_t slot) {
    T* acc = accp + slot * stride;
    std::vector<T> buf(kBlock * (2 * C + E + 2 * K));
    std::vector<int64_t> eb(kBlock * K);
    T *xb = buf.data(), *gxb = xb + kBlock * C, *gob = gxb + kBlock * C;
    T *pb = gob + kBlock * E, *gb = pb + kBlock * K;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nblk, n0 = (i % nblk) * kBlock, nb = std::min(kBlock, N - n0), a = sub[b];
      if (nb == kBlock && lane_backward_matches<T>(K)) {
#if defined(__AVX2__)
        if constexpr (std::is_same_v<T, float>) {
          if (C == 8 && E == 8 && register_path.load(std::memory_order_relaxed)) {
            lane_backward_block8(d, b, n0, gpp, hp, wp + a * C * E, ep, pp, ghp, gop, acc + a * C * E);
            continue;
          }
        }
#endif
        lane_backward_block(d, b, n0, gpp, hp, wp + a * C * E, ep, pp, ghp, gop, acc + a * C * E);
        continue;
      }
      load_block(hp + b * C * N + n0, C, N, nb, xb);
      load_block(gpp + b * K * N + n0, K, N, nb, gb);
      load_block(pp + b * K * N + n0, K, N, nb, pb);
      load_block(ep + b * K * N + n0, K, N, nb, eb.data());
      std::fill(gxb, gxb + nb * C, T(0));
      std::fill(gob, gob + nb * E, T(0));
      for (int64_t q = 0; q < nb; ++q) {
        token_backward(d, xb + q * C, gb + q * K, pb + q * K, eb.data() + q * K, wp + a * C * E, acc + a * C * E,
                       gxb + q * C, gop != nullptr ? gob + q * E : nullptr);
      }
      store_block(gxb, C, N, nb, ghp + b * C * N + n0);
      if (gop != nullptr) store_block(gob, E, N, nb, gop + b * E * N + n0);
    }
  });
}

RouterDims router_dims(const at::Tensor& h, const at::Tensor& w, int64_t k) {
  return {h.size(0), h.size(1), h.size(2), w.size(2), k, w.size(0)};
}

std::vector<at::Tensor> router_forward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& sub,
                                       const at::Tensor& offset, int64_t k) {
  const RouterDims d = router_dims(h, w, k);
  TORCH_CHECK(h.dim() == 3 && w.dim() == 3 && w.size(1) == d.C && sub.numel() == d.B && h.is_contiguous(),
              "dmoe router: h (B, C, N) contiguous, w (G, C, E) and one subgroup per case expected");
  TORCH_CHECK(k >= 1 && k <= d.E, "dmoe router: k must lie in [1, ", d.E, "]");
  TORCH_CHECK(sub.scalar_type() == at::kLong &&
                  (d.B == 0 || (sub.min().item<int64_t>() >= 0 && sub.max().item<int64_t>() < d.G)),
              "dmoe router: subgroup indices must be int64 in [0, ", d.G, ")");
  TORCH_CHECK(offset.numel() == 0 || (offset.is_contiguous() && offset.numel() == d.B * d.E * d.N),
              "dmoe router: offset must be empty or a contiguous (B, E, N) tensor");
  at::Tensor weights = at::empty({d.B, k, d.N}, h.options());
  at::Tensor experts = at::empty({d.B, k, d.N}, sub.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dmoe_router_forward", [&] {
    const scalar_t* off = offset.numel() ? offset.data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto et) {
      forward_impl<scalar_t, decltype(et)::value>(d, h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                                  sub.data_ptr<int64_t>(), off, weights.data_ptr<scalar_t>(),
                                                  experts.data_ptr<int64_t>());
    };
    if (d.E == 8) {
      run(std::integral_constant<int64_t, 8>{});  // the default number of experts: unrolled
    } else {
      run(std::integral_constant<int64_t, 0>{});
    }
  });
  return {weights, experts};
}

std::vector<at::Tensor> router_backward(const at::Tensor& gweights, const at::Tensor& h, const at::Tensor& w,
                                        const at::Tensor& sub, const at::Tensor& experts, const at::Tensor& weights,
                                        bool offset_grad) {
  const RouterDims d = router_dims(h, w, experts.size(1));
  const bool serial = d.B * d.N * d.C * d.E < kSerialWork;
  at::Tensor acc = at::zeros({accumulator_slots(serial), w.numel()}, h.options());
  at::Tensor gh = at::empty_like(h);
  at::Tensor goffset = offset_grad ? at::empty({d.B, d.E, d.N}, h.options()) : at::empty({0}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dmoe_router_backward", [&] {
    backward_impl<scalar_t>(d, gweights.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                            sub.data_ptr<int64_t>(), experts.data_ptr<int64_t>(), weights.data_ptr<scalar_t>(),
                            gh.data_ptr<scalar_t>(), offset_grad ? goffset.data_ptr<scalar_t>() : nullptr,
                            acc.data_ptr<scalar_t>(), serial);
  });
  return {gh, acc.sum(0).view(w.sizes()), goffset};
}

// the router as one autograd node (forward and backward: the kernels above; the expert indices carry no gradient),
// in C++ so that a training step does not pay Python's call overhead for it
struct RouterNode : public torch::autograd::Function<RouterNode> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h,
                                                const at::Tensor& w, const at::Tensor& sub, const at::Tensor& offset,
                                                int64_t k) {
    std::vector<at::Tensor> r = router_forward(h, w, sub, offset, k);
    ctx->save_for_backward({h, w, sub, r[1], r[0]});
    ctx->saved_data["offset_grad"] = offset.numel() > 0;
    ctx->mark_non_differentiable({r[1]});
    return {r[0], r[1]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list s = ctx->get_saved_variables();
    const bool offset_grad = ctx->saved_data["offset_grad"].toBool();
    const at::Tensor gw = grads[0].to(s[0].scalar_type()).contiguous();
    std::vector<at::Tensor> g = router_backward(gw, s[0], s[1], s[2], s[3], s[4], offset_grad);
    const at::Tensor none;
    return {g[0], g[1], none, offset_grad ? g[2] : none, none};
  }
};

}  // namespace

namespace fairdro_dmoe {

std::vector<at::Tensor> router(const at::Tensor& h, const at::Tensor& w, const at::Tensor& sub,
                               const at::Tensor& offset, int64_t k) {
  return RouterNode::apply(h, w, sub, offset, k);
}

}  // namespace fairdro_dmoe

TORCH_LIBRARY_FRAGMENT(fairdro_dmoe, m) {
  m.def("router(Tensor h, Tensor w, Tensor sub, Tensor offset, int k) -> Tensor[]", &fairdro_dmoe::router);
  m.def("router_forward(Tensor h, Tensor w, Tensor sub, Tensor offset, int k) -> Tensor[]");
  m.def(
      "router_backward(Tensor gweights, Tensor h, Tensor w, Tensor sub, Tensor experts, Tensor weights,"
      " bool offset_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fairdro_dmoe, CPU, m) {
  m.impl("router_forward", &router_forward);
  m.impl("router_backward", &router_backward);
}
