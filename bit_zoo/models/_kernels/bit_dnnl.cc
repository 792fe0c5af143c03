// bit_zoo's oneDNN convolutions, loaded by bit_zoo/models/cpu_kernels.py as MindSpore AOT custom operators.
//
// Why: MindSpore's CPU Conv2D hands oneDNN plain NCHW tensors for every kernel size, and oneDNN
// answers kxk and strided convolutions with its reference code (~0.7 GFLOP/s); the "unfold"
// rewrite (im2col + 1x1 conv) is exact but spends its time in im2col/col2im and in a gemm over
// NCHW, the backward most of all. These operators ask oneDNN for the convolution it runs fastest
// on this CPU: memory formats left to oneDNN ("any", blocked nChw16c / nChw8c on AVX-512 / AVX2),
// forward, backward-data and backward-weights, the tensors reordered from and to NCHW / OIHW
// around each call. That is what PyTorch does for an NCHW tensor on CPU.
//
// The library is MindSpore's own oneDNN (mindspore/lib/libdnnl.so.3, oneDNN 3.x): a second copy
// with the same soname could not be loaded beside it. It is a threadpool-runtime build, so
// its parallel work is handed to OmpPool below (OpenMP, like bit_cpu.cc's kernels). Only the C
// API and plain memory formats are used: they are the same in every oneDNN 3.x.
//
// Each geometry (operator, shapes, stride, padding, dilation) gets a plan, built on first use and
// kept: the primitive descriptors, primitives and reorders. Calls are serialised by one mutex: a
// convolution uses every thread anyway, and the blocked copies then share three scratch buffers
// (grown to the largest call) instead of each plan holding its own.
//
// Interface (MindSpore's AOT convention): params[] holds the inputs then the output; shapes[i]
// and ndims[i] describe params[i]; float32, contiguous. cfg is a tensor of shape (stride, padding + 1,
// dilation, layout) whose values are not read: MindSpore infers a custom operator's output shape from
// its input shapes alone (and keeps one shape function per operator name), so the geometry travels as
// a shape. layout: 1 = NCHW activations, 2 = channels-last (N, H, W, C); weights are OIHW either way.
//   DnnlConv(x, w, cfg) -> y
//   DnnlConvAdd(x, w, shortcut, cfg) -> y + shortcut   (channels-last)
//   DnnlConvBwdData(x, w, dy, cfg) -> dx       (x only gives dx its shape)
//   DnnlConvBwdWeights(w, x, dy, cfg) -> dw    (w only gives dw its shape)
// Return 0 on success; BitDnnlLastError() says why not.

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "oneapi/dnnl/dnnl_threadpool.h"
#include "oneapi/dnnl/dnnl_threadpool_iface.hpp"

namespace {

// oneDNN's parallel work on OpenMP threads, synchronously (parallel_for returns when done).
struct OmpPool final : dnnl::threadpool_interop::threadpool_iface {
  int get_num_threads() const override { return omp_get_max_threads(); }
  bool get_in_parallel() const override { return omp_in_parallel() != 0; }
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 1 || omp_in_parallel()) {
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; ++i) fn(i, n);
  }
  uint64_t get_flags() const override { return 0; }
  void wait() override {}
};

std::string g_error;

bool ok(dnnl_status_t s, const char *what) {
  if (s == dnnl_success) return true;
  g_error = std::string(what) + " failed with oneDNN status " + std::to_string(static_cast<int>(s));
  return false;
}

struct Runtime {
  OmpPool pool;
  dnnl_engine_t engine = nullptr;
  dnnl_stream_t stream = nullptr;
  bool ready = false;
};

Runtime &runtime() {
  static Runtime r;
  if (!r.ready) {
    if (ok(dnnl_engine_create(&r.engine, dnnl_cpu, 0), "dnnl_engine_create") &&
        ok(dnnl_threadpool_interop_stream_create(&r.stream, r.engine, &r.pool), "dnnl_threadpool_interop_stream_create"))
      r.ready = true;
  }
  return r;
}

