// DSCR (METHODS §1): the schemas of the dense ops (dscr_refine, dscr_refine_cache_), of the
// structured ones on a patch grid (dscr_refine_lowrank(_cache_): low-rank factors,
// dscr_refine_banded(_cache_): the banded structure; kvfix/dscr_structured.py plans them) and of
// the checks-only ops (dscr_check_grid, dscr_check_params) and of the planner's host code
// (dscr_depth_structure, dscr_gauss_truncation, dscr_fit_rows: csrc/kernels/dscr_plan.h); every
// check, stated once; the Meta kernels; the CPU
// registrations (kernels: csrc/cpu/dscr*.cpp; the CUDA kernels register themselves in
// csrc/cuda/dscr*.cu).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/dscr_plan.h"
#include "ops/dscr.h"

namespace kvfix {

// The float32 proximity coefficients; errors name the parameter (ValueError).
static DscrCoefs dscr_coefs(const char* op, double sigma_d, double sigma_s, double alpha, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(sigma_d) && sigma_d > 0, op, ": sigma_d must be finite and > 0, got ", sigma_d);
  TORCH_CHECK_VALUE(std::isfinite(sigma_s) && sigma_s > 0, op, ": sigma_s must be finite and > 0, got ", sigma_s);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0, op, ": alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0, op, ": beta must be finite and >= 0, got ", beta);
  const float coef_d = static_cast<float>(alpha / (2.0 * sigma_d * sigma_d));
  const float coef_s = static_cast<float>(beta / (2.0 * sigma_s * sigma_s));
  // A tiny sigma overflows the float32 coefficient (inf * 0 = nan for equal depths).
  TORCH_CHECK_VALUE(std::isfinite(coef_d), op, ": sigma_d=", sigma_d,
                    " is too small: the proximity coefficient alpha / (2 sigma_d^2) overflows float32");
  TORCH_CHECK_VALUE(std::isfinite(coef_s), op, ": sigma_s=", sigma_s,
                    " is too small: the proximity coefficient beta / (2 sigma_s^2) overflows float32");
  return {coef_d, coef_s};
}

// A key / value tensor: [B, H, N, D], float32 / float16 / bfloat16, contiguous last dim.
static void dscr_check_kv(const char* op, const at::Tensor& x, const std::string& name) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be [B, H, N, D], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(x.size(3) <= 1 || x.stride(3) == 1, op, ": ", name, " needs a contiguous last dimension (stride ",
                    x.stride(3), ")");
}

// The keys and values of a DSCR op: keys = {k} and values = {} or {v} for the out-of-place ops
// (cache = false: the errors say k, v), one tensor per layer for the in-place ones (keys[l],
// values[l]). Every layer [B, H, N, D] with k's B, N and device; values[l] like keys[l].
static void dscr_check_layers(const char* op, at::TensorList keys, at::TensorList values, bool cache) {
  auto key_name = [&](size_t l) { return cache ? "keys[" + std::to_string(l) + "]" : std::string("k"); };
  auto value_name = [&](size_t l) { return cache ? "values[" + std::to_string(l) + "]" : std::string("v"); };
  TORCH_CHECK_VALUE(!keys.empty(), op, ": keys must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(values.empty() || values.size() == keys.size(), op, ": values has ", values.size(),
                    " tensors but keys has ", keys.size());
  const at::Tensor& k = keys[0];
  for (size_t l = 0; l < keys.size(); ++l) {
    dscr_check_kv(op, keys[l], key_name(l));
    TORCH_CHECK_VALUE(keys[l].size(0) == k.size(0) && keys[l].size(2) == k.size(2) && keys[l].device() == k.device(),
                      op, ": ", key_name(l), " has shape ", keys[l].sizes(), " on ", keys[l].device(),
                      "; every layer needs B=", k.size(0), ", N=", k.size(2), " on ", k.device());
  }
  for (size_t l = 0; l < values.size(); ++l) {
    const at::Tensor &x = values[l], &kl = keys[l];
    const std::string vn = value_name(l), kn = key_name(l);
    dscr_check_kv(op, x, vn);
    if (cache) {
      TORCH_CHECK_VALUE(x.sizes() == kl.sizes() && x.scalar_type() == kl.scalar_type() && x.device() == kl.device(),
                        op, ": ", vn, " (", x.sizes(), ", ", x.scalar_type(), ", ", x.device(), ") does not match ",
                        kn, " (", kl.sizes(), ", ", kl.scalar_type(), ", ", kl.device(), ")");
    } else {
      TORCH_CHECK_VALUE(x.sizes() == kl.sizes(), op, ": v shape ", x.sizes(), " does not match k shape ", kl.sizes());
      TORCH_CHECK_TYPE(x.scalar_type() == kl.scalar_type(), op, ": v dtype ", x.scalar_type(),
                       " does not match k dtype ", kl.scalar_type());
      TORCH_CHECK_VALUE(x.device() == kl.device(), op, ": v is on ", x.device(), " but k is on ", kl.device());
    }
  }
}

