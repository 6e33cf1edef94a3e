// y = act(x W^T + b) on the CPU through weights packed once into column panels.
//
// The weight [N, K] is packed as panels of 16 columns (8 for fp32 on AVX2), N padded to 16 with
// zeros, each K rows of the panel's columns (bf16: K / 2 rows of 16 column pairs, the layout
// vdpbf16ps multiplies). A task is a range of panels; for each block of up to kRows rows of x, the
// block is copied transposed ([K][rows], so each k is one cache line to broadcast from) and every
// panel of the range is multiplied into rows x columns accumulators held in registers over all of K. Each
// weight element is read once per row block, in order, prefetched ahead. At decode batch sizes the
// weights come from memory, not cache: over all linears of OPT-125m and OPT-1.3b at 16 rows this ran
// 1.15-1.27x faster than oneDNN's packed kernels in fp32 and bf16 (avx512_bf16), 1.4x at 1 row, level
// at 64 (2-vCPU EPYC Zen 4, 2026-12-06). AVX2 CPUs get fp32 blocks of 6 rows x 16 columns, or of up
// to 12 rows x 8 columns for decode (on a 2-vCPU EPYC Zen 3 at 16 rows over all linears of OPT-125m:
// 1.0-1.1x oneDNN's packed kernels, 2x F.linear); bf16 needs AVX-512 BF16.
#include <immintrin.h>
#include <sys/mman.h>

#include <array>
#include <utility>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace hybrid_engine::cpu {
namespace {

constexpr const char* kOp = "packed_linear";
constexpr int64_t kPanel = 16;     // output columns per panel
constexpr int64_t kAvx2Panel = 8;  // fp32 on AVX2: one 8-lane vector (panel_width)
// The weights stream from memory while the FMA units are busy, which leaves the out-of-order core
// few loads in flight, so each k step prefetches its panels this far ahead, shared between them (a
// kernel of P panels fetches each kPrefetchBytes / P ahead). 2 KB made a pass over all linears of
// OPT-125m/1.3b at 16 rows 1.25-1.35x faster than none (Zen 4; 1, 2 and 4 KB measured, 2-4 best). On a
// 2-vCPU Zen 5, in one process alternating round by round over all linears of OPT-1.3b, 8 KB against
// 2: bf16 16 rows 70-74 -> 50-58 ms, fp32 16 rows 131-143 -> 96-116, 8 rows 97-123 -> 80-114, the AVX2
// kernels (fp32) 207 -> 189 at 16 rows and 153 -> 116 at 8; 4 KB was slower than 8, 12-16 KB no faster.
constexpr int64_t kPrefetchBytes = 8192;

struct LinearParams {
  const void* x;       // [M, K], float32 or bfloat16
  const void* packed;  // panels of the weight (pack_linear_weight)
  const float* bias;   // [N] as float32, or nullptr
  void* out;           // [M, N], x's dtype
  int64_t M, N, K, Kp;  // Kp: K rounded up to the packing's k step (2 for bf16)
  bool relu;
};

#if defined(__x86_64__) && defined(__GNUC__)
#define HE_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma"
#define HE_AVX512_BF16 "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"

// The panel's valid columns (the last panel may be partly padding).
HE_INLINE __mmask16 column_mask(const LinearParams& p, int64_t n0) {
  const int64_t cols = std::min(kPanel, p.N - n0);
  return cols == kPanel ? 0xffff : __mmask16((1u << cols) - 1);
}

__attribute__((target(HE_AVX512))) HE_INLINE __m512 bias_relu_avx512(const LinearParams& p, __m512 acc, int64_t n0,
                                                                    __mmask16 mask) {
  if (p.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, p.bias + n0));
  return p.relu ? _mm512_max_ps(_mm512_setzero_ps(), acc) : acc;  // max(0, NaN) is NaN, as in torch
}

