// silu(gate) * up of a fused gate/up projection, in one pass over memory (plain torch makes the
// silu in a temporary and multiplies in a second pass).
#include <vector>

#include "ops.h"
#include "vec.h"

namespace hybrid_engine::cpu {
namespace {

constexpr const char* kOp = "silu_and_mul";

struct SiluParams {
  const void* x;
  void* out;
  int64_t inter;  // I: x rows are [gate (I), up (I)]
};

// silu(g) = g / (1 + exp(-g)); exp_v is only accurate up to 88, and beyond it silu(g) is -0 anyway.
template <typename V>
HE_INLINE V silu_v(V g) {
  const V neg = -g;
  return g / (1.0f + exp_v(neg > 88.0f ? V{} + 88.0f : neg));
}

template <typename T, typename V>
HE_INLINE void silu_rows(const SiluParams& p, int64_t begin, int64_t end) {
  constexpr int64_t L = lanes<V>;
  const int64_t I = p.inter;
  for (int64_t row = begin; row < end; ++row) {
    const T* gate = static_cast<const T*>(p.x) + row * 2 * I;
    const T* up = gate + I;
    T* out = static_cast<T*>(p.out) + row * I;
    int64_t c = 0;
    for (; c + L <= I; c += L) storev(out + c, silu_v(loadv<V>(gate + c)) * loadv<V>(up + c));
    for (; c < I; ++c) {
      const float g = to_float(gate[c]);
      out[c] = from_float<T>(g / (1.0f + std::exp(-g)) * to_float(up[c]));
    }
  }
}

HE_MULTIVERSION(run_silu, silu_rows, SiluParams)

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., 2 * intermediate], got a 0-d tensor");
  check_input(x, kOp, "x", x.dim(), "[..., 2 * intermediate]");
  check_float_dtype(x, kOp, "x");
  TORCH_CHECK(x.size(-1) % 2 == 0, kOp, ": x must have an even last dimension, got shape ", x.sizes());
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, x.options());
  const SiluParams p{x.data_ptr(), out.data_ptr(), shape.back()};
  const int64_t rows = p.inter ? out.numel() / p.inter : 0;
  parallel_run(x.scalar_type(), rows, rows_per_task(p.inter), p, run_silu<float>, run_silu<uint16_t>);
  return out;
}

}  // namespace hybrid_engine::cpu