// A float32 input (the wrapper converts) on k's device; contiguous where the kernels need it.
static void dscr_check_f32(const char* op, const at::Tensor& x, const char* name, const at::Tensor& k) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": ", name,
                   " must be a floating-point tensor (float32; the wrapper converts), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == k.device(), op, ": ", name, " is on ", x.device(), " but k is on ", k.device());
}

// depth: float32 [1 or B, N] on k's device.
static void dscr_check_depth(const char* op, const at::Tensor& depth, const at::Tensor& k) {
  dscr_check_f32(op, depth, "depth", k);
  const int64_t B = k.size(0), N = k.size(2);
  TORCH_CHECK_VALUE(depth.dim() == 2 && (depth.size(0) == 1 || depth.size(0) == B) && depth.size(1) == N, op,
                    ": depth must be [N] or [B, N] with B=", B, ", N=", N, " (the op takes [1 or B, N]), got shape ",
                    depth.sizes());
}

// Every check of dscr_refine / dscr_refine_cache_, stated once: the CPU, CUDA and Meta kernels
// call it; the Python wrappers only convert arguments. keys = {k} and values = {} or {v} for
// dscr_refine (cache = false: the errors say k, v), one tensor per layer for dscr_refine_cache_.
// Errors name the argument: ValueError (shape, device, range), TypeError (dtype). The values of
// depth and coords (finite) are checked by dscr_check_finite on the CPU; the CUDA kernel reads
// nothing on the host and writes nan over an item whose depth or coords are not finite.
DscrCoefs dscr_check(const char* op, at::TensorList keys, at::TensorList values, bool cache, const at::Tensor& depth,
                     const at::Tensor& coords, double sigma_d, double sigma_s, double alpha, double beta) {
  dscr_check_layers(op, keys, values, cache);
  const DscrCoefs c = dscr_coefs(op, sigma_d, sigma_s, alpha, beta);
  const at::Tensor& k = keys[0];
  const int64_t B = k.size(0), N = k.size(2);
  dscr_check_depth(op, depth, k);
  dscr_check_f32(op, coords, "coords", k);
  TORCH_CHECK_VALUE(coords.dim() == 3 && coords.size(0) == depth.size(0) && coords.size(1) == N &&
                        coords.size(2) == 2,
                    op, ": coords must be [N, 2] or [B, N, 2] with B=", B, ", N=", N, " (the op takes [",
                    depth.size(0), ", N, 2], as depth), got shape ", coords.sizes());
  TORCH_CHECK_VALUE(depth.is_contiguous() && coords.is_contiguous(), op,
                    ": depth and coords must be contiguous (the wrapper converts)");
  return c;
}