// fp32: R rows x P panels of 16 columns (the next panel K * 16 floats on), acc[j * R + r] += a[k][r] * w_j[k][0:16].
// Accessing the accumulators only in loops GCC unrolls keeps them in registers (see panels_f32_avx2).
template <int R, int P>
__attribute__((target(HE_AVX512))) void panels_f32_avx512(const LinearParams& p, const float* a, const float* w,
                                                           int64_t m0, int64_t n0) {
  const int64_t stride = p.Kp * kPanel, ahead = kPrefetchBytes / P;
  __m512 acc[P * R];
#pragma GCC unroll 32
  for (int i = 0; i < P * R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; ++k, a += R, w += kPanel) {
    __m512 b[P];
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * stride) + ahead, _MM_HINT_T0);
      b[j] = _mm512_loadu_ps(w + j * stride);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r]);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) acc[j * R + r] = _mm512_fmadd_ps(x, b[j], acc[j * R + r]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < P; ++j) {
    const int64_t n = n0 + j * kPanel;
    const __mmask16 mask = column_mask(p, n);
    float* out = static_cast<float*>(p.out) + m0 * p.N + n;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(out + r * p.N, mask, bias_relu_avx512(p, acc[j * R + r], n, mask));
  }
}

// bf16: R rows x P panels, acc[j * R + r] += a[k][r] . w_j[k][0:16] over the K / 2 pairs.
template <int R, int P>
__attribute__((target(HE_AVX512_BF16))) void panels_bf16_avx512(const LinearParams& p, const uint32_t* a,
                                                                 const uint32_t* w, int64_t m0, int64_t n0) {
  const int64_t stride = p.Kp / 2 * kPanel, ahead = kPrefetchBytes / P;
  __m512 acc[P * R];
#pragma GCC unroll 32
  for (int i = 0; i < P * R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.Kp / 2; ++k, a += R, w += kPanel) {
    __m512bh b[P];
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * stride) + ahead, _MM_HINT_T0);
      b[j] = (__m512bh)_mm512_loadu_si512(w + j * stride);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(a[r]);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) acc[j * R + r] = _mm512_dpbf16_ps(acc[j * R + r], x, b[j]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < P; ++j) {
    const int64_t n = n0 + j * kPanel;
    const __mmask16 mask = column_mask(p, n);
    uint16_t* out = static_cast<uint16_t*>(p.out) + m0 * p.N + n;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(out + r * p.N, mask,
                               (__m256i)_mm512_cvtneps_pbh(bias_relu_avx512(p, acc[j * R + r], n, mask)));
  }
}

// AVX2 has no mask registers: lanes [0, count) of an 8-lane half as a vmaskmovps mask.
__attribute__((target("avx2,fma"))) HE_INLINE __m256i lanes_below(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) HE_INLINE __m256 bias_relu_avx2(const LinearParams& p, __m256 acc,
                                                                     int64_t n0, __m256i mask) {
  if (p.bias) acc = _mm256_add_ps(acc, _mm256_maskload_ps(p.bias + n0, mask));
  return p.relu ? _mm256_max_ps(_mm256_setzero_ps(), acc) : acc;  // max(0, NaN) is NaN, as in torch
}

// fp32 on AVX2: R rows x P panels of 8 columns (the next panel Kp * 8 floats on). Every access to the
// accumulators is unrolled: one indexed by a loop variable puts them in memory, and GCC then stored all
// of them on every k (12 stores per 12 FMAs, which halved the kernel's speed on Zen 3).
template <int R, int P>
__attribute__((target("avx2,fma"))) void panels_f32_avx2(const LinearParams& p, const float* a, const float* w,
                                                          int64_t m0, int64_t n0) {
  const int64_t stride = p.Kp * kAvx2Panel, ahead = kPrefetchBytes / P;
  __m256 acc[P * R];  // acc[j * R + r]: row r, panel j
#pragma GCC unroll 16
  for (int i = 0; i < P * R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.K; ++k, a += R, w += kAvx2Panel) {
    __m256 b[P];
#pragma GCC unroll 2
    for (int j = 0; j < P; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * stride) + ahead, _MM_HINT_T0);
      b[j] = _mm256_loadu_ps(w + j * stride);
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r);
#pragma GCC unroll 2
      for (int j = 0; j < P; ++j) acc[j * R + r] = _mm256_fmadd_ps(x, b[j], acc[j * R + r]);
    }
  }
  float* out = static_cast<float*>(p.out) + m0 * p.N + n0;
#pragma GCC unroll 2
  for (int j = 0; j < P; ++j) {
    const __m256i mask = lanes_below(p.N - n0 - j * kAvx2Panel);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
      _mm256_maskstore_ps(out + r * p.N + j * kAvx2Panel, mask,
                          bias_relu_avx2(p, acc[j * R + r], n0 + j * kAvx2Panel, mask));
  }
}

#endif

