// Dropout's random stream and mask application, compiled once per CPU capability. The AVX2 copy
// runs 8 Philox blocks per instruction; every copy yields the stream defined in cpu/kernels.h.
#include "common/vec.h"
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>

#include <limits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fused_optim {
namespace CPU_CAPABILITY {
namespace {

// The words of kGroups consecutive groups from group g, 32 per group in element order (see
// cpu/kernels.h).
template <int kGroups>
inline void group_words(uint64_t seed, uint64_t offset, int64_t g, uint32_t* words) {
#if defined(CPU_CAPABILITY_AVX2)
  // Philox4x32-10 on 8 counters per vector, kGroups independent vectors interleaved so the
  // multiplies of one hide the latency of the other. The constants are ATen's (private to its engine).
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int v = 0; v < kGroups; ++v) {
    const uint64_t first = 8 * static_cast<uint64_t>(g + v);  // 8 blocks never straddle 2^32
    c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    c1[v] = _mm256_set1_epi32(static_cast<int>(first >> 32));
    c2[v] = _mm256_set1_epi32(static_cast<int>(offset));
    c3[v] = _mm256_set1_epi32(static_cast<int>(offset >> 32));
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // 32x32 -> 64-bit products of every lane: even lanes directly, odd lanes shifted down.
  auto mulhilo = [](__m256i m, __m256i x, __m256i& lo, __m256i& hi) {
    const __m256i even = _mm256_mul_epu32(x, m);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  };
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kGroups; ++v) {
      __m256i lo0, hi0, lo1, hi1;
      mulhilo(mul_a, c0[v], lo0, hi0);
      mulhilo(mul_b, c2[v], lo1, hi1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int v = 0; v < kGroups; ++v) {
    auto* out = reinterpret_cast<__m256i*>(words + v * kDropoutGroup);
    _mm256_storeu_si256(out + 0, c0[v]);
    _mm256_storeu_si256(out + 1, c1[v]);
    _mm256_storeu_si256(out + 2, c2[v]);
    _mm256_storeu_si256(out + 3, c3[v]);
  }
#else
  for (int v = 0; v < kGroups; ++v) {
    for (int64_t j = 0; j < 8; ++j) {
      at::Philox4_32 engine(seed, offset, 8 * static_cast<uint64_t>(g + v) + j);
      for (int64_t k = 0; k < 4; ++k) {
        words[v * kDropoutGroup + 8 * k + j] = engine();
      }
    }
  }
#endif
}

// Calls f(first_element, n, keep) for every group overlapping [0, numel), in parallel, where
// keep[i] is 1 if element first + i is kept, else 0 (words compared without branches: the
// compiler turns `word < threshold` into an unpredictable branch otherwise).
template <typename F>
void for_each_group(int64_t numel, uint32_t threshold, uint64_t seed, uint64_t offset, const F& f) {
  using IVec = at::vec::Vectorized<int32_t>;
  // Unsigned compare through signed lanes: flip both sign bits.
  const IVec flip(std::numeric_limits<int32_t>::min());
  const IVec bound(static_cast<int32_t>(threshold ^ 0x80000000u));
  const int64_t groups = (numel + kDropoutGroup - 1) / kDropoutGroup;
  at::parallel_for(0, groups, 1024, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[2 * kDropoutGroup];
    alignas(64) int32_t keep[2 * kDropoutGroup];
    for (int64_t g = begin; g < end; g += 2) {
      const int64_t count = std::min<int64_t>(2, end - g);
      if (count == 2) {
        group_words<2>(seed, offset, g, words);
      } else {
        group_words<1>(seed, offset, g, words);
      }
      for (int64_t i = 0; i < count * kDropoutGroup; i += IVec::size()) {
        const IVec w = IVec::loadu(reinterpret_cast<const int32_t*>(words) + i) ^ flip;
        ((w < bound) & IVec(1)).store(keep + i);
      }
      for (int64_t v = 0; v < count; ++v) {
        const int64_t first = (g + v) * kDropoutGroup;
        f(first, std::min(kDropoutGroup, numel - first), keep + v * kDropoutGroup);
      }
    }
  });
}

// y[i] = x[i] * multiplier[i] for one full group, in op-math vectors (32 is a multiple of every
// vector width here).
template <typename scalar_t>
inline void apply_multiplier(const scalar_t* x, scalar_t* y, const opmath_t<scalar_t>* multiplier) {
  using Vec = OpVec<scalar_t>;
  for (int64_t i = 0; i < kDropoutGroup; i += vec_step<scalar_t>()) {
    if constexpr (kReducedFloat<scalar_t>) {
      Vec lo, hi;
      at::vec::load_to_float(x + i, lo, hi);
      const Vec m_lo = Vec::loadu(multiplier + i), m_hi = Vec::loadu(multiplier + i + Vec::size());
      at::vec::convert_from_float<scalar_t>(lo * m_lo, hi * m_hi).store(y + i);
    } else {
      (Vec::loadu(x + i) * Vec::loadu(multiplier + i)).store(y + i);
    }
  }
}

void dropout_kernel(const at::Tensor& in, const at::Tensor& out, uint64_t threshold, double scale, uint64_t seed, uint64_t offset) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "dropout", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const T s = static_cast<T>(scale);
    TORCH_INTERNAL_ASSERT(threshold <= UINT32_MAX, "keeps_all(p) never reaches the kernel");
    for_each_group(in.numel(), static_cast<uint32_t>(threshold), seed, offset, [&](int64_t first, int64_t n, const int32_t* keep) {
      // Multiplying by 0 (not selecting 0) keeps torch's semantics: a dropped nan stays nan.
      alignas(64) T multiplier[kDropoutGroup];
      for (int64_t i = 0; i < kDropoutGroup; ++i) {
        multiplier[i] = s * static_cast<T>(keep[i]);
      }
      if (n == kDropoutGroup) {
        apply_multiplier(x + first, y + first, multiplier);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          y[first + i] = static_cast<scalar_t>(static_cast<T>(x[first + i]) * multiplier[i]);
        }
      }
    });
  });
}

void dropout_mask_kernel(uint8_t* mask, int64_t numel, uint64_t threshold, uint64_t seed, uint64_t offset) {
  if (threshold > UINT32_MAX) {  // keeps_all(p): every element kept; bits past numel stay 0
    for (int64_t byte = 0; byte < (numel + 7) / 8; ++byte) {
      mask[byte] = static_cast<uint8_t>(numel - 8 * byte >= 8 ? 0xFF : (1u << (numel - 8 * byte)) - 1);
    }
    return;
  }
  for_each_group(numel, static_cast<uint32_t>(threshold), seed, offset, [&](int64_t first, int64_t n, const int32_t* keep) {
    // Bits past n (the end of the tensor) are kept 0.
    for (int64_t byte = 0; byte < (n + 7) / 8; ++byte) {
      uint32_t bits = 0;
      for (int64_t b = 0; b < 8; ++b) {
        bits |= static_cast<uint32_t>(keep[8 * byte + b]) << b;
      }
      const int64_t valid = std::min<int64_t>(8, n - 8 * byte);
      mask[first / 8 + byte] = static_cast<uint8_t>(bits & ((1u << valid) - 1));
    }
  });
}

} // namespace
} // namespace CPU_CAPABILITY

REGISTER_DISPATCH(dropout_stub, &fused_optim::CPU_CAPABILITY::dropout_kernel)
REGISTER_DISPATCH(dropout_mask_stub, &fused_optim::CPU_CAPABILITY::dropout_mask_kernel)

} // namespace fused_optim
