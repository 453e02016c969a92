// C++ test (ctest): kvfix::dscr_refine through the dispatcher, as a C++ caller would use it,
// against a naive double-precision loop written from METHODS §1; and the in-place cache op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

// out[b, h, j, :] = sum_i w[i, j] k[b, h, i, :], double precision, straight from the spec.
at::Tensor naive(const at::Tensor& k, const at::Tensor& depth, const at::Tensor& coords, double sd,
                 double ss, double alpha, double beta) {
  auto kd = k.to(at::kDouble).contiguous();
  auto out = at::empty_like(kd);
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), D = k.size(3);
  auto d = depth.to(at::kDouble).contiguous();
  auto s = coords.to(at::kDouble).contiguous();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t bd = depth.size(0) == 1 ? 0 : b;
    std::vector<double> w(N * N);
    for (int64_t j = 0; j < N; ++j) {
      double c = 0;
      for (int64_t i = 0; i < N; ++i) {
        const double dd = d[bd][i].item<double>() - d[bd][j].item<double>();
        const double dy = s[bd][i][0].item<double>() - s[bd][j][0].item<double>();
        const double dx = s[bd][i][1].item<double>() - s[bd][j][1].item<double>();
        const double wt = i == j ? 0.0
                                 : std::exp(-alpha * dd * dd / (2 * sd * sd)) +
                                       std::exp(-beta * (dy * dy + dx * dx) / (2 * ss * ss));
        w[i * N + j] = wt;
        c += wt;
      }
      for (int64_t i = 0; i < N; ++i) w[i * N + j] = c > 0 ? w[i * N + j] / c : (i == j ? 1.0 : 0.0);
    }
    auto wt = at::from_blob(w.data(), {N, N}, at::kDouble).clone();
    for (int64_t h = 0; h < H; ++h) out[b][h].copy_(at::mm(wt.t(), kd[b][h]));
  }
  (void)D;
  return out;
}

}  // namespace

int main() {
  at::manual_seed(0);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("kvfix::dscr_refine", "")
                .typed<std::vector<at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&, const at::Tensor&, double, double,
                                               double, double)>();
  for (int64_t N : {1, 2, 9, 300}) {
    const int64_t B = 2, H = 3, D = 24;
    auto k = at::randn({B, H, N, D});
    auto v = at::randn({B, H, N, D});
    auto depth = at::rand({B, N});
    auto coords = at::rand({1, N, 2}).expand({B, N, 2}).contiguous();
    auto outs = op.call(k, v, depth, coords, 0.6, 0.6, 0.6, 0.8);
    expect(outs.size() == 2, "two outputs");
    const double ek = (outs[0].to(at::kDouble) - naive(k, depth, coords, 0.6, 0.6, 0.6, 0.8)).abs().max().item<double>();
    const double ev = (outs[1].to(at::kDouble) - naive(v, depth, coords, 0.6, 0.6, 0.6, 0.8)).abs().max().item<double>();
    std::printf("dscr_refine N=%lld: max error k %.3g v %.3g\n", (long long)N, ek, ev);
    expect(ek < 1e-5 && ev < 1e-5, "dscr_refine matches the naive loop");

    // bf16 keys only, broadcast geometry.
    auto kb = at::randn({B, H, N, D}).to(at::kBFloat16);
    auto d1 = at::rand({1, N});
    auto c1 = at::rand({1, N, 2});
    auto ob = op.call(kb, std::nullopt, d1, c1, 0.5, 0.9, 0.6, 0.8);
    expect(ob.size() == 1 && ob[0].scalar_type() == at::kBFloat16, "keys-only bf16 output");
    const double eb = (ob[0].to(at::kDouble) - naive(kb, d1, c1, 0.5, 0.9, 0.6, 0.8)).abs().max().item<double>();
    expect(eb < 2e-2, "bf16 within bf16 rounding");
  }

  // In place over two layers' cache slices.
  auto cache_op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("kvfix::dscr_refine_cache_", "")
                      .typed<void(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                                  double, double, double, double)>();
  auto k0 = at::randn({1, 2, 20, 16}), k1 = at::randn({1, 2, 20, 16});
  auto depth = at::rand({1, 12});
  auto coords = at::rand({1, 12, 2});
  auto e0 = naive(k0.narrow(2, 4, 12), depth, coords, 0.6, 0.6, 0.6, 0.8);
  auto e1 = naive(k1.narrow(2, 4, 12), depth, coords, 0.6, 0.6, 0.6, 0.8);
  auto head0 = k0.narrow(2, 0, 4).clone();
  std::vector<at::Tensor> keys{k0.narrow(2, 4, 12), k1.narrow(2, 4, 12)};
  cache_op.call(keys, {}, depth, coords, 0.6, 0.6, 0.6, 0.8);
  expect((k0.narrow(2, 4, 12).to(at::kDouble) - e0).abs().max().item<double>() < 1e-5, "cache layer 0");
  expect((k1.narrow(2, 4, 12).to(at::kDouble) - e1).abs().max().item<double>() < 1e-5, "cache layer 1");
  expect(at::equal(k0.narrow(2, 0, 4), head0), "cache outside the span untouched");

  // Bad input is refused before anything is written.
  auto bad_depth = depth.clone();
  bad_depth[0][3] = NAN;
  auto k_before = k0.clone();
  bool threw = false;
  try {
    cache_op.call(keys, {}, bad_depth, coords, 0.6, 0.6, 0.6, 0.8);
  } catch (const c10::ValueError&) {
    threw = true;
  }
  expect(threw && at::equal(k0, k_before), "non-finite depth: ValueError, nothing written");

  std::printf(failures ? "%d failed\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