// The grid form coords=(gh, gw) of dscr_refine / dscr_refine_cache_ (cache: which), checked before
// the plan reads depth on the host (kvfix.ops.dscr): the layers and parameters as dscr_check, the
// grid holds the N tokens, depth float32 [1 or B, N] on k's device and not meta. The op
// dscr_check_grid runs it (one kernel for every device).
static void dscr_check_grid(at::TensorList keys, at::TensorList values, bool cache, const at::Tensor& depth,
                            int64_t gh, int64_t gw, double sigma_d, double sigma_s, double alpha, double beta) {
  const char* op = cache ? "dscr_refine_cache_" : "dscr_refine";
  dscr_check_layers(op, keys, values, cache);
  const at::Tensor& k = keys[0];
  TORCH_CHECK_VALUE(gh >= 1 && gw >= 1 && gh * gw == k.size(2), op, ": coords grid ", gh, " x ", gw, " has ", gh * gw,
                    " tokens but ", cache ? "keys[0]" : "k", " has N=", k.size(2));
  dscr_coefs(op, sigma_d, sigma_s, alpha, beta);
  dscr_check_depth(op, depth, k);
  TORCH_CHECK_VALUE(!depth.is_meta(), op, ": depth is a meta tensor: the grid form coords=(gh, gw) reads the depth "
                    "range on the host; pass coords=kvfix.patch_coords(gh, gw) (the dense algorithm) for meta tensors");
}

// The parameters alone (kvfix.dscr_plan, kvfix.hf.DSCR's settings): dscr_check_params runs it.
static void dscr_check_params(c10::string_view op, double sigma_d, double sigma_s, double alpha, double beta) {
  dscr_coefs(std::string(op).c_str(), sigma_d, sigma_s, alpha, beta);
}

// The "values" node kernel's rows fitted to the depths, for the plan of a new image
// (kvfix/dscr_structured.py, _atom_rows_fitted): host tensors in, (kept_lo, kept_len, dropped) out.
// Every index the loop reads is checked first (ValueError / TypeError naming the argument).
static std::tuple<at::Tensor, at::Tensor, at::Tensor> dscr_fit_rows(const at::Tensor& e, const at::Tensor& counts,
                                                                    const at::Tensor& row_lo,
                                                                    const at::Tensor& row_len, double cd,
                                                                    double allowed) {
  const char* op = "dscr_fit_rows";
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"e", &e}, {"counts", &counts}, {"row_lo", &row_lo}, {"row_len", &row_len}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->is_contiguous(), op, ": ", name,
                      " must be a contiguous 1-D CPU tensor, got ", t->sizes(), " on ", t->device());
    TORCH_CHECK_VALUE(t->numel() == e.numel(), op, ": ", name, " must have ", e.numel(), " entries (as e), got ",
                      t->numel());
    TORCH_CHECK_TYPE(t->scalar_type() == (t == &e ? at::kDouble : at::kLong), op, ": ", name, " must be ",
                     (t == &e ? "float64" : "int64"), ", got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(std::isfinite(cd) && cd >= 0, op, ": cd must be finite and >= 0, got ", cd);
  TORCH_CHECK_VALUE(!std::isnan(allowed), op, ": allowed must not be nan");
  const int64_t G = e.numel();
  const double* ep = e.data_ptr<double>();
  const int64_t* lo = row_lo.data_ptr<int64_t>();
  const int64_t* len = row_len.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK_VALUE(lo[g] >= 0 && lo[g] <= g && len[g] >= g - lo[g] + 1 && len[g] <= G - lo[g], op,
                      ": row ", g, " must be a window of the ", G, " nodes that holds node ", g, ", got row_lo ",
                      lo[g], ", row_len ", len[g]);
    TORCH_CHECK_VALUE(std::isfinite(ep[g]) && (g == 0 || ep[g] > ep[g - 1]), op,
                      ": e must be finite and strictly increasing (entry ", g, ")");
  }
  at::Tensor kept_lo = at::empty({G}, row_lo.options()), kept_len = at::empty({G}, row_lo.options());
  at::Tensor dropped = at::empty({G}, e.options());
  kernels::dscr_fit_rows(ep, counts.data_ptr<int64_t>(), lo, len, G, cd, allowed, kept_lo.data_ptr<int64_t>(),
                         kept_len.data_ptr<int64_t>(), dropped.data_ptr<double>());
  return {kept_lo, kept_len, dropped};
}

// A contiguous 1-D float64 CPU tensor of finite values (ValueError / TypeError naming it).
static void check_host_depths(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
                    " must be a contiguous 1-D CPU tensor, got ", t.sizes(), " on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ", t.scalar_type());
  const double* p = t.data_ptr<double>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p[i]), op, ": ", name, " must be finite (entry ", i, " is ", p[i], ")");
  }
}

