// Random numbers for the dMoE layer's training forward (router noise, dropout draws) from torch's default CPU
// generator, the same values and the same generator state after the call as torch's own ops:
//   fill_normal(out):   out.normal_() for a contiguous float32 tensor of at least 16 elements;
//   fill_random64(out): out.random_() for a contiguous int64 tensor.
// torch draws those words from its Mersenne Twister one call at a time (about 1.5-2 ns a word on the 2-core
// machine); here the state is regenerated and tempered in whole blocks of 624 words in loops the compiler
// vectorises, and the Box-Muller step is torch's AVX2 one (its avx_mathfun.h) on the same 16-value chunks, shared out
// among torch's threads for large fills (the chunks are independent; the words stay serial).
// dmoe_native.py checks once per process that both agree with torch on this machine before using them.
//
// Torch's semantics reproduced (ATen/core/MT19937RNGEngine.h, DistributionsHelper.h, TransformationHelper.h,
// native/cpu/DistributionTemplates.h of the torch the extension is built against):
// - a word: after `--left == 0` regenerate (left = 624, next = 0); return temper(state[next++]);
// - a float uniform: (word & (2^24 - 1)) * 2^-24; a float normal fill of n >= 16: n uniforms, Box-Muller on every
//   whole chunk of 16 (pairs j, j + 8), then, when 16 does not divide n, 16 new uniforms over the last 16 elements
//   and Box-Muller on them;
// - an int64 draw: (first word << 32 | second word) mod 2^63.

#include <torch/extension.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <c10/util/MathConstants.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "dmoe_cpu_common.h"
#include "dmoe_ops.h"

#if defined(__AVX2__) && defined(__FMA__)
#define FAIRDRO_RNG_FAST 1
#ifndef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY_AVX2  // avx_mathfun.h is compiled for that capability only
#endif
#include <ATen/native/cpu/avx_mathfun.h>
#else
#define FAIRDRO_RNG_FAST 0
#endif

namespace fairdro_dmoe {
namespace {

constexpr int kN = 624;
constexpr int kM = 397;

inline uint32_t twist(uint32_t u, uint32_t v) {
  const uint32_t mixed = (u & 0x80000000u) | (v & 0x7fffffffu);
  return (mixed >> 1) ^ ((0u - (v & 1u)) & 0x9908b0dfu);
}

// a new block of 624 words in place (the Mersenne Twister recurrence, as torch's next_state)
void regenerate(uint32_t* s) {
  for (int i = 0; i < kN - kM; ++i) {  // reads s[i + 1] and s[i + M] before they change
    s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  }
  for (int i = kN - kM; i < kN - 1; ++i) {  // s[i + M - N] is 227 words behind: already new
    s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  }
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

inline uint32_t temper(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  return y ^ (y >> 18);
}

// the generator's words, taken in bulk: take(n, sink) hands sink(words, count) the next n words in runs of at
// most 624, in order, and leaves the engine where n single calls would
class WordStream {
 public:
  explicit WordStream(at::mt19937_data_pod& d) : d_(d) {}

  template <typename Sink>
  void take(int64_t n, const Sink& sink) {
    uint32_t words[kN];
    while (n > 0) {
      if (d_.left_ == 1) {  // the next call would regenerate
        regenerate(d_.state_.data());
        d_.left_ = kN + 1;  // as after torch's regeneration, before its call consumed a word
        d_.next_ = 0;
      }
      const int64_t count = std::min<int64_t>(n, d_.left_ - 1);
      const uint32_t* s = d_.state_.data() + d_.next_;
      for (int64_t j = 0; j < count; ++j) {
        words[j] = temper(s[j]);
      }
      sink(words, count);
      d_.next_ += static_cast<uint32_t>(count);
      d_.left_ -= static_cast<int>(count);
      n -= count;
    }
  }

 private:
  at::mt19937_data_pod& d_;
};

// body(stream) with the default CPU generator locked and its engine's state advanced by what body took
template <typename Body>
void with_default_generator(const Body& body) {
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod d = engine.data();
  TORCH_CHECK(engine.is_valid(), "fairdro_dmoe: the default CPU generator is not seeded");
  WordStream stream(d);
  body(stream);
  engine.set_data(d);
  gen->set_engine(engine);
}

// uniform floats in [0, 1) from the next n words, written to out
void uniforms(WordStream& stream, float* out, int64_t n) {
  stream.take(n, [&](const uint32_t* w, int64_t count) {
    for (int64_t j = 0; j < count; ++j) {
      out[j] = static_cast<float>(w[j] & 0xffffffu) * (1.0f / 16777216.0f);
    }
    out += count;
  });
}

}  // namespace

#if FAIRDRO_RNG_FAST
constexpr int64_t kParallelFill = int64_t(1) << 15;

// Box-Muller on 16 uniforms in place (torch's float AVX2 step, mean 0 and std 1 applied as it applies them)
inline void box_muller16(float* data) {
  const __m256 u1 = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(data));
  const __m256 u2 = _mm256_loadu_ps(data + 8);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log256_ps(u1)));
  const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(2.0f * c10::pi<double>)), u2);
  __m256 sine, cosine;
  sincos256_ps(theta, &sine, &cosine);
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  _mm256_storeu_ps(data, _mm256_fmadd_ps(_mm256_mul_ps(radius, cosine), one, zero));
  _mm256_storeu_ps(data + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, sine), one, zero));
}