// Scratch buffers for the blocked copies, shared by all plans (calls are serialised).
struct Scratch {
  void *ptr = nullptr;
  size_t size = 0;
  void *get(size_t n) {
    if (n > size) {
      std::free(ptr);
      ptr = ::aligned_alloc(64, (n + 63) / 64 * 64);
      size = ptr ? n : 0;
    }
    return ptr;
  }
};
constexpr int kMaxOperands = 4;
Scratch g_scratch[kMaxOperands + 1];  // one per operand, and oneDNN's own scratchpad last

// kForwardAdd: the forward with the residual added by oneDNN (a binary post-op) as it writes the
// output, instead of a separate pass over the tensor; channels-last only (the shortcut is read in
// the caller's layout, which is then also the output's).
enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2, kForwardAdd = 3 };

// One tensor of a primitive: the caller's plain (NCHW / OIHW) memory, and, when oneDNN wants
// another format, a memory in that format on a scratch buffer plus the reorder between them.
struct Operand {
  int arg = 0;
  bool output = false;
  dnnl_memory_desc_t user_md = nullptr;
  const_dnnl_memory_desc_t prim_md = nullptr;  // owned by the plan's primitive descriptor
  dnnl_memory_t user = nullptr, prim = nullptr;
  dnnl_primitive_desc_t reorder_pd = nullptr;
  dnnl_primitive_t reorder = nullptr;
  size_t bytes = 0;
};

struct Plan {
  dnnl_primitive_desc_t hint = nullptr, pd = nullptr;
  dnnl_primitive_t prim = nullptr;
  int inputs = 2;
  Operand ops[kMaxOperands];  // the inputs, then the output
  // The scratchpad is ours ("user" mode): oneDNN's own would be allocated and freed on every call.
  dnnl_memory_t scratchpad = nullptr;
  size_t scratchpad_bytes = 0;
  std::string impl;
};

using Key = std::array<int64_t, 12>;
std::map<Key, std::unique_ptr<Plan>> g_plans;
std::mutex g_mutex;

// shape: logical (N, C, H, W) or (O, I, kh, kw) dims; tag: the memory format.
bool make_md(dnnl_memory_desc_t *md, const int64_t *shape, dnnl_format_tag_t tag) {
  dnnl_dims_t dims = {shape[0], shape[1], shape[2], shape[3]};
  return ok(dnnl_memory_desc_create_with_tag(md, 4, dims, dnnl_f32, tag), "dnnl_memory_desc_create_with_tag");
}

bool prepare(Operand &o, Runtime &rt, const_dnnl_primitive_desc_t pd, dnnl_query_t query, int arg, bool output, const int64_t *shape,
             dnnl_format_tag_t tag) {
  o.arg = arg;
  o.output = output;
  if (!make_md(&o.user_md, shape, tag)) return false;
  o.prim_md = dnnl_primitive_desc_query_md(pd, query, 0);
  if (!ok(dnnl_memory_create(&o.user, o.user_md, rt.engine, DNNL_MEMORY_NONE), "dnnl_memory_create")) return false;
  if (dnnl_memory_desc_equal(o.user_md, o.prim_md)) return true;
  o.bytes = dnnl_memory_desc_get_size(o.prim_md);
  if (!ok(dnnl_memory_create(&o.prim, o.prim_md, rt.engine, DNNL_MEMORY_NONE), "dnnl_memory_create")) return false;
  const_dnnl_memory_desc_t from = output ? o.prim_md : o.user_md, to = output ? o.user_md : o.prim_md;
  return ok(dnnl_reorder_primitive_desc_create(&o.reorder_pd, from, rt.engine, to, rt.engine, nullptr), "reorder pd") &&
         ok(dnnl_primitive_create(&o.reorder, o.reorder_pd), "reorder primitive");
}