// One item's depth structure for the plan of a new image (kvfix/dscr_structured.py,
// _depth_structure; csrc/kernels/dscr_plan.h says what is built): host tensors in; out tok int64
// [N], tokw float64 [N, order], row_lo int64 [G], row_len int64 [G], tvals float64 [nnz], cinv
// float64 [N] (empty without spatial) and info float64 [7]: mode (0 none, 1 values, 2 grid, 3
// gauss), error, ops, step, order, rel, amp. orders: float64 [n, 3], rows (p, Lebesgue constant,
// interpolation error coefficient) of the grid orders to consider; force: -1 the cheapest, 0
// values, -2 gauss, p the grid of order p (one of orders' rows).
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dscr_depth_structure(const at::Tensor& depth, double cd, double budget, const at::Tensor& orders, int64_t force,
                     double cap, const std::optional<at::Tensor>& spatial) {
  const char* op = "dscr_depth_structure";
  check_host_depths(op, "depth", depth);
  const int64_t N = depth.numel();
  TORCH_CHECK_VALUE(std::isfinite(cd) && cd >= 0, op, ": cd must be finite and >= 0, got ", cd);
  TORCH_CHECK_VALUE(std::isfinite(budget) && budget > 0, op, ": budget must be finite and > 0, got ", budget);
  TORCH_CHECK_VALUE(!std::isnan(cap), op, ": cap must not be nan");
  TORCH_CHECK_VALUE(orders.device().is_cpu() && orders.dim() == 2 && orders.size(1) == 3 && orders.is_contiguous(),
                    op, ": orders must be a contiguous [n, 3] CPU tensor (p, lam, coef), got ", orders.sizes(),
                    " on ", orders.device());
  TORCH_CHECK_TYPE(orders.scalar_type() == at::kDouble, op, ": orders must be float64, got ", orders.scalar_type());
  const double* o = orders.data_ptr<double>();
  bool forced_found = force >= -2 && force <= 0;
  for (int64_t k = 0; k < orders.size(0); ++k) {
    const double p = o[3 * k], lam = o[3 * k + 1], coef = o[3 * k + 2];
    TORCH_CHECK_VALUE(p >= 1 && p <= 64 && p == std::floor(p) && std::isfinite(lam) && lam >= 1 &&
                          !std::isnan(coef) && coef >= 0,
                      op, ": orders row ", k, " must hold an order p in [1, 64], a Lebesgue constant >= 1 and a ",
                      "coefficient >= 0 (inf: order skipped), got (", p, ", ", lam, ", ", coef, ")");
    forced_found = forced_found || force == static_cast<int64_t>(p);
  }
  const std::vector<kernels::DscrGridOrder> table = kernels::dscr_grid_orders(o, orders.size(0));
  TORCH_CHECK_VALUE(forced_found, op, ": force must be -1 (the cheapest), 0 (values), -2 (gauss) or a grid order of ",
                    "orders, got ", force);
  const double* sp = nullptr;
  if (spatial.has_value()) {
    check_host_depths(op, "spatial", *spatial);
    TORCH_CHECK_VALUE(spatial->numel() == N, op, ": spatial must have ", N, " entries (as depth), got ",
                      spatial->numel());
    sp = spatial->data_ptr<double>();
  }
  kernels::DscrDepthStructure s = kernels::dscr_depth_structure(
      depth.data_ptr<double>(), N, cd, budget, table.data(), static_cast<int64_t>(table.size()), force, cap, sp);
  auto i64 = [](const std::vector<int64_t>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  };
  auto f64 = [](const std::vector<double>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kDouble));
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t;
  };
  at::Tensor info = at::empty({kernels::kDscrDepthInfo}, at::TensorOptions().dtype(at::kDouble));
  kernels::dscr_depth_info(s, info.data_ptr<double>());
  const int64_t width = s.mode == 0 ? 0 : s.order;
  return {i64(s.tok), f64(s.tokw).view({s.mode == 0 ? 0 : N, width}), i64(s.row_lo), i64(s.row_len), f64(s.tvals),
          f64(s.cinv), info};
}

