// Residual add fused with LayerNorm or RMSNorm on the CPU: one pass reads x and residual and
// writes the new residual, the row (in L1) is normalised from an fp32 copy, one pass writes out.
// Plain torch needs a separate add and, for RMSNorm in torch 2.13, several unfused passes.
#include <vector>

#include "ops.h"
#include "vec.h"

namespace hybrid_engine::cpu {
namespace {

constexpr const char* kOp = "add_norm";

struct NormParams {
  const void* x;
  const void* residual;  // nullptr: h = x
  const float* weight;
  const float* bias;  // nullptr: no bias
  void* out;
  void* new_residual;
  int64_t hidden;
  float eps;
  bool rms;
};

// h = x (+ residual), rounded to T, into the fp32 row; returns sum(h).
template <typename T, typename V>
HE_INLINE float load_sum(const NormParams& p, int64_t row, float* h) {
  constexpr int64_t L = lanes<V>;
  const int64_t N = p.hidden;
  const T* x = static_cast<const T*>(p.x) + row * N;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * N : nullptr;
  T* new_res = res ? static_cast<T*>(p.new_residual) + row * N : nullptr;
  V sum{};
  int64_t c = 0;
  for (; c + L <= N; c += L) {
    V v = loadv<V>(x + c);
    if (res) {
      storev(new_res + c, v + loadv<V>(res + c));
      v = loadv<V>(new_res + c);  // the rounded value is what the next layer sees
    }
    storev(h + c, v);
    sum += v;
  }
  float s = hsum(sum);
  for (; c < N; ++c) {
    float v = to_float(x[c]);
    if (res) {
      new_res[c] = from_float<T>(v + to_float(res[c]));
      v = to_float(new_res[c]);
    }
    h[c] = v;
    s += v;
  }
  return s;
}

template <typename T, typename V>
HE_INLINE void norm_row(const NormParams& p, int64_t row, float* h) {
  constexpr int64_t L = lanes<V>;
  const int64_t N = p.hidden;
  const float sum = load_sum<T, V>(p, row, h);
  const float mean = p.rms ? 0.f : sum / N;
  V sq{};
  int64_t c = 0;
  for (; c + L <= N; c += L) {
    const V d = loadv<V>(h + c) - mean;
    sq += d * d;
  }
  float sum_sq = hsum(sq);
  for (; c < N; ++c) sum_sq += (h[c] - mean) * (h[c] - mean);
  const float rstd = 1.0f / std::sqrt(sum_sq / N + p.eps);
  T* out = static_cast<T*>(p.out) + row * N;
  for (c = 0; c + L <= N; c += L) {
    V y = (loadv<V>(h + c) - mean) * rstd * loadv<V>(p.weight + c);
    if (p.bias) y += loadv<V>(p.bias + c);
    storev(out + c, y);
  }
  for (; c < N; ++c) out[c] = from_float<T>((h[c] - mean) * rstd * p.weight[c] + (p.bias ? p.bias[c] : 0.f));
}

template <typename T, typename V>
HE_INLINE void norm_rows(const NormParams& p, int64_t begin, int64_t end) {
  std::vector<float> h(p.hidden);
  for (int64_t row = begin; row < end; ++row) norm_row<T, V>(p, row, h.data());
}

HE_MULTIVERSION(run_norm, norm_rows, NormParams)

at::Tensor vector_param(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(-1), kOp, ": ", name, " must be [", x.size(-1),
              "] (the hidden size of x), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), kOp, ": ", name,
              " must be float32 or x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                            double eps, bool rms) {
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., hidden], got a 0-d tensor");
  check_input(x, kOp, "x", x.dim(), "[..., hidden]");
  check_float_dtype(x, kOp, "x");
  if (residual) {
    check_input(*residual, kOp, "residual", x.dim(), "x's shape");
    check_same_dtype(*residual, x, kOp, "residual", "x");
    TORCH_CHECK(residual->sizes() == x.sizes(), kOp, ": residual shape ", residual->sizes(),
                " must equal x shape ", x.sizes());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, kOp, ": eps must be finite and >= 0, got ", eps);
  const at::Tensor w = vector_param(weight, x, "weight");
  const at::Tensor b = bias ? vector_param(*bias, x, "bias") : at::Tensor();
  at::Tensor out = at::empty_like(x);
  at::Tensor new_residual = residual ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t hidden = x.size(-1), rows = hidden ? x.numel() / hidden : 0;
  const NormParams p{x.data_ptr(), residual ? residual->data_ptr() : nullptr, w.data_ptr<float>(),
                     bias ? b.data_ptr<float>() : nullptr, out.data_ptr(), new_residual.data_ptr(),
                     hidden, static_cast<float>(eps), rms};
  parallel_run(x.scalar_type(), rows, rows_per_task(hidden), p, run_norm<float>, run_norm<uint16_t>);
  return {out, new_residual};
}

}  // namespace hybrid_engine::cpu
