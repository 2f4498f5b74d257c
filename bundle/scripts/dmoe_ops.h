// The native dMoE ops one source file of the extension calls from another (dmoe_layer_cpu.cpp calls the others).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fairdro_dmoe {

// dmoe_cpu.cpp: the experts' mixture, residual and dropout as one autograd node (it keeps the pairs' outputs for
// the backward when grad mode is on and an input requires a gradient)
at::Tensor experts(const at::Tensor& h, const at::Tensor& w, const at::Tensor& e, const at::Tensor& w1,
                   const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, bool skip_zero,
                   const at::Tensor& draws, int64_t threshold, double scale);

// dmoe_router_cpu.cpp: the router (gate weights and expert indices) as one autograd node
std::vector<at::Tensor> router(const at::Tensor& h, const at::Tensor& w, const at::Tensor& sub,
                               const at::Tensor& offset, int64_t k);

// dmoe_rng_cpu.cpp: torch's normal_ (float32, >= 16 values; AVX2 builds) and int64 random_(), drawn in bulk
void fill_normal(at::Tensor out);
void fill_random64(at::Tensor out);
bool fast_normal_built();

}  // namespace fairdro_dmoe