// x: (n, c, h, w); w: (o, c, k, k); y: (n, o, ho, wo), logical dims; nhwc: the activations' memory format.
Plan *plan_for(Kind kind, const int64_t *xs, const int64_t *ws, int64_t stride, int64_t pad, int64_t dil, bool nhwc) {
  const int64_t k = ws[2];
  const int64_t ho = (xs[2] + 2 * pad - dil * (k - 1) - 1) / stride + 1;
  const int64_t wo = (xs[3] + 2 * pad - dil * (ws[3] - 1) - 1) / stride + 1;
  Key key = {kind * 2 + nhwc, xs[0], xs[1], xs[2], xs[3], ws[0], ws[1], ws[2], ws[3], stride, pad, dil};
  auto found = g_plans.find(key);
  if (found != g_plans.end()) return found->second.get();
  Runtime &rt = runtime();
  if (!rt.ready) return nullptr;
  const int64_t ys[4] = {xs[0], ws[0], ho, wo};
  dnnl_dims_t strides = {stride, stride}, dilates = {dil - 1, dil - 1}, pads = {pad, pad};
  // The right padding that makes the output size come out as computed above (oneDNN checks it).
  dnnl_dims_t pads_r = {(ho - 1) * stride + dil * (k - 1) + 1 - xs[2] - pad, (wo - 1) * stride + dil * (ws[3] - 1) + 1 - xs[3] - pad};
  dnnl_memory_desc_t src = nullptr, wei = nullptr, dst = nullptr;
  auto plan = std::make_unique<Plan>();
  // Channels-last activations are handed to oneDNN as they are (its brgemm convolutions work on
  // that layout: no reorder); NCHW ones in the format oneDNN picks, with reorders around the call.
  // The weights always in oneDNN's own blocked format, reordered from OIHW on each call.
  const dnnl_format_tag_t act = nhwc ? dnnl_acdb : dnnl_abcd, act_prim = nhwc ? dnnl_acdb : dnnl_format_tag_any;
  const bool forward = kind == kForward || kind == kForwardAdd;
  if (kind == kForwardAdd && !nhwc) {
    g_error = "the fused residual add needs channels-last tensors";
    return nullptr;
  }
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_post_ops_t post_ops = nullptr;
  bool good = ok(dnnl_primitive_attr_create(&attr), "dnnl_primitive_attr_create") &&
              ok(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user), "scratchpad mode") &&
              make_md(&src, xs, act_prim) && make_md(&wei, ws, dnnl_format_tag_any) && make_md(&dst, ys, act_prim);
  if (good && kind == kForwardAdd)
    good = ok(dnnl_post_ops_create(&post_ops), "dnnl_post_ops_create") &&
           ok(dnnl_post_ops_append_binary(post_ops, dnnl_binary_add, dst), "dnnl_post_ops_append_binary") &&
           ok(dnnl_primitive_attr_set_post_ops(attr, post_ops), "dnnl_primitive_attr_set_post_ops");
  good = good && ok(dnnl_convolution_forward_primitive_desc_create(&plan->hint, rt.engine,
                                                                   forward ? dnnl_forward_inference : dnnl_forward_training,
                                                                   dnnl_convolution_direct, src, wei, nullptr, dst, strides, dilates, pads,
                                                                   pads_r, forward ? attr : nullptr),
                    "convolution forward pd");
  if (good) {
    if (forward) {
      plan->pd = plan->hint;
      plan->hint = nullptr;
      good = prepare(plan->ops[0], rt, plan->pd, dnnl_query_src_md, DNNL_ARG_SRC, false, xs, act) &&
             prepare(plan->ops[1], rt, plan->pd, dnnl_query_weights_md, DNNL_ARG_WEIGHTS, false, ws, dnnl_abcd);
      if (good && kind == kForwardAdd) {
        plan->inputs = 3;  // the shortcut, in the output's (channels-last) layout: no reorder
        good = prepare(plan->ops[2], rt, plan->pd, dnnl_query_dst_md, DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, false, ys, act);
      }
      good = good && prepare(plan->ops[plan->inputs], rt, plan->pd, dnnl_query_dst_md, DNNL_ARG_DST, true, ys, act);
    } else if (kind == kBackwardData) {
      good = ok(dnnl_convolution_backward_data_primitive_desc_create(&plan->pd, rt.engine, dnnl_convolution_direct, src, wei, dst,
                                                                     strides, dilates, pads, pads_r, plan->hint, attr),
                "convolution backward-data pd") &&
             prepare(plan->ops[0], rt, plan->pd, dnnl_query_diff_dst_md, DNNL_ARG_DIFF_DST, false, ys, act) &&
             prepare(plan->ops[1], rt, plan->pd, dnnl_query_weights_md, DNNL_ARG_WEIGHTS, false, ws, dnnl_abcd) &&
             prepare(plan->ops[2], rt, plan->pd, dnnl_query_diff_src_md, DNNL_ARG_DIFF_SRC, true, xs, act);
    } else {
      good = ok(dnnl_convolution_backward_weights_primitive_desc_create(&plan->pd, rt.engine, dnnl_convolution_direct, src, wei,
                                                                        nullptr, dst, strides, dilates, pads, pads_r, plan->hint,
                                                                        attr),
                "convolution backward-weights pd") &&
             prepare(plan->ops[0], rt, plan->pd, dnnl_query_src_md, DNNL_ARG_SRC, false, xs, act) &&
             prepare(plan->ops[1], rt, plan->pd, dnnl_query_diff_dst_md, DNNL_ARG_DIFF_DST, false, ys, act) &&
             prepare(plan->ops[2], rt, plan->pd, dnnl_query_diff_weights_md, DNNL_ARG_DIFF_WEIGHTS, true, ws, dnnl_abcd);
    }
  }
  good = good && ok(dnnl_primitive_create(&plan->prim, plan->pd), "convolution primitive");
  if (good) {
    const_dnnl_memory_desc_t pad_md = dnnl_primitive_desc_query_md(plan->pd, dnnl_query_scratchpad_md, 0);
    plan->scratchpad_bytes = pad_md ? dnnl_memory_desc_get_size(pad_md) : 0;
    if (plan->scratchpad_bytes)
      good = ok(dnnl_memory_create(&plan->scratchpad, pad_md, rt.engine, DNNL_MEMORY_NONE), "dnnl_memory_create");
  }
  if (post_ops) dnnl_post_ops_destroy(post_ops);
  if (attr) dnnl_primitive_attr_destroy(attr);
  dnnl_memory_desc_destroy(src);
  dnnl_memory_desc_destroy(wei);
  dnnl_memory_desc_destroy(dst);
  if (!good) return nullptr;  // the half-built plan leaks a few handles once; the caller reports the error
  const char *impl = nullptr;
  if (dnnl_primitive_desc_query(plan->pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl) plan->impl = impl;
  Plan *p = plan.get();
  g_plans.emplace(key, std::move(plan));
  return p;
}