// Columns per panel: 16 (one AVX-512 vector; bf16), 8 for fp32 on AVX2 (one 8-lane vector, so that a
// decode block of up to 12 rows holds one panel's accumulators in registers). The columns are padded
// to 16 either way (two AVX2 panels make one unit of the 6-row kernel).
int64_t panel_width(bool bf16) { return bf16 || best_isa() == Isa::kAvx512 ? kPanel : kAvx2Panel; }
int64_t padded_columns(int64_t N) { return (N + kPanel - 1) / kPanel * kPanel; }

// A block of rows of x transposed for broadcasting: a[k][r] (bf16: a[k pair][r] as one 32-bit word),
// K padded to Kp with zeros.
template <typename T, typename A>
void transpose_rows(const LinearParams& p, int64_t m0, int64_t rows, A* a) {
  const T* x = static_cast<const T*>(p.x) + m0 * p.K;
  constexpr int64_t per = sizeof(A) / sizeof(T);
  std::fill(a, a + rows * p.Kp / per, A{});
  T* dst = reinterpret_cast<T*>(a);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < p.K; ++k) dst[(k / per * rows + r) * per + k % per] = x[r * p.K + k];
}

template <typename A>
using PanelKernel = void (*)(const LinearParams&, const A*, const A*, int64_t, int64_t);

// The kernels of one ISA and dtype: by_rows[r - 1][q - 1] multiplies r rows by q panels of `width` columns.
template <typename A, size_t kRows, size_t kPanels>
struct Kernels {
  std::array<std::array<PanelKernel<A>, kPanels>, kRows> by_rows;
  int64_t width;
};

// Row blocks that share each panel while it is in cache: up to 4 blocks of x are transposed, then
// every panel multiplies all of them.
constexpr int64_t kBlocksPerGroup = 4;

// Rows [m_begin, m_end) of x (at most kBlocksPerGroup blocks of up to kRows) times panels [begin, end),
// kPanels at a time, each block with the kernel instantiated for its row count (accumulators stay
// registers). The rows are spread evenly over the blocks: a block of few rows has too few accumulators
// to hide the FMA latency (8 rows on AVX2 as 6 + 2 take 10 FMA cycles per k, as 4 + 4 take 8: 1.17x
// faster with the weight in L2, one thread, Zen 3).
template <typename T, typename A, size_t kRows, size_t kPanels>
void multiply(const LinearParams& p, int64_t m_begin, int64_t m_end, int64_t begin, int64_t end,
              const Kernels<A, kRows, kPanels>& kernels) {
  constexpr int64_t per = sizeof(A) / sizeof(T);
  const int64_t tile = kRows * p.Kp / per, blocks = (m_end - m_begin + kRows - 1) / kRows;
  const int64_t base = (m_end - m_begin) / blocks, extra = (m_end - m_begin) % blocks;
  auto first_row = [&](int64_t i) { return m_begin + i * base + std::min(i, extra); };
  auto rows_of = [&](int64_t i) { return base + (i < extra); };
  thread_local std::vector<A> tiles;  // reused: a fresh buffer per call would be fresh pages per call
  tiles.resize(std::max<size_t>(tiles.size(), blocks * tile));
  for (int64_t i = 0; i < blocks; ++i) transpose_rows<T>(p, first_row(i), rows_of(i), tiles.data() + i * tile);
  const A* packed = static_cast<const A*>(p.packed);
  for (int64_t panel = begin; panel < end; panel += kPanels) {
    const int64_t n0 = panel * kernels.width, panels = std::min<int64_t>(kPanels, end - panel);
    for (int64_t i = 0; i < blocks; ++i)  // panels of any width start n0 * Kp elements in
      kernels.by_rows[rows_of(i) - 1][panels - 1](p, tiles.data() + i * tile, packed + n0 * p.Kp / per,
                                                  first_row(i), n0);
  }
}

// A few rows (decode): the threads split the columns, kPanels panels at a time, and each weight element is
// read once. Many rows (prefill): the threads split groups of rows, so each row is transposed once.
template <typename T, typename A, size_t kRows, size_t kPanels>
void run(const LinearParams& p, const Kernels<A, kRows, kPanels>& kernels) {
  const int64_t group = kRows * kBlocksPerGroup, panels = padded_columns(p.N) / kernels.width;
  if (p.M <= group) {
    parallel_for(0, (panels + kPanels - 1) / kPanels, 1, [&](int64_t begin, int64_t end) {
      multiply<T>(p, 0, p.M, begin * kPanels, std::min<int64_t>(panels, end * kPanels), kernels);
    });
    return;
  }
  parallel_for(0, (p.M + group - 1) / group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      multiply<T>(p, g * group, std::min(p.M, (g + 1) * group), 0, panels, kernels);
  });
}