// The Gaussian nodes' truncation bound over depths d (csrc/kernels/dscr_plan.h,
// dscr_gauss_truncation), for the plan's tests and docs.
static double dscr_gauss_truncation(const at::Tensor& d, double cd, double R, double step, double alias) {
  const char* op = "dscr_gauss_truncation";
  check_host_depths(op, "d", d);
  TORCH_CHECK_VALUE(d.numel() > 0, op, ": d must not be empty");
  const std::pair<const char*, double> params[] = {{"cd", cd}, {"R", R}, {"step", step}, {"alias", alias}};
  for (const auto& [name, v] : params) {
    TORCH_CHECK_VALUE(std::isfinite(v) && (v > 0 || (v == 0 && name[0] == 'a')), op, ": ", name,
                      name[0] == 'a' ? " must be finite and >= 0, got " : " must be finite and > 0, got ", v);
  }
  return kernels::dscr_gauss_truncation(d.data_ptr<double>(), d.numel(), cd, R, step, alias);
}

void dscr_check_finite(const char* op, const at::Tensor& depth, const at::Tensor& coords) {
  // The CPU kernels' check (one read each, no device round trip); CUDA does not call it (issue 18:
  // the kernel detects non-finite geometry itself and writes the item nan, csrc/kernels/dscr.cuh).
  TORCH_CHECK_VALUE(depth.isfinite().all().item<bool>(), op, ": depth has non-finite values (nan or inf)");
  TORCH_CHECK_VALUE(coords.isfinite().all().item<bool>(), op, ": coords has non-finite values (nan or inf)");
}

// Meta (torch.compile / FakeTensor / meta tensors): the same checks, outputs of the right shape.
static std::vector<at::Tensor> dscr_refine_meta(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                const at::Tensor& depth, const at::Tensor& coords, double sigma_d,
                                                double sigma_s, double alpha, double beta) {
  std::vector<at::Tensor> ks{k}, vs;
  if (v.has_value()) vs.push_back(*v);
  dscr_check("dscr_refine", ks, vs, false, depth, coords, sigma_d, sigma_s, alpha, beta);
  std::vector<at::Tensor> outs{at::empty(k.sizes(), k.options())};
  if (v.has_value()) outs.push_back(at::empty(v->sizes(), v->options()));
  return outs;
}

static void dscr_refine_cache__meta(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                    const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                                    double beta) {
  dscr_check("dscr_refine_cache_", keys, values, true, depth, coords, sigma_d, sigma_s, alpha, beta);
}

// ---------------------------------------------------------------------------------------------
// Structured DSCR (kvfix/dscr_structured.py): the low-rank factors and the banded structure.

