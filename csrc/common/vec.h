// Inner loops over one contiguous span, vectorized with at::vec and computed in the op-math type
// (fp32 for fp16/bf16, which are converted on load and rounded back on store).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

// Compiled into every per-capability kernel copy: the inline namespace keeps the copies apart.
namespace fused_optim {
inline namespace CPU_CAPABILITY {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
using OpVec = at::vec::Vectorized<opmath_t<scalar_t>>;

template <typename scalar_t>
constexpr bool kReducedFloat = at::vec::is_reduced_floating_point_v<scalar_t>;

// Elements a reduction accumulates in op-math vectors before flushing them into fp64.
constexpr int64_t kReduceBlock = 2048;

// Elements consumed per vector step: one Vectorized<scalar_t>, i.e. two fp32 vectors for half types.
template <typename scalar_t>
constexpr int64_t vec_step() {
  return at::vec::Vectorized<scalar_t>::size();
}

// Independent accumulators a reduction deals its vectors to: with one, the loop waits on each
// add's latency (~4 cycles), ~2.5x slower than torch.sum on cache-resident data; they are folded in
// index order, so results stay deterministic.
constexpr int kAccumulators = 4;

// Calls visit(k, i) for the offset i of every full vector of [0, n), k being the vector's position
// modulo kAccumulators (constant in the unrolled loop, so accumulators indexed by it stay in
// registers); returns the offset where the scalar tail begins.
template <typename scalar_t, typename Visit>
inline int64_t for_each_vec_offset(int64_t n, const Visit& visit) {
  constexpr int64_t step = vec_step<scalar_t>();
  static_assert(kAccumulators == 4, "the unrolled loop below deals to 4 accumulators");
  int64_t i = 0;
  for (; i + kAccumulators * step <= n; i += kAccumulators * step) {
    visit(0, i);
    visit(1, i + step);
    visit(2, i + 2 * step);
    visit(3, i + 3 * step);
  }
  for (int k = 0; i + step <= n; i += step, ++k) {
    visit(k, i);
  }
  return i;
}

// Calls vop(k, OpVec) on every full vector of x[0, n), k as for_each_vec_offset (both fp32 halves
// of an fp16/bf16 vector get the same k), and sop(opmath) on the tail.
template <typename scalar_t, typename VecOp, typename ScalarOp>
inline void for_each_vec(const scalar_t* x, int64_t n, const VecOp& vop, const ScalarOp& sop) {
  int64_t i = for_each_vec_offset<scalar_t>(n, [&](int k, int64_t at) {
    if constexpr (kReducedFloat<scalar_t>) {
      OpVec<scalar_t> lo, hi;
      at::vec::load_to_float(x + at, lo, hi);
      vop(k, lo);
      vop(k, hi);
    } else {
      vop(k, OpVec<scalar_t>::loadu(x + at));
    }
  });
  for (; i < n; ++i) {
    sop(static_cast<opmath_t<scalar_t>>(x[i]));
  }
}

// out[i] = op(in[i], out[i]) for i in [0, n), with op written once for OpVec and opmath scalars.
// When kReadOut is false, op receives zeros for out and out is only written (one stream less).
template <bool kReadOut, typename scalar_t, typename Op>
inline void update_each(const scalar_t* in, scalar_t* out, int64_t n, const Op& op) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t step = vec_step<scalar_t>();
  int64_t i = 0;
  if constexpr (!kReducedFloat<scalar_t>) {
    // Two vectors a step, as ATen's vectorized loops: on cache-resident data one a step ran the
    // lerp ~1.3x slower than torch.lerp_ (fp16/bf16 steps are already two fp32 vectors).
    for (; i + 2 * step <= n; i += 2 * step) {
      Vec b0(0), b1(0);
      const Vec a0 = Vec::loadu(in + i), a1 = Vec::loadu(in + i + step);
      if constexpr (kReadOut) {
        b0 = Vec::loadu(out + i);
        b1 = Vec::loadu(out + i + step);
      }
      const Vec r0 = op(a0, b0), r1 = op(a1, b1);
      r0.store(out + i);
      r1.store(out + i + step);
    }
  }
  for (; i + step <= n; i += step) {
    if constexpr (kReducedFloat<scalar_t>) {
      Vec a_lo, a_hi, b_lo(0), b_hi(0);
      at::vec::load_to_float(in + i, a_lo, a_hi);
      if constexpr (kReadOut) {
        at::vec::load_to_float(out + i, b_lo, b_hi);
      }
      at::vec::convert_from_float<scalar_t>(op(a_lo, b_lo), op(a_hi, b_hi)).store(out + i);
    } else {
      Vec b(0);
      if constexpr (kReadOut) {
        b = Vec::loadu(out + i);
      }
      op(Vec::loadu(in + i), b).store(out + i);
    }
  }
  for (; i < n; ++i) {
    using T = opmath_t<scalar_t>;
    const T b = kReadOut ? static_cast<T>(out[i]) : T(0);
    out[i] = static_cast<scalar_t>(op(static_cast<T>(in[i]), b));
  }
}

// Sum of a vector's lanes, in double so that combining chunk partials adds no fp32 rounding.
template <typename T>
inline double sum_lanes(const at::vec::Vectorized<T>& v) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t k = 0; k < at::vec::Vectorized<T>::size(); ++k) {
    s += static_cast<double>(lanes[k]);
  }
  return s;
}

// a * b + c rounded once on every build (fma_rn of common/elementwise.h, lane by lane). at::vec::fmadd
// is one FMA instruction on AVX2 but a multiply and an add in the portable build, so that copy
// fuses lane by lane (slower; it runs only on CPUs without AVX2 or when forced).
template <typename T>
inline at::vec::Vectorized<T> fma(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                  const at::vec::Vectorized<T>& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  constexpr int64_t n = at::vec::Vectorized<T>::size();
  alignas(64) T la[n], lb[n], lc[n];
  a.store(la);
  b.store(lb);
  c.store(lc);
  for (int64_t k = 0; k < n; ++k) {
    la[k] = std::fma(la[k], lb[k], lc[k]);
  }
  return at::vec::Vectorized<T>::loadu(la);
#endif
}

// sign(x) as torch.sign: -1, 0 or +1, and 0 for NaN.
template <typename T>
inline at::vec::Vectorized<T> sign(const at::vec::Vectorized<T>& x) {
  const at::vec::Vectorized<T> zero(0);
  return x.gt(zero) - x.lt(zero);
}

template <typename T, typename = std::enable_if_t<std::is_floating_point_v<T>>>
inline T sign(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

} // namespace CPU_CAPABILITY
} // namespace fused_optim
