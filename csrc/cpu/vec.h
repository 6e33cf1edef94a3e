// SIMD building blocks of the CPU kernels, written once with GCC vector extensions and compiled
// per instruction set. The extension is built without -march=native (the wheel must run on any
// x86-64), so each hot loop is instantiated for AVX-512, AVX2+FMA and baseline x86-64 and the
// best variant for the running CPU is picked once (HE_MULTIVERSION). Every helper here is
// always_inline: a helper compiled out of line would be baseline code called from the AVX-512
// variant, which defeats the point.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only cross always_inline boundaries

namespace hybrid_engine::cpu {

#define HE_INLINE inline __attribute__((always_inline))

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

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

// fp32 vectors of either width (V: f32x16 or f32x8), for kernels blocked per instruction set.
template <typename V>
constexpr int64_t lanes = sizeof(V) / sizeof(float);
template <typename V>
HE_INLINE V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
HE_INLINE V loadv(const uint16_t* p) {  // bf16 widened to fp32
  if constexpr (lanes<V> == kLanes) {
    return load16(p);
  } else {
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    return (V)(__builtin_convertvector(h, u32x8) << 16);
  }
}
template <typename V>
HE_INLINE void storev(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
template <typename V>
HE_INLINE void storev(uint16_t* p, V v) {  // round to nearest even like from_float, NaN stays NaN
  using U = std::conditional_t<lanes<V> == kLanes, u32x16, u32x8>;
  using H = std::conditional_t<lanes<V> == kLanes, u16x16, u16x8>;
  const U bits = (U)v;
  const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const H h = __builtin_convertvector(v != v ? U{} + 0x7fc0u : rounded, H);
  std::memcpy(p, &h, sizeof(h));
}

// Horizontal reductions as a tree of halvings: a lane-by-lane loop would be one long dependency
// chain (no fast-math, so the compiler may not reorder it).
HE_INLINE float hsum(f32x8 a) {
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
HE_INLINE float hsum(f32x16 v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
HE_INLINE float hmax(f32x8 a) {
  const f32x4 blo = __builtin_shufflevector(a, a, 0, 1, 2, 3), bhi = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const f32x4 b = blo > bhi ? blo : bhi;
  return std::max(std::max(b[0], b[1]), std::max(b[2], b[3]));
}
HE_INLINE float hmax(f32x16 v) {
  const f32x8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const f32x8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return hmax(lo > hi ? lo : hi);
}

// out[t] = hsum(part[t]) for 16 vectors at once: a transposing tree of two-source shuffles, about
// two shuffles per result instead of five for 16 separate hsum calls.
HE_INLINE f32x16 hsum16(const f32x16 (&part)[kLanes]) {
  f32x16 c[8], e[4], g[2];
  for (int i = 0; i < 8; ++i)
    c[i] = __builtin_shufflevector(part[2 * i], part[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(part[2 * i], part[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    e[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    g[i] = __builtin_shufflevector(e[2 * i], e[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(e[2 * i], e[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(g[0], g[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(g[0], g[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The same for 8 vectors of 8 lanes (AVX2 keeps 8 of them and a query chunk in its 16 registers).
HE_INLINE f32x8 hsum8(const f32x8 (&part)[8]) {
  f32x8 c[4], e[2];
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(part[2 * i], part[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(part[2 * i], part[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    e[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
HE_INLINE f32x16 hsum_lanes(const f32x16 (&part)[16]) { return hsum16(part); }
HE_INLINE f32x8 hsum_lanes(const f32x8 (&part)[8]) { return hsum8(part); }

// exp(x) to ~2 ulp (Cephes expf polynomial); 0 below -87 (so -inf gives 0), x <= 88 assumed:
// softmax only exponentiates x - max <= 0. V: f32x16 or f32x8 (AVX2 code should use the latter:
// there a 16-lane vector's temporaries go through the stack).
template <typename V>
HE_INLINE V exp_v(V x) {
  using I = std::conditional_t<lanes<V> == kLanes, i32x16, i32x8>;
  const V lo = x < -87.0f ? V{} - 87.0f : x;
  const V n = (lo * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (lo - n * 0.693359375f) + n * 2.12194440e-4f;
  V y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const V scale = (V)((__builtin_convertvector(n, I) + 127) << 23);
  return x < -87.0f ? V{} : y * scale;
}

// Rows in the storage type are read 32 elements at a time as two fp32 vectors. For bf16 these are
// the even and the odd elements of the 32 (a shift and a mask of the same 32-bit words, no
// shuffles: shuffle-port pressure is what limits a bf16 dot product), so the fp32 row they meet
// (the query, the output accumulator) is kept in the matching "pair layout" (to_pair_layout).
HE_INLINE void load_pair(const float* p, f32x16& a, f32x16& b) {
  a = load16(p);
  b = load16(p + kLanes);
}
HE_INLINE void load_pair(const uint16_t* p, f32x16& a, f32x16& b) {
  u32x16 w;
  std::memcpy(&w, p, sizeof(w));
  a = (f32x16)(w << 16);
  b = (f32x16)(w & 0xffff0000u);
}

// One 32-element chunk of a row in storage type T as 32 / lanes<V> fp32 vectors, in the order the
// chunk sits in the pair layout (for 16 lanes: load_pair's two). With 8 lanes a bf16 chunk's two
// halves of 16 give the first and the second 8 of its even elements, then of its odd ones.
template <typename V>
HE_INLINE void load_chunk(const float* p, V (&x)[32 / lanes<V>]) {
  for (int i = 0; i < 32 / lanes<V>; ++i) x[i] = loadv<V>(p + i * lanes<V>);
}
template <typename V>
HE_INLINE void load_chunk(const uint16_t* p, V (&x)[32 / lanes<V>]) {
  if constexpr (lanes<V> == kLanes) {
    load_pair(p, x[0], x[1]);
  } else {
    u32x8 lo, hi;
    std::memcpy(&lo, p, sizeof(lo));
    std::memcpy(&hi, p + 16, sizeof(hi));
    x[0] = (V)(lo << 16);
    x[1] = (V)(hi << 16);
    x[2] = (V)(lo & 0xffff0000u);
    x[3] = (V)(hi & 0xffff0000u);
  }
}

// A row of n elements in storage type T -> fp32 pair layout (times scale), and back (times scale).
// For bf16, each full 32-element chunk holds its even elements, then its odd ones; a shorter
// tail stays in natural order. For float32 the pair layout is the natural one.
template <typename T>
HE_INLINE int64_t natural_index(int64_t c, int64_t n) {  // where pair-layout element c of a row sits
  const int64_t chunked = std::is_same<T, uint16_t>::value ? n / (2 * kLanes) * (2 * kLanes) : 0;
  if (c >= chunked) return c;
  const int64_t i = c % (2 * kLanes);
  return c - i + (i < kLanes ? 2 * i : 2 * (i - kLanes) + 1);
}
template <typename T>
HE_INLINE void to_pair_layout(const T* src, float* dst, int64_t n, float scale) {
  for (int64_t c = 0; c < n; ++c) dst[c] = to_float(src[natural_index<T>(c, n)]) * scale;
}
template <typename T>
HE_INLINE void from_pair_layout(const float* src, T* dst, int64_t n, float scale) {
  for (int64_t c = 0; c < n; ++c) dst[natural_index<T>(c, n)] = from_float<T>(src[c] * scale);
}

template <typename V>
HE_INLINE void scale_inplace(float* y, float alpha, int64_t n) {
  int64_t d = 0;
  for (; d + lanes<V> <= n; d += lanes<V>) storev(y + d, loadv<V>(y + d) * alpha);
  for (; d < n; ++d) y[d] *= alpha;
}

// One online-softmax step for a row of scores padded with -inf to a multiple of lanes<V>:
// exponentiates the scores in place (as weights relative to the new running max) and rescales
// the running sum and the output accumulator acc[0:head_dim].
template <typename V>
HE_INLINE void online_softmax_step(float* scores, int64_t padded_len, float& row_max, float& row_sum,
                                   float* acc, int64_t head_dim) {
  constexpr int64_t L = lanes<V>;
  V mx = loadv<V>(scores);
  for (int64_t t = L; t < padded_len; t += L) {
    const V s = loadv<V>(scores + t);
    mx = s > mx ? s : mx;
  }
  const float new_max = std::fmax(row_max, hmax(mx));
  if (new_max == -INFINITY) {  // every score masked so far: nothing to accumulate yet
    std::fill(scores, scores + padded_len, 0.f);
    return;
  }
  const float correction = std::exp(row_max - new_max);
  V sum{};
  for (int64_t t = 0; t < padded_len; t += L) {
    const V p = exp_v(loadv<V>(scores + t) - new_max);
    storev(scores + t, p);
    sum += p;
  }
  row_sum = row_sum * correction + hsum(sum);
  if (correction != 1.0f) scale_inplace<V>(acc, correction, head_dim);
  row_max = new_max;
}

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best instruction set of this CPU, or a lower one named by HYBRID_ENGINE_CPU_ISA
// ("avx2", "baseline"), read once per process: lets tests run every variant on one machine.
inline Isa best_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
#endif
    const char* cap = std::getenv("HYBRID_ENGINE_CPU_ISA");
    if (cap && std::strcmp(cap, "baseline") == 0) return Isa::kBaseline;
    if (cap && std::strcmp(cap, "avx2") == 0) return std::min(best, Isa::kAvx2);
    return best;
  }();
  return isa;
}

// Bit (1 << Isa) set for each variant a HE_MULTIVERSION kernel has run in this process:
// lets tests check that the variant they asked for is the one that ran.
inline std::atomic<int>& isa_variants_run() {
  static std::atomic<int> mask{0};
  return mask;
}

HE_INLINE void record_isa(Isa isa) {
  const int bit = 1 << static_cast<int>(isa);
  if (!(isa_variants_run().load(std::memory_order_relaxed) & bit)) isa_variants_run().fetch_or(bit);
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
// `impl<T, V>` (an HE_INLINE function template with that signature) compiled for the best ISA, V
// being the float vector as wide as that ISA's registers (f32x16 on AVX-512, f32x8 below it: a
// wider one is split by the compiler into halves that spill through the stack).
#define HE_MULTIVERSION(name, impl, Params)                                                      \
  template <typename T>                                                                          \
  HE_TARGET_AVX512 void name##_avx512(const Params& p, int64_t begin, int64_t end) {             \
    impl<T, ::hybrid_engine::cpu::f32x16>(p, begin, end);                                        \
  }                                                                                              \
  template <typename T>                                                                          \
  HE_TARGET_AVX2 void name##_avx2(const Params& p, int64_t begin, int64_t end) {                 \
    impl<T, ::hybrid_engine::cpu::f32x8>(p, begin, end);                                         \
  }                                                                                              \
  template <typename T>                                                                          \
  void name##_baseline(const Params& p, int64_t begin, int64_t end) {                            \
    impl<T, ::hybrid_engine::cpu::f32x8>(p, begin, end);                                         \
  }                                                                                              \
  template <typename T>                                                                          \
  void name(const Params& p, int64_t begin, int64_t end) {                                       \
    using ::hybrid_engine::cpu::Isa;                                                             \
    using ::hybrid_engine::cpu::record_isa;                                                      \
    switch (::hybrid_engine::cpu::best_isa()) {                                                  \
      case Isa::kAvx512: record_isa(Isa::kAvx512); return name##_avx512<T>(p, begin, end);       \
      case Isa::kAvx2: record_isa(Isa::kAvx2); return name##_avx2<T>(p, begin, end);             \
      default: record_isa(Isa::kBaseline); return name##_baseline<T>(p, begin, end);             \
    }                                                                                            \
  }

}  // namespace hybrid_engine::cpu