// A float32 / int32 / int64 tensor the plan builds: dtype, contiguous, on k's device.
static void dscr_check_operand(const char* op, const at::Tensor& x, const char* name, at::ScalarType st,
                               const at::Tensor& k) {
  TORCH_CHECK_TYPE(x.scalar_type() == st, op, ": ", name, " must be ",
                   st == at::kFloat ? "float32" : st == at::kInt ? "int32" : "int64", ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == k.device(), op, ": ", name, " is on ", x.device(), " but k is on ", k.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Every tensor to refine as one flat list: each layer's key, then its value.
static std::vector<at::Tensor> dscr_flatten(at::TensorList keys, at::TensorList values) {
  std::vector<at::Tensor> all;
  for (size_t l = 0; l < keys.size(); ++l) {
    all.push_back(keys[l]);
    if (!values.empty()) all.push_back(values[l]);
  }
  return all;
}

std::vector<at::Tensor> dscr_lowrank_operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                              const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                              const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                              int64_t rank_d) {
  dscr_check_layers(op, keys, values, cache);
  const at::Tensor& k = keys[0];
  const int64_t N = k.size(2);
  dscr_check_depth(op, depth, k);
  TORCH_CHECK_VALUE(depth.is_contiguous(), op, ": depth must be contiguous (the wrapper converts)");
  for (const auto& [x, name] : {std::pair<const at::Tensor*, const char*>{&lr, "lr"}, {&rr, "rr"}, {&lc, "lc"},
                                {&rc, "rc"}})
    dscr_check_operand(op, *x, name, at::kFloat, k);
  TORCH_CHECK_VALUE(lr.dim() == 2, op, ": lr must be [gh, pr], got shape ", lr.sizes());
  TORCH_CHECK_VALUE(rr.sizes() == lr.sizes(), op, ": rr shape ", rr.sizes(), " does not match lr shape ", lr.sizes());
  TORCH_CHECK_VALUE(lc.dim() == 2, op, ": lc must be [gw, pc], got shape ", lc.sizes());
  TORCH_CHECK_VALUE(rc.sizes() == lc.sizes(), op, ": rc shape ", rc.sizes(), " does not match lc shape ", lc.sizes());
  TORCH_CHECK_VALUE(lr.size(0) * lc.size(0) == N, op, ": lr, lc: grid ", lr.size(0), " x ", lc.size(0),
                    " does not hold N=", N, " tokens");
  TORCH_CHECK_VALUE(std::isfinite(coef_d) && coef_d >= 0, op, ": coef_d must be finite and >= 0, got ", coef_d);
  TORCH_CHECK_VALUE(rank_d >= 1 && rank_d <= 4096, op, ": rank_d must be in [1, 4096], got ", rank_d);
  return dscr_flatten(keys, values);
}

std::vector<at::Tensor> dscr_banded_operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                             const DscrBanded& s) {
  dscr_check_layers(op, keys, values, cache);
  const at::Tensor& k = keys[0];
  const int64_t B = k.size(0), N = k.size(2);
  TORCH_CHECK_VALUE(s.gh >= 1 && N % s.gh == 0, op, ": gh=", s.gh, " does not divide N=", N);
  for (const auto& [x, name, st] : {std::tuple<const at::Tensor*, const char*, at::ScalarType>{&s.tok, "tok", at::kInt},
                                    {&s.tokw, "tokw", at::kFloat}, {&s.cnt, "cnt", at::kInt},
                                    {&s.row_ptr, "row_ptr", at::kLong}, {&s.row_lo, "row_lo", at::kInt},
                                    {&s.tvals, "tvals", at::kFloat}, {&s.node_off, "node_off", at::kLong},
                                    {&s.cinv, "cinv", at::kFloat}, {&s.band, "band", at::kFloat}})
    dscr_check_operand(op, *x, name, st, k);
  TORCH_CHECK_VALUE(s.tok.dim() == 2 && (s.tok.size(0) == 1 || s.tok.size(0) == B) && s.tok.size(1) == N, op,
                    ": tok must be [1 or B, N] with B=", B, ", N=", N, ", got shape ", s.tok.sizes());
  const int64_t Bd = s.tok.size(0);
  TORCH_CHECK_VALUE(s.cinv.sizes() == s.tok.sizes(), op, ": cinv shape ", s.cinv.sizes(), " does not match tok shape ",
                    s.tok.sizes());
  TORCH_CHECK_VALUE(s.tokw.dim() == 3 && s.tokw.size(0) == Bd && s.tokw.size(1) == N, op, ": tokw must be [", Bd, ", ",
                    N, ", C] (as tok), got shape ", s.tokw.sizes());
  TORCH_CHECK_VALUE(s.cnt.dim() == 1 && s.cnt.size(0) == Bd, op, ": cnt must be [", Bd, "] (as tok), got shape ",
                    s.cnt.sizes());
  TORCH_CHECK_VALUE(s.node_off.dim() == 1 && s.node_off.size(0) == Bd + 1, op, ": node_off must be [", Bd + 1,
                    "] (one more than tok's items), got shape ", s.node_off.sizes());
  TORCH_CHECK_VALUE(s.band.dim() == 1 && s.band.size(0) >= 1, op, ": band must be [K + 1] with K >= 0, got shape ",
                    s.band.sizes());
  TORCH_CHECK_VALUE(s.row_lo.dim() == 1 && s.tvals.dim() == 1, op, ": row_lo and tvals must be 1-D, got shapes ",
                    s.row_lo.sizes(), " and ", s.tvals.sizes());
  const int64_t G = s.row_lo.size(0);
  TORCH_CHECK_VALUE(s.row_ptr.dim() == 1 && s.row_ptr.size(0) == G + 1, op, ": row_ptr must be [", G + 1,
                    "] (one more than row_lo), got shape ", s.row_ptr.sizes());
  // The values index memory: read on the host where they are (CPU; a device's kernel relies on the plan).
  if (s.node_off.is_cpu() && !s.node_off.is_meta()) {
    const int64_t* off = s.node_off.const_data_ptr<int64_t>();
    const int64_t* rp = s.row_ptr.const_data_ptr<int64_t>();
    const int32_t* lo = s.row_lo.const_data_ptr<int32_t>();
    const int32_t* cnt = s.cnt.const_data_ptr<int32_t>();
    TORCH_CHECK_VALUE(off[0] == 0 && off[Bd] == G, op, ": node_off must run from 0 to G = ", G, " (row_lo's length)");
    TORCH_CHECK_VALUE(rp[0] == 0 && rp[G] == s.tvals.size(0), op, ": row_ptr must run from 0 to ", s.tvals.size(0),
                      " (tvals' length)");
    for (int64_t bd = 0; bd < Bd; ++bd) {
      const int64_t g0 = off[bd], g1 = off[bd + 1], Gi = g1 - g0;
      TORCH_CHECK_VALUE(g1 >= g0, op, ": node_off must not decrease (item ", bd, ")");
      TORCH_CHECK_VALUE(cnt[bd] >= 1 && cnt[bd] <= s.tokw.size(2), op, ": cnt of item ", bd, " is ", cnt[bd],
                        ", must be in [1, ", s.tokw.size(2), "] (tokw's last dim)");
      for (int64_t n = g0; n < g1; ++n)
        TORCH_CHECK_VALUE(rp[n + 1] >= rp[n] && lo[n] >= 0 && lo[n] + (rp[n + 1] - rp[n]) <= Gi, op,
                          ": row_lo / row_ptr: node row ", n, " out of range");
      const int32_t* tk = s.tok.const_data_ptr<int32_t>() + bd * N;
      for (int64_t i = 0; i < N; ++i)
        TORCH_CHECK_VALUE(tk[i] >= 0 && tk[i] + cnt[bd] <= Gi, op, ": tok: token node out of range (item ", bd,
                          ", token ", i, ")");
    }
  }
  return dscr_flatten(keys, values);
}