#if defined(__x86_64__) && defined(__GNUC__)
// A family of kernels (one ISA and dtype) as templates over rows and panels, and tables of them.
struct F32Avx512 {
  using A = float;
  static constexpr int64_t kWidth = kPanel;
  template <int R, int P>
  static constexpr PanelKernel<A> kernel = &panels_f32_avx512<R, P>;
};
struct Bf16Avx512 {
  using A = uint32_t;
  static constexpr int64_t kWidth = kPanel;
  template <int R, int P>
  static constexpr PanelKernel<A> kernel = &panels_bf16_avx512<R, P>;
};
struct F32Avx2 {
  using A = float;
  static constexpr int64_t kWidth = kAvx2Panel;
  template <int R, int P>
  static constexpr PanelKernel<A> kernel = &panels_f32_avx2<R, P>;
};

template <typename Family, int R, int... P>
constexpr std::array<PanelKernel<typename Family::A>, sizeof...(P)> kernel_row(std::integer_sequence<int, P...>) {
  return {Family::template kernel<R, P + 1>...};
}
// Kernels of 1..sizeof(R) rows by 1..kPanels panels.
template <typename Family, int kPanels, int... R>
constexpr Kernels<typename Family::A, sizeof...(R), kPanels> table(std::integer_sequence<int, R...>) {
  return {{kernel_row<Family, R + 1>(std::make_integer_sequence<int, kPanels>{})...}, Family::kWidth};
}

// Rows per block and panels per step, within 32 vector registers on AVX-512 and 16 on AVX2 (rows x
// panels accumulators, a panel row each, a broadcast). Each accumulator is a chain of dependent FMAs, so
// a few rows need several panels to keep both FMA units busy: up to 6 rows take 4 panels per step (all
// linears of OPT-1.3b, bf16, Zen 5, alternated in one process: 1 row 54.1 -> 51.3 ms, 4 rows 58.3 -> 53.6,
// 6 rows 58.4 -> 54.9; fp32 1 row 106 -> 101, 4 rows 110 -> 106), while 2 panels for 7-12 rows changed
// nothing measurable, so more rows take one. AVX2: 6 rows x 2 panels, or up to 12 rows x 1 panel, so
// that a decode batch of up to 12 rows reads each weight once, as it streams from memory. As two blocks of 4
// rows the second block re-read each panel from L2 while no weights streamed in: all linears of OPT-1.3b at
// 8 rows took the time of 4 rows (memory) plus 4 rows' FMAs, 289 ms; with one block 252 ms (2 threads, Zen
// 3; alternated runs: 381 and 422 -> 262 and 249 ms). At 16 rows two 8-row blocks ran slower than three of
// 6 x 2 panels (351-403 -> 514-543 ms), so larger batches keep those.
constexpr auto kF32Avx512 = table<F32Avx512, 1>(std::make_integer_sequence<int, 16>{});
constexpr auto kF32Avx512Few = table<F32Avx512, 4>(std::make_integer_sequence<int, 6>{});
constexpr auto kBf16Avx512 = table<Bf16Avx512, 1>(std::make_integer_sequence<int, 16>{});
constexpr auto kBf16Avx512Few = table<Bf16Avx512, 4>(std::make_integer_sequence<int, 6>{});
constexpr auto kF32Avx2 = table<F32Avx2, 2>(std::make_integer_sequence<int, 6>{});
constexpr auto kF32Avx2Decode = table<F32Avx2, 1>(std::make_integer_sequence<int, 12>{});

// `few` (a decode table: fewer rows, more panels per step) when it holds M rows, else `many`.
template <typename T, typename Few, typename Many>
void run_by_rows(const LinearParams& p, const Few& few, const Many& many) {
  if (p.M <= int64_t(few.by_rows.size()))
    run<T>(p, few);
  else
    run<T>(p, many);
}
#endif

bool has_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return best_isa() == Isa::kAvx512 && yes;
#else
  return false;
#endif
}