bool exec(dnnl_primitive_t prim, Runtime &rt, int nargs, const dnnl_exec_arg_t *args) {
  return ok(dnnl_primitive_execute(prim, rt.stream, nargs, args), "dnnl_primitive_execute");
}

// Run the plan on the caller's buffers (the inputs, then the output): reorder the inputs in,
// convolve, reorder the output out.
// ready_weights: the weights already in the primitive's format (the inference cache below), or null.
bool run(Plan *plan, void *const *data, void *ready_weights = nullptr) {
  Runtime &rt = runtime();
  const int n = plan->inputs + 1;
  dnnl_exec_arg_t args[kMaxOperands + 1];
  for (int i = 0; i < n; ++i) {
    Operand &o = plan->ops[i];
    if (i == 1 && ready_weights) {
      dnnl_memory_t m = o.prim ? o.prim : o.user;
      if (!ok(dnnl_memory_set_data_handle(m, ready_weights), "dnnl_memory_set_data_handle")) return false;
      args[i] = {o.arg, m};
      continue;
    }
    if (!ok(dnnl_memory_set_data_handle(o.user, data[i]), "dnnl_memory_set_data_handle")) return false;
    dnnl_memory_t used = o.user;
    if (o.prim) {
      void *buf = g_scratch[i].get(o.bytes);
      if (!buf) {
        g_error = "out of memory for a blocked copy";
        return false;
      }
      if (!ok(dnnl_memory_set_data_handle(o.prim, buf), "dnnl_memory_set_data_handle")) return false;
      used = o.prim;
      if (!o.output) {
        dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, o.user}, {DNNL_ARG_TO, o.prim}};
        if (!exec(o.reorder, rt, 2, r)) return false;
      }
    }
    args[i] = {o.arg, used};
  }
  int nargs = n;
  if (plan->scratchpad) {
    void *buf = g_scratch[kMaxOperands].get(plan->scratchpad_bytes);
    if (!buf) {
      g_error = "out of memory for the convolution's scratchpad";
      return false;
    }
    if (!ok(dnnl_memory_set_data_handle(plan->scratchpad, buf), "dnnl_memory_set_data_handle")) return false;
    args[nargs++] = {DNNL_ARG_SCRATCHPAD, plan->scratchpad};
  }
  if (!exec(plan->prim, rt, nargs, args)) return false;
  Operand &o = plan->ops[n - 1];
  if (o.prim) {
    dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, o.prim}, {DNNL_ARG_TO, o.user}};
    if (!exec(o.reorder, rt, 2, r)) return false;
  }
  return ok(dnnl_stream_wait(rt.stream), "dnnl_stream_wait");
}