// Meta (torch.compile / FakeTensor / meta tensors): the same checks, outputs of the right shape.
static std::vector<at::Tensor> dscr_meta_outputs(const std::vector<at::Tensor>& srcs) {
  std::vector<at::Tensor> outs;
  for (const at::Tensor& x : srcs) outs.push_back(at::empty(x.sizes(), x.options()));
  return outs;
}

static std::vector<at::Tensor> dscr_refine_lowrank_meta(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                        const at::Tensor& depth, const at::Tensor& lr,
                                                        const at::Tensor& rr, const at::Tensor& lc,
                                                        const at::Tensor& rc, double coef_d, int64_t rank_d) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  return dscr_meta_outputs(
      dscr_lowrank_operands("dscr_refine_lowrank", {k}, vs, false, depth, lr, rr, lc, rc, coef_d, rank_d));
}

static void dscr_refine_lowrank_cache__meta(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                            const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                            const at::Tensor& rc, double coef_d, int64_t rank_d) {
  dscr_lowrank_operands("dscr_refine_lowrank_cache_", keys, values, true, depth, lr, rr, lc, rc, coef_d, rank_d);
}

static std::vector<at::Tensor> dscr_refine_banded_meta(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                       const at::Tensor& tok, const at::Tensor& tokw,
                                                       const at::Tensor& cnt, const at::Tensor& row_ptr,
                                                       const at::Tensor& row_lo, const at::Tensor& tvals,
                                                       const at::Tensor& node_off, const at::Tensor& cinv,
                                                       const at::Tensor& band, int64_t gh) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const DscrBanded s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  return dscr_meta_outputs(dscr_banded_operands("dscr_refine_banded", {k}, vs, false, s));
}

