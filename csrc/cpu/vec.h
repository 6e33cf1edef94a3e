// SIMD building blocks of the CPU kernels, written once with GCC vector extensions and compiled
// per instruction set. The extension is built without -march=native (the wheel must run on any
// x86-64), so each hot loop is instantiated for AVX-512, AVX2+FMA and baseline x86-64 and the
// best variant for the running CPU is picked once (HE_MULTIVERSION). Every helper here is
// always_inline: a helper compiled out of line would be baseline code called from the AVX-512
// variant, which defeats the point.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only cross always_inline boundaries

namespace hybrid_engine::cpu {

#define HE_INLINE inline __attribute__((always_inline))

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

constexpr int64_t kLanes = 16;

// bf16 is the high half of an fp32: widening is a shift, which vectorises to two instructions.
HE_INLINE float to_float(float x) { return x; }
HE_INLINE float to_float(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
HE_INLINE T from_float(float x);
template <>
HE_INLINE float from_float<float>(float x) { return x; }
template <>
HE_INLINE uint16_t from_float<uint16_t>(float x) {  // round to nearest even, like torch
  if (std::isnan(x)) return 0x7fc0;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

HE_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
HE_INLINE f32x16 load16(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}
HE_INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

HE_INLINE float hsum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
HE_INLINE float hmax(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) to ~2 ulp (Cephes expf polynomial); 0 below -87 (so -inf gives 0), x <= 88 assumed:
// softmax only exponentiates x - max <= 0.
HE_INLINE f32x16 exp16(f32x16 x) {
  const f32x16 lo = x < -87.0f ? f32x16{} - 87.0f : x;
  const f32x16 n = (lo * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const f32x16 r = (lo - n * 0.693359375f) + n * 2.12194440e-4f;
  f32x16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const f32x16 scale = (f32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);
  return x < -87.0f ? f32x16{} : y * scale;
}

// sum_d a[d] * b[d] over n elements (a in fp32, b in the storage type).
template <typename T>
HE_INLINE float dot(const float* a, const T* b, int64_t n) {
  f32x16 acc0{}, acc1{};
  int64_t d = 0;
  for (; d + 2 * kLanes <= n; d += 2 * kLanes) {
    acc0 += load16(a + d) * load16(b + d);
    acc1 += load16(a + d + kLanes) * load16(b + d + kLanes);
  }
  if (d + kLanes <= n) {
    acc0 += load16(a + d) * load16(b + d);
    d += kLanes;
  }
  float s = hsum(acc0 + acc1);
  for (; d < n; ++d) s += a[d] * to_float(b[d]);
  return s;
}

// y[d] += alpha * x[d] over n elements (y in fp32, x in the storage type).
template <typename T>
HE_INLINE void axpy(float* y, float alpha, const T* x, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) store16(y + d, load16(y + d) + alpha * load16(x + d));
  for (; d < n; ++d) y[d] += alpha * to_float(x[d]);
}

HE_INLINE void scale_inplace(float* y, float alpha, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) store16(y + d, load16(y + d) * alpha);
  for (; d < n; ++d) y[d] *= alpha;
}

// One online-softmax step for a row of scores padded with -inf to a multiple of kLanes:
// exponentiates the scores in place (as weights relative to the new running max) and rescales
// the running sum and the output accumulator acc[0:head_dim].
HE_INLINE void online_softmax_step(float* scores, int64_t padded_len, float& row_max, float& row_sum,
                                   float* acc, int64_t head_dim) {
  f32x16 mx = load16(scores);
  for (int64_t t = kLanes; t < padded_len; t += kLanes) {
    const f32x16 s = load16(scores + t);
    mx = s > mx ? s : mx;
  }
  const float new_max = std::fmax(row_max, hmax(mx));
  if (new_max == -INFINITY) {  // every score masked so far: nothing to accumulate yet
    std::fill(scores, scores + padded_len, 0.f);
    return;
  }
  const float correction = std::exp(row_max - new_max);
  f32x16 sum{};
  for (int64_t t = 0; t < padded_len; t += kLanes) {
    const f32x16 p = exp16(load16(scores + t) - new_max);
    store16(scores + t, p);
    sum += p;
  }
  row_sum = row_sum * correction + hsum(sum);
  if (correction != 1.0f) scale_inplace(acc, correction, head_dim);
  row_max = new_max;
}

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#define HE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define HE_TARGET_AVX512
#define HE_TARGET_AVX2
#endif

// Defines `template <typename T> void name(const Params&, int64_t begin, int64_t end)` running
// `impl<T>` (an HE_INLINE function template with that signature) compiled for the best ISA.
#define HE_MULTIVERSION(name, impl, Params)                                                      \
  template <typename T>                                                                          \
  HE_TARGET_AVX512 void name##_avx512(const Params& p, int64_t begin, int64_t end) {            \
    impl<T>(p, begin, end);                                                                      \
  }                                                                                              \
  template <typename T>                                                                          \
  HE_TARGET_AVX2 void name##_avx2(const Params& p, int64_t begin, int64_t end) {                \
    impl<T>(p, begin, end);                                                                      \
  }                                                                                              \
  template <typename T>                                                                          \
  void name##_baseline(const Params& p, int64_t begin, int64_t end) {                            \
    impl<T>(p, begin, end);                                                                      \
  }                                                                                              \
  template <typename T>                                                                          \
  void name(const Params& p, int64_t begin, int64_t end) {                                       \
    switch (::hybrid_engine::cpu::best_isa()) {                                                  \
      case ::hybrid_engine::cpu::Isa::kAvx512: return name##_avx512<T>(p, begin, end);           \
      case ::hybrid_engine::cpu::Isa::kAvx2: return name##_avx2<T>(p, begin, end);               \
      default: return name##_baseline<T>(p, begin, end);                                         \
    }                                                                                            \
  }

}  // namespace hybrid_engine::cpu