bool check(int nparam, int want, int *ndims, const char **dtypes) {
  if (nparam != want) {
    g_error = "expected " + std::to_string(want) + " tensors, got " + std::to_string(nparam);
    return false;
  }
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0 || ndims[i] != 4) {
      g_error = "tensor " + std::to_string(i) + " is not a float32 tensor of the expected rank";
      return false;
    }
  }
  return true;
}

// xs: the activation's shape as MindSpore has it, (n, c, h, w) or, channels-last, (n, h, w, c).
int call(Kind kind, const int64_t *xs, const int64_t *ws, const int64_t *cfg, void *const *data) {
  const bool nhwc = cfg[3] == 2;
  const int64_t logical[4] = {xs[0], nhwc ? xs[3] : xs[1], nhwc ? xs[1] : xs[2], nhwc ? xs[2] : xs[3]};
  std::lock_guard<std::mutex> lock(g_mutex);
  Plan *plan = plan_for(kind, logical, ws, cfg[0], cfg[1] - 1, cfg[2], nhwc);
  return plan && run(plan, data) ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------
// Inference: the weight standardisation and the reorder into oneDNN's format once, not per call.
//
// An eval-mode forward standardises every weight and reorders it into the primitive's blocked
// format on every call (about a tenth of an R50x1 inference call). These operators take the raw
// weight and keep, per weight buffer and plan, the prepared weights together with a 64-bit digest
// of the raw weight's bytes; a call whose raw weight digests the same reuses them (one read of the
// weights instead of standardise + reorder), any change (an optimizer step, a loaded checkpoint,
// EMA weights swapped in) gives another digest and a fresh preparation. The prepared copies are
// bounded by BIT_ZOO_WEIGHT_CACHE_MB (default 1024; 0 turns the cache off): past it, a call
// prepares its weights in a scratch buffer, as without the cache.

struct Prepared {
  uint64_t digest = 0;
  void *buf = nullptr;
};
std::map<std::pair<const void *, const Plan *>, Prepared> g_prepared;
size_t g_prepared_bytes = 0;

size_t prepared_limit() {
  static const size_t limit = [] {
    const char *v = std::getenv("BIT_ZOO_WEIGHT_CACHE_MB");
    return static_cast<size_t>(v ? std::strtoull(v, nullptr, 10) : 1024) << 20;
  }();
  return limit;
}

// A digest of n floats: fixed chunks hashed independently (multiply-xorshift over 64-bit words),
// combined in chunk order, so it does not depend on the thread count.
uint64_t digest(const float *w, int64_t n) {
  const int64_t words = n / 2, chunk = 1 << 16, chunks = (words + chunk - 1) / chunk;
  std::vector<uint64_t> part(chunks > 0 ? chunks : 1, 0);
  const uint64_t *v = reinterpret_cast<const uint64_t *>(w);
#pragma omp parallel for schedule(static)
  for (int64_t u = 0; u < chunks; ++u) {
    uint64_t lanes[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const int64_t start = u * chunk, end = std::min(words, start + chunk);
    int64_t i = start;
    for (; i + 8 <= end; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] = (lanes[l] ^ v[i + l]) * 0x9E3779B97F4A7C15ull;
    uint64_t h = 0;
    for (; i < end; ++i) h = (h ^ v[i]) * 0xC2B2AE3D27D4EB4Full;
    for (int l = 0; l < 8; ++l) h = (h ^ (lanes[l] >> 29) ^ lanes[l]) * 0xFF51AFD7ED558CCDull;
    part[u] = h;
  }
  uint64_t h = static_cast<uint64_t>(n);
  for (uint64_t p : part) h = (h ^ p ^ (h >> 31)) * 0x94D049BB133111EBull;
  if (n % 2) {
    uint32_t last;
    std::memcpy(&last, w + n - 1, sizeof last);
    h = (h ^ last) * 0x9E3779B97F4A7C15ull;
  }
  return h;
}

// Per output channel (w - mean) / sqrt(var + eps): bit_cpu.cc's StdWeight, same arithmetic.
void standardize(const float *w, float *out, int64_t rows, int64_t k, double eps) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < rows; ++u) {
    const float *ws = w + u * k;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < k; ++i) sum += static_cast<double>(ws[i]);
    const double mean = sum / static_cast<double>(k);
    const float mf = static_cast<float>(mean);
    const double dm = mean - static_cast<double>(mf);
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < k; ++i) {
      const float d = ws[i] - mf;
      sq += static_cast<double>(d * d);
    }
    const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(k) - dm * dm + eps);
    const float r = static_cast<float>(rstd), q = static_cast<float>(-(mean - mf) * rstd);
    float *os = out + u * k;
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) os[i] = (ws[i] - mf) * r + q;
  }
}