static void dscr_refine_banded_cache__meta(at::TensorList keys, at::TensorList values, const at::Tensor& tok,
                                           const at::Tensor& tokw, const at::Tensor& cnt, const at::Tensor& row_ptr,
                                           const at::Tensor& row_lo, const at::Tensor& tvals,
                                           const at::Tensor& node_off, const at::Tensor& cinv, const at::Tensor& band,
                                           int64_t gh) {
  const DscrBanded s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  dscr_banded_operands("dscr_refine_banded_cache_", keys, values, true, s);
}

}  // namespace kvfix

TORCH_LIBRARY_FRAGMENT(kvfix, m) {
  m.def("dscr_refine(Tensor k, Tensor? v, Tensor depth, Tensor coords, float sigma_d, "
        "float sigma_s, float alpha, float beta) -> Tensor[]");
  m.def("dscr_refine_cache_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor depth, Tensor coords, "
        "float sigma_d, float sigma_s, float alpha, float beta) -> ()");
  // Checks only (the grid form before planning; the parameters of a plan): one kernel for every device.
  m.def("dscr_check_grid(Tensor[] keys, Tensor[] values, bool cache, Tensor depth, int gh, int gw, float sigma_d, "
        "float sigma_s, float alpha, float beta) -> ()");
  m.def("dscr_check_params(str op, float sigma_d, float sigma_s, float alpha, float beta) -> ()",
        &kvfix::dscr_check_params);
  // The planner's host code (host tensors whatever the model's device): one kernel for every key.
  m.def("dscr_depth_structure(Tensor depth, float cd, float budget, Tensor orders, int force, float cap, "
        "Tensor? spatial) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &kvfix::dscr_depth_structure);
  m.def("dscr_gauss_truncation(Tensor d, float cd, float R, float step, float alias) -> float",
        &kvfix::dscr_gauss_truncation);
  m.def("dscr_fit_rows(Tensor e, Tensor counts, Tensor row_lo, Tensor row_len, float cd, float allowed) -> "
        "(Tensor, Tensor, Tensor)",
        &kvfix::dscr_fit_rows);
  m.def("dscr_refine_lowrank(Tensor k, Tensor? v, Tensor depth, Tensor lr, Tensor rr, Tensor lc, Tensor rc, "
        "float coef_d, int rank_d) -> Tensor[]");
  m.def("dscr_refine_lowrank_cache_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor depth, Tensor lr, Tensor rr, "
        "Tensor lc, Tensor rc, float coef_d, int rank_d) -> ()");
  m.def("dscr_refine_banded(Tensor k, Tensor? v, Tensor tok, Tensor tokw, Tensor cnt, Tensor row_ptr, "
        "Tensor row_lo, Tensor tvals, Tensor node_off, Tensor cinv, Tensor band, int gh) -> Tensor[]");
  m.def("dscr_refine_banded_cache_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor tok, Tensor tokw, Tensor cnt, "
        "Tensor row_ptr, Tensor row_lo, Tensor tvals, Tensor node_off, Tensor cinv, Tensor band, int gh) -> ()");
}

TORCH_LIBRARY_IMPL(kvfix, CompositeExplicitAutograd, m) {
  m.impl("dscr_check_grid", &kvfix::dscr_check_grid);
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_cpu);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache_checked<&kvfix::dscr_refine_cache_cpu>);
  m.impl("dscr_refine_lowrank", &kvfix::dscr_refine_lowrank_cpu);
  m.impl("dscr_refine_lowrank_cache_", &kvfix::dscr_refine_lowrank_cache_checked<&kvfix::dscr_refine_lowrank_cache_cpu>);
  m.impl("dscr_refine_banded", &kvfix::dscr_refine_banded_cpu);
  m.impl("dscr_refine_banded_cache_", &kvfix::dscr_refine_banded_cache_checked<&kvfix::dscr_refine_banded_cache_cpu>);
}

TORCH_LIBRARY_IMPL(kvfix, Meta, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_meta);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache__meta);
  m.impl("dscr_refine_lowrank", &kvfix::dscr_refine_lowrank_meta);
  m.impl("dscr_refine_lowrank_cache_", &kvfix::dscr_refine_lowrank_cache__meta);
  m.impl("dscr_refine_banded", &kvfix::dscr_refine_banded_meta);
  m.impl("dscr_refine_banded_cache_", &kvfix::dscr_refine_banded_cache__meta);
}