// Asks for huge pages behind the 2 MB-aligned interior of t's memory before it is first written (THP in
// `madvise` mode, a common default, gives none otherwise): a weight streamed from memory every decode step
// then crosses no 4 KB page boundary, where the hardware prefetchers stop. All linears of OPT-1.3b on a
// 2-vCPU Zen 5, both packings alternated in one process: bf16 8 rows 56.6 -> 54.3 ms (faster in 9 of 10
// rounds), 16 rows 49.4 -> 48.4 (8 of 10); fp32 8 rows 118.3 -> 110.9 (7 of 10); packing no slower. Only
// advice: where the kernel refuses, t keeps small pages.
void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace

bool packed_linear_supported(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return has_avx512_bf16();
  return dtype == at::kFloat && best_isa() >= Isa::kAvx2;
}

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  check_input(weight, "pack_linear_weight", "weight", 2, "[out_features, in_features]");
  check_float_dtype(weight, "pack_linear_weight", "weight");
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  const int64_t N = weight.size(0), K = weight.size(1), per = bf16 ? 2 : 1, width = panel_width(bf16);
  const int64_t panels = padded_columns(N) / width, Kp = (K + per - 1) / per * per;
  // Written in place (no padded temporary: HybridEngine repacks every iteration, and a transient copy
  // of each weight would stay behind as heap the engine does not account for).
  at::Tensor packed = at::empty({panels, Kp / per, width, per}, weight.options());
  advise_huge_pages(packed);
  const int64_t bytes = weight.element_size();
  const char* src = static_cast<const char*>(weight.data_ptr());
  char* dst = static_cast<char*>(packed.data_ptr());
  parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      char* out = dst + panel * Kp * width * bytes;
      std::memset(out, 0, Kp * width * bytes);
      for (int64_t c = 0; c < std::min(width, N - panel * width); ++c) {
        const char* row = src + (panel * width + c) * K * bytes;
        for (int64_t k = 0; k < K; ++k)  // element (k / per, c, k % per) of the panel
          std::memcpy(out + ((k / per * width + c) * per + k % per) * bytes, row + k * bytes, bytes);
      }
    }
  });
  return packed;
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, bool relu) {
  check_input(x, kOp, "x", 2, "[rows, in_features]");
  check_float_dtype(x, kOp, "x");
  check_input(packed, kOp, "packed", 4, "[panels, k steps, columns, k per step] (pack_linear_weight)");
  check_same_dtype(packed, x, kOp, "packed", "x");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t K = x.size(1), per = bf16 ? 2 : 1, Kp = (K + per - 1) / per * per;
  TORCH_CHECK(packed.size(2) == panel_width(bf16) && packed.size(3) == per && packed.size(1) * per == Kp, kOp,
              ": packed has shape ", packed.sizes(), ", which is not a packed weight with in_features ", K,
              " (x has shape ", x.sizes(), ")");
  TORCH_CHECK(out_features > 0 && padded_columns(out_features) == packed.size(0) * packed.size(2), kOp,
              ": out_features ", out_features, " does not match packed's ", packed.size(0) * packed.size(2),
              " columns (out_features rounded up to ", kPanel, ")");
  TORCH_CHECK(packed_linear_supported(x.scalar_type()), kOp, ": this CPU has no kernel for ", x.scalar_type(),
              " (float32 needs AVX2 and FMA, bfloat16 AVX-512 BF16); use torch.nn.functional.linear");
  at::Tensor bias32;
  if (bias.has_value()) {
    check_input(*bias, kOp, "bias", 1, "[out_features]");
    TORCH_CHECK(bias->size(0) == out_features, kOp, ": bias has ", bias->size(0), " entries, expected out_features ",
                out_features);
    bias32 = bias->to(at::kFloat);
  }
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0) return out;
  const LinearParams p{x.data_ptr(), packed.data_ptr(), bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                       out.data_ptr(), x.size(0), out_features, K, Kp, relu};
#if defined(__x86_64__) && defined(__GNUC__)
  if (bf16) {
    record_isa(Isa::kAvx512);
    run_by_rows<uint16_t>(p, kBf16Avx512Few, kBf16Avx512);
  } else if (best_isa() == Isa::kAvx512) {
    record_isa(Isa::kAvx512);
    run_by_rows<float>(p, kF32Avx512Few, kF32Avx512);
  } else {
    record_isa(Isa::kAvx2);
    run_by_rows<float>(p, kF32Avx2Decode, kF32Avx2);
  }
#endif
  return out;
}

}  // namespace hybrid_engine::cpu