// The weights of `plan` prepared from the raw weight w (standardised, in the primitive's format).
void *prepared_weights(Plan *plan, const float *w, const int64_t *ws, double eps) {
  Runtime &rt = runtime();
  const int64_t rows = ws[0], k = ws[1] * ws[2] * ws[3];
  Operand &o = plan->ops[1];
  const size_t bytes = o.prim ? o.bytes : static_cast<size_t>(rows * k) * sizeof(float);
  uint64_t eps_bits;
  std::memcpy(&eps_bits, &eps, sizeof eps_bits);
  const uint64_t d = digest(w, rows * k) ^ (eps_bits * 0x9E3779B97F4A7C15ull);
  auto key = std::make_pair(static_cast<const void *>(w), static_cast<const Plan *>(plan));
  auto found = g_prepared.find(key);
  if (found != g_prepared.end() && found->second.digest == d) return found->second.buf;
  void *buf = nullptr;
  if (found != g_prepared.end()) {
    buf = found->second.buf;
  } else if (g_prepared_bytes + bytes <= prepared_limit()) {
    buf = ::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (buf) {
      g_prepared_bytes += bytes;
      found = g_prepared.emplace(key, Prepared{0, buf}).first;
    }
  }
  if (!buf) buf = g_scratch[1].get(bytes);  // over the limit: prepared for this call only
  if (!buf) {
    g_error = "out of memory for prepared weights";
    return nullptr;
  }
  float *std_w = static_cast<float *>(o.prim ? g_scratch[kMaxOperands - 1].get(static_cast<size_t>(rows * k) * sizeof(float)) : buf);
  if (!std_w) {
    g_error = "out of memory for standardised weights";
    return nullptr;
  }
  standardize(w, std_w, rows, k, eps);
  if (o.prim) {
    if (!ok(dnnl_memory_set_data_handle(o.user, std_w), "dnnl_memory_set_data_handle") ||
        !ok(dnnl_memory_set_data_handle(o.prim, buf), "dnnl_memory_set_data_handle"))
      return nullptr;
    dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, o.user}, {DNNL_ARG_TO, o.prim}};
    if (!exec(o.reorder, rt, 2, r) || !ok(dnnl_stream_wait(rt.stream), "dnnl_stream_wait")) return nullptr;
  }
  if (found != g_prepared.end()) found->second.digest = d;
  return buf;
}