void fill_normal(at::Tensor out) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 16,
              "fill_normal: needs a contiguous float32 CPU tensor of at least 16 elements");
  float* data = out.data_ptr<float>();
  const int64_t n = out.numel(), chunks = n / 16;
  float tail[16];  // torch's second pass over the last 16 elements when 16 does not divide n: 16 more uniforms
  with_default_generator([&](WordStream& stream) {
    uniforms(stream, data, n);
    if (n % 16 != 0) uniforms(stream, tail, 16);
  });
  // the chunks are independent: shared out among torch's threads for large fills (the words above are serial)
  run_blocks(chunks, n < kParallelFill, [&](int64_t c0, int64_t c1, int64_t) {
    for (int64_t c = c0; c < c1; ++c) box_muller16(data + 16 * c);
  });
  if (n % 16 != 0) {
    std::copy(tail, tail + 16, data + n - 16);
    box_muller16(data + n - 16);
  }
}
#else
void fill_normal(at::Tensor out) {
  TORCH_CHECK(false, "fill_normal: this build has no AVX2/FMA code; use torch's normal_");
}
#endif

void fill_random64(at::Tensor out) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kLong && out.is_contiguous(),
              "fill_random64: needs a contiguous int64 CPU tensor");
  auto* data = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const int64_t n = out.numel();
  with_default_generator([&](WordStream& stream) {
    auto* slot = reinterpret_cast<uint32_t*>(data);  // the 2n words in order, two to a draw
    stream.take(2 * n, [&](const uint32_t* w, int64_t count) {
      std::copy(w, w + count, slot);
      slot += count;
    });
  });
  constexpr bool little = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;  // the first word of a draw is its high half
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t x = data[i];
    data[i] = (little ? (x << 32 | x >> 32) : x) & 0x7fffffffffffffffull;
  }
}

bool fast_normal_built() {
  return FAIRDRO_RNG_FAST;
}

}  // namespace fairdro_dmoe

TORCH_LIBRARY_FRAGMENT(fairdro_dmoe, m) {
  m.def("fill_normal(Tensor(a!) out) -> ()", &fairdro_dmoe::fill_normal);
  m.def("fill_random64(Tensor(a!) out) -> ()", &fairdro_dmoe::fill_random64);
  m.def("fast_normal_built() -> bool", &fairdro_dmoe::fast_normal_built);
}
