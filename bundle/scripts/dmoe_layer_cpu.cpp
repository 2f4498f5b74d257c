// The dMoE layer's forward on the native path in one call (dmoe.py's DMoE uses it in eager mode on the CPU when every
// case has a named subgroup and no load-balancing loss is asked for): the router noise, its term
// noise * softplus(h W_a^noise) with torch's own ops (autograd records them exactly as it does for the same calls
// from Python), the router node, the dropout draws and the experts node. The same ops in the same order as the
// Python steps it replaces (scripts/dmoe_native.py: randn, native_route, lane_draws, native_experts), so the same
// values, gradients and random numbers; one call instead of about thirty Python steps per layer and training step.
//
// h (B, C, N) contiguous; sub (B,) int64 in [0, G); router_w, noise_w (G, C, E); expert parameters as in
// dmoe_cpu.cpp. noise: add the router noise (training); dropout: draw a mask with the lane threshold and scale of
// dmoe_native.lane_threshold; fast_normal / fast_random: draw with the bulk generator (dmoe_native checked once that
// it equals torch here), else with torch's normal_ / random_(). Returns (y (B, C, N), weights, experts (B, k, N)).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "dmoe_ops.h"

namespace {

using namespace fairdro_dmoe;

// the router's noise offset noise * softplus(h W_a^noise), (B, E, N); empty without noise
at::Tensor noise_offset(const at::Tensor& h, const at::Tensor& sub, const at::Tensor& noise_w, bool noise,
                        bool fast_normal) {
  if (!noise) return at::empty({0}, h.options());
  at::Tensor z = at::empty({h.size(0), noise_w.size(2), h.size(2)}, h.options());
  if (fast_normal && z.scalar_type() == at::kFloat && z.numel() >= 16) {
    fill_normal(z);
  } else {
    z.normal_();
  }
  const at::Tensor logits = at::bmm(noise_w.index({sub}).transpose(1, 2).to(h.scalar_type()), h);
  return (z * at::softplus(logits, 1, 20)).contiguous();
}

// the dropout draws of h's B*C*N elements: three 16-bit lanes from each 63-bit draw (dmoe.lane_draws)
at::Tensor dropout_draws(const at::Tensor& h, bool dropout, bool fast_random) {
  at::Tensor draws = at::empty({dropout ? (h.numel() + 2) / 3 : 0}, h.options().dtype(at::kLong));
  if (!dropout) return draws;
  if (fast_random) {
    fill_random64(draws);
  } else {
    draws.random_();
  }
  return draws;
}

std::vector<at::Tensor> layer(const at::Tensor& h, const at::Tensor& sub, const at::Tensor& router_w,
                              const at::Tensor& noise_w, const at::Tensor& w1, const at::Tensor& b1,
                              const at::Tensor& w2, const at::Tensor& b2, int64_t k, bool noise, bool dropout,
                              int64_t threshold, double scale, bool fast_normal, bool fast_random) {
  TORCH_CHECK(h.dim() == 3 && h.is_contiguous(), "dmoe layer: h must be a contiguous (B, C, N) tensor");
  const auto dt = h.scalar_type();
  const at::Tensor offset = noise_offset(h, sub, noise_w, noise, fast_normal);
  const std::vector<at::Tensor> routed = router(h, router_w.to(dt).contiguous(), sub.contiguous(), offset, k);
  const at::Tensor draws = dropout_draws(h, dropout, fast_random);
  const at::Tensor p1 = w1.to(dt), q1 = b1.to(dt), p2 = w2.to(dt), q2 = b2.to(dt), w = routed[0].to(dt);
  const at::Tensor y =
      experts(h, w.contiguous(), routed[1].contiguous(), p1, q1, p2, q2, false, draws, threshold, scale);
  return {y, routed[0], routed[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fairdro_dmoe, m) {
  m.def(
      "layer(Tensor h, Tensor sub, Tensor router_w, Tensor noise_w, Tensor w1, Tensor b1, Tensor w2, Tensor b2,"
      " int k, bool noise, bool dropout, int threshold, float scale, bool fast_normal, bool fast_random) -> Tensor[]",
      &layer);
}