int call_prepared(Kind kind, const int64_t *xs, const int64_t *ws, const int64_t *cfg, double eps, void *const *data) {
  const bool nhwc = cfg[3] == 2;
  const int64_t logical[4] = {xs[0], nhwc ? xs[3] : xs[1], nhwc ? xs[1] : xs[2], nhwc ? xs[2] : xs[3]};
  std::lock_guard<std::mutex> lock(g_mutex);
  Plan *plan = plan_for(kind, logical, ws, cfg[0], cfg[1] - 1, cfg[2], nhwc);
  if (!plan) return 1;
  void *ready = prepared_weights(plan, static_cast<const float *>(data[1]), ws, eps);
  return ready && run(plan, data, ready) ? 0 : 1;
}

bool check_prepared(int nparam, int want, int *ndims, const char **dtypes) {
  if (nparam != want) {
    g_error = "expected " + std::to_string(want) + " tensors, got " + std::to_string(nparam);
    return false;
  }
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0 || ndims[i] != (i == nparam - 2 ? 1 : 4)) {
      g_error = "tensor " + std::to_string(i) + " is not a float32 tensor of the expected rank";
      return false;
    }
  }
  return true;
}

}  // namespace

// Inference with the raw weight: DnnlConvStd(x, w, cfg, eps) -> conv(x, standardised w);
// DnnlConvStdAdd(x, w, shortcut, cfg, eps) -> the same + shortcut (channels-last). eps: (1,) float32.
extern "C" int DnnlConvStd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!check_prepared(nparam, 5, ndims, dtypes)) return 1;
  void *data[3] = {params[0], params[1], params[4]};
  return call_prepared(kForward, shapes[0], shapes[1], shapes[2], *static_cast<const float *>(params[3]), data);
}

extern "C" int DnnlConvStdAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!check_prepared(nparam, 6, ndims, dtypes)) return 1;
  void *data[4] = {params[0], params[1], params[2], params[5]};
  return call_prepared(kForwardAdd, shapes[0], shapes[1], shapes[3], *static_cast<const float *>(params[4]), data);
}

extern "C" int DnnlConv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!check(nparam, 4, ndims, dtypes)) return 1;
  void *data[3] = {params[0], params[1], params[3]};
  return call(kForward, shapes[0], shapes[1], shapes[2], data);
}

extern "C" int DnnlConvAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!check(nparam, 5, ndims, dtypes)) return 1;
  void *data[4] = {params[0], params[1], params[2], params[4]};
  return call(kForwardAdd, shapes[0], shapes[1], shapes[3], data);
}

extern "C" int DnnlConvBwdData(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!check(nparam, 5, ndims, dtypes)) return 1;
  void *data[3] = {params[2], params[1], params[4]};
  return call(kBackwardData, shapes[0], shapes[1], shapes[3], data);
}

extern "C" int DnnlConvBwdWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!check(nparam, 5, ndims, dtypes)) return 1;
  void *data[3] = {params[1], params[2], params[4]};
  return call(kBackwardWeights, shapes[1], shapes[0], shapes[3], data);
}

extern "C" const char *BitDnnlLastError() { return g_error.c_str(); }

// The oneDNN implementation chosen for a geometry (e.g. "brg_conv_fwd:avx512_core"), "" when none:
// lets the loader refuse a CPU where oneDNN would fall back to its reference code.
extern "C" const char *BitDnnlImpl(int kind, const int64_t *xs, const int64_t *ws, int64_t stride, int64_t pad, int64_t dil, int nhwc) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Plan *plan = plan_for(static_cast<Kind>(kind), xs, ws, stride, pad, dil, nhwc != 0);
  return plan ? plan->impl.c_str() : "";
}
