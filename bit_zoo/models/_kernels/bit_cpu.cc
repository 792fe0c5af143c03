// bit_zoo's CPU kernels, loaded by bit_zoo/cpu_kernels.py as MindSpore AOT custom operators.
//
// Why: on the CPU "unfold" path GroupNorm and the weight standardisation run on MindSpore's
// BatchNorm kernel, which uses one thread and computes its statistics in float32. These two
// kernels do the same arithmetic on all threads (OpenMP over samples x groups, or output
// channels), with the mean and variance accumulated in double (two passes: mean, then the
// squared deviations), and GroupNorm's affine and ReLU in the same pass over the data; their
// backward kernels; and SumSquares, the training step's gradient norm in one operator.
// Each unit of work sums in a fixed order, so the result does not depend on the thread count.
//
// Interface (MindSpore's AOT convention): params[] holds the inputs then the output; shapes[i]
// and ndims[i] describe params[i]; all tensors are contiguous float32. Return 0 on success.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <string>
#include <vector>

// A sum of float terms accumulated in double SIMD lanes (omp simd vectorises the reduction
// without -ffast-math): double precision at close to float speed for these memory-bound loops.
template <class F>
static inline double lane_sum(int64_t n, F f) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(f(i));
  return acc;
}

// mean and 1 / sqrt(biased var + eps) of v[0..n), two passes.
static inline void moments(const float *v, int64_t n, double eps, double *mean, double *rstd) {
  const double m = lane_sum(n, [v](int64_t i) { return v[i]; }) / static_cast<double>(n);
  const float mf = static_cast<float>(m);
  const double dm = m - static_cast<double>(mf);  // E[(v - mf)^2] = var + (m - mf)^2
  const double sq = lane_sum(n, [v, mf](int64_t i) {
    const float d = v[i] - mf;
    return d * d;
  });
  *mean = m;
  *rstd = 1.0 / std::sqrt(sq / static_cast<double>(n) - dm * dm + eps);
}

// dy where the forward's ReLU let the value through (y > 0), else exactly +0 (also for an inf or
// NaN dy, as a branch would give). A bit mask, not `y > 0 ? dy : 0`: GCC compiles that select
// in these loops to something ~15x slower (1.7 ms against 0.1 ms for a 32x32x256 sample).
// pass_all is ~0u without ReLU.
static inline float relu_grad(float dy, float y, uint32_t pass_all) {
  uint32_t bits;
  std::memcpy(&bits, &dy, sizeof bits);
  bits &= (0u - static_cast<uint32_t>(y > 0.0f)) | pass_all;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// The layout GroupNorm works on: x is (n, c, hw...) and each (sample, group) unit holds k =
// (c / groups) * hw contiguous values. cfg = {groups, eps, relu}. ok is false for a bad cfg.
struct GroupLayout {
  int64_t n, c, hw, groups, per_group, k;
  double eps;
  bool relu, ok;
};

static GroupLayout group_layout(int ndim, const int64_t *shape, const float *cfg) {
  GroupLayout g{};
  g.n = shape[0];
  g.c = shape[1];
  g.hw = 1;
  for (int i = 2; i < ndim; ++i) g.hw *= shape[i];
  g.groups = static_cast<int64_t>(cfg[0]);
  g.eps = cfg[1];
  g.relu = cfg[2] != 0.0f;
  g.ok = g.groups > 0 && g.c % g.groups == 0;
  g.per_group = g.ok ? g.c / g.groups : 0;
  g.k = g.per_group * g.hw;
  return g;
}

// Rows of a weight (out, ...): out rows of k values each.
static inline int64_t row_length(int ndim, const int64_t *shape) {
  int64_t k = 1;
  for (int i = 1; i < ndim; ++i) k *= shape[i];
  return k;
}

// y = [relu]((x - mean) / sqrt(var + eps) * gamma[c] + beta[c]), statistics per (sample, group).
// inputs: x (N, C, ...), gamma (C), beta (C), cfg (3) = {groups, eps, relu (0 or 1)};
// outputs: y like x, stats (2, N, C): each channel's group mean and 1 / sqrt(var + eps), for the backward.
extern "C" int GroupNormAct(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                            void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 6 || ndims[0] < 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float *cfg = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  float *stats = static_cast<float *>(params[5]);
  const GroupLayout L = group_layout(ndims[0], shapes[0], cfg);
  if (!L.ok) return 2;
  const int64_t n = L.n, c = L.c, hw = L.hw, groups = L.groups, per_group = L.per_group, k = L.k;
  const double eps = L.eps;
  const bool relu = L.relu;
  if (shapes[1][0] != shapes[0][1]) return 3;  // gamma: one value per channel (a layout mix-up lands here)
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < n * groups; ++u) {
    const float *xs = x + u * k;
    float *ys = y + u * k;
    double mean, rstd;
    moments(xs, k, eps, &mean, &rstd);
    const float mf = static_cast<float>(mean);
    const int64_t first = (u % groups) * per_group, sample = u / groups;
    for (int64_t j = 0; j < per_group; ++j) {
      stats[sample * c + first + j] = mf;
      stats[n * c + sample * c + first + j] = static_cast<float>(rstd);
      // The affine folded in: y = (x - mf) * a + b, centred on the float mean first (x * a + b
      // alone would cancel digits when |mean| >> std); b carries mean - mf and beta.
      const double g = gamma[first + j];
      const float a = static_cast<float>(g * rstd);
      const float b = static_cast<float>(beta[first + j] - (mean - mf) * g * rstd);
      const float *xc = xs + j * hw;
      float *yc = ys + j * hw;
      if (relu) {
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) yc[i] = std::max((xc[i] - mf) * a + b, 0.0f);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) yc[i] = (xc[i] - mf) * a + b;
      }
    }
  }
  return 0;
}

// Backward of GroupNormAct. inputs: x, gamma, y (the forward's output: its zeros mark ReLU's cut),
// dy, stats (the forward's), cfg; outputs: dx (like x), dgamma (C), dbeta (C).
// With xhat = (x - mean) * rstd and g = dy * gamma (dy masked by y > 0 under ReLU), per group:
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); dgamma = sum over samples and positions of
// dy * xhat, dbeta = sum of dy (per sample first, then over samples, in a fixed order).
extern "C" int GroupNormActGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                                void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 9 || ndims[0] < 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *y = static_cast<const float *>(params[2]);
  const float *dy = static_cast<const float *>(params[3]);
  const float *stats = static_cast<const float *>(params[4]);
  const float *cfg = static_cast<const float *>(params[5]);
  float *dx = static_cast<float *>(params[6]);
  float *dgamma = static_cast<float *>(params[7]);
  float *dbeta = static_cast<float *>(params[8]);
  const GroupLayout L = group_layout(ndims[0], shapes[0], cfg);
  if (!L.ok) return 2;
  const int64_t n = L.n, c = L.c, hw = L.hw, groups = L.groups, per_group = L.per_group, k = L.k;
  const bool relu = L.relu;
  const uint32_t pass_all = relu ? 0u : ~0u;
  std::vector<double> part_gamma(n * c), part_beta(n * c);
  if (shapes[1][0] != shapes[0][1]) return 3;  // gamma: one value per channel (a layout mix-up lands here)
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < n * groups; ++u) {
    const int64_t off = u * k, first = (u % groups) * per_group, sample = u / groups;
    const float *xs = x + off, *ys = y + off, *dys = dy + off;
    const float mf = stats[sample * c + first], r = stats[n * c + sample * c + first];
    const double rstd = r;
    // Per channel: db = sum(d), dg = sum(d * xhat) with xhat = (x - mf) * r; then sum(g) =
    // sum_j gamma_j db_j and sum(g * xhat) = sum_j gamma_j dg_j, so one pass gives all four.
    double s1 = 0.0, s2 = 0.0;
    for (int64_t j = 0; j < per_group; ++j) {
      const float *xc = xs + j * hw, *yc = ys + j * hw, *dyc = dys + j * hw;
      double db = 0.0, dg = 0.0;  // one pass for both sums
#pragma omp simd reduction(+ : db, dg)
      for (int64_t i = 0; i < hw; ++i) {
        const float d = relu_grad(dyc[i], yc[i], pass_all);
        db += static_cast<double>(d);
        dg += static_cast<double>(d * ((xc[i] - mf) * r));
      }
      part_gamma[sample * c + first + j] = dg;
      part_beta[sample * c + first + j] = db;
      s1 += gamma[first + j] * db;
      s2 += gamma[first + j] * dg;
    }
    // dx = rstd * (d * gamma - mean(g) - xhat * mean(g * xhat)) = d * A + (x - mf) * B + C per channel.
    const double m1 = s1 / static_cast<double>(k), m2 = s2 / static_cast<double>(k);
    const float bf = static_cast<float>(-rstd * rstd * m2), cf = static_cast<float>(-rstd * m1);
    float *dxs = dx + off;
    for (int64_t j = 0; j < per_group; ++j) {
      const float af = static_cast<float>(rstd * gamma[first + j]);
      const float *xc = xs + j * hw, *yc = ys + j * hw, *dyc = dys + j * hw;
      float *dxc = dxs + j * hw;
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) dxc[i] = (relu_grad(dyc[i], yc[i], pass_all)) * af + (xc[i] - mf) * bf + cf;
    }
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    double dg = 0.0, db = 0.0;
    for (int64_t s = 0; s < n; ++s) {
      dg += part_gamma[s * c + ch];
      db += part_beta[s * c + ch];
    }
    dgamma[ch] = static_cast<float>(dg);
    dbeta[ch] = static_cast<float>(db);
  }
  return 0;
}

// The same two operators for channels-last tensors (N, H, W, C), the layout of the oneDNN
// convolution path (bit_dnnl.cc): a group's values are then strided (C / groups contiguous
// channels in each of the H * W rows), so the sums run per channel across the rows, vectorised
// over the channels, and are folded into group sums afterwards. One sample per work unit, summed
// in a fixed order: the result does not depend on the thread count. Same cfg, outputs and stats.
extern "C" int GroupNormActNHWC(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                                void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 6 || ndims[0] < 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float *cfg = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  float *stats = static_cast<float *>(params[5]);
  const int64_t n = shapes[0][0], c = shapes[0][ndims[0] - 1];
  int64_t hw = 1;
  for (int i = 1; i < ndims[0] - 1; ++i) hw *= shapes[0][i];
  const int64_t groups = static_cast<int64_t>(cfg[0]);
  if (groups <= 0 || c % groups != 0) return 2;
  const int64_t per_group = c / groups;
  const double eps = cfg[1], count = static_cast<double>(hw * per_group);
  const bool relu = cfg[2] != 0.0f;
  if (shapes[1][0] != shapes[0][ndims[0] - 1]) return 3;  // gamma: one value per channel (a layout mix-up lands here)
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t sample = 0; sample < n; ++sample) {
    const float *xs = x + sample * hw * c;
    float *ys = y + sample * hw * c;
    // One pass for each channel's sum and sum of squares, in double: the variance E[x^2] - mean^2
    // then loses ~(mean / std)^2 * 1e-16 relative, far below float's resolution for activations,
    // and the data is read twice (statistics, output) instead of three times.
    std::vector<double> acc(c, 0.0), acc2(c, 0.0), gmean(groups), grstd(groups);
    std::vector<float> mfc(c), a(c), b(c);
    for (int64_t i = 0; i < hw; ++i) {
      const float *row = xs + i * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const double v = row[ch];
        acc[ch] += v;
        acc2[ch] += v * v;
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      double t = 0.0, t2 = 0.0;
      for (int64_t j = 0; j < per_group; ++j) {
        t += acc[g * per_group + j];
        t2 += acc2[g * per_group + j];
      }
      gmean[g] = t / count;
      const float mf = static_cast<float>(gmean[g]);
      const double dm = gmean[g] - static_cast<double>(mf);  // as in moments()
      grstd[g] = 1.0 / std::sqrt(std::max(t2 / count - gmean[g] * gmean[g], 0.0) + eps);
      for (int64_t j = 0; j < per_group; ++j) {
        const int64_t ch = g * per_group + j;
        const double gm = gamma[ch];
        mfc[ch] = mf;
        stats[sample * c + ch] = mf;
        stats[n * c + sample * c + ch] = static_cast<float>(grstd[g]);
        a[ch] = static_cast<float>(gm * grstd[g]);
        b[ch] = static_cast<float>(beta[ch] - dm * gm * grstd[g]);
      }
    }
    for (int64_t i = 0; i < hw; ++i) {
      const float *row = xs + i * c;
      float *out = ys + i * c;
      if (relu) {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) out[ch] = std::max((row[ch] - mfc[ch]) * a[ch] + b[ch], 0.0f);
      } else {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) out[ch] = (row[ch] - mfc[ch]) * a[ch] + b[ch];
      }
    }
  }
  return 0;
}

extern "C" int GroupNormActNHWCGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                                    void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 9 || ndims[0] < 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *y = static_cast<const float *>(params[2]);
  const float *dy = static_cast<const float *>(params[3]);
  const float *stats = static_cast<const float *>(params[4]);
  const float *cfg = static_cast<const float *>(params[5]);
  float *dx = static_cast<float *>(params[6]);
  float *dgamma = static_cast<float *>(params[7]);
  float *dbeta = static_cast<float *>(params[8]);
  const int64_t n = shapes[0][0], c = shapes[0][ndims[0] - 1];
  int64_t hw = 1;
  for (int i = 1; i < ndims[0] - 1; ++i) hw *= shapes[0][i];
  const int64_t groups = static_cast<int64_t>(cfg[0]);
  if (groups <= 0 || c % groups != 0) return 2;
  const int64_t per_group = c / groups;
  const double count = static_cast<double>(hw * per_group);
  const uint32_t pass_all = cfg[2] != 0.0f ? 0u : ~0u;  // ReLU or not
  std::vector<double> part_gamma(n * c), part_beta(n * c);
  if (shapes[1][0] != shapes[0][ndims[0] - 1]) return 3;  // gamma: one value per channel (a layout mix-up lands here)
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t sample = 0; sample < n; ++sample) {
    const int64_t off = sample * hw * c;
    const float *mf = stats + sample * c, *r = stats + n * c + sample * c;
    std::vector<double> db(c, 0.0), dg(c, 0.0);
    std::vector<float> af(c), bf(c), cf(c);
    for (int64_t i = 0; i < hw; ++i) {
      const float *xr = x + off + i * c, *yr = y + off + i * c, *dyr = dy + off + i * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const float d = relu_grad(dyr[ch], yr[ch], pass_all);
        db[ch] += static_cast<double>(d);
        dg[ch] += static_cast<double>(d * ((xr[ch] - mf[ch]) * r[ch]));
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t j = 0; j < per_group; ++j) {
        const int64_t ch = g * per_group + j;
        part_gamma[sample * c + ch] = dg[ch];
        part_beta[sample * c + ch] = db[ch];
        s1 += gamma[ch] * db[ch];
        s2 += gamma[ch] * dg[ch];
      }
      const double rstd = r[g * per_group], m1 = s1 / count, m2 = s2 / count;
      for (int64_t j = 0; j < per_group; ++j) {
        const int64_t ch = g * per_group + j;
        af[ch] = static_cast<float>(rstd * gamma[ch]);
        bf[ch] = static_cast<float>(-rstd * rstd * m2);
        cf[ch] = static_cast<float>(-rstd * m1);
      }
    }
    for (int64_t i = 0; i < hw; ++i) {
      const float *xr = x + off + i * c, *yr = y + off + i * c, *dyr = dy + off + i * c;
      float *dxr = dx + off + i * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch)
        dxr[ch] = (relu_grad(dyr[ch], yr[ch], pass_all)) * af[ch] + (xr[ch] - mf[ch]) * bf[ch] + cf[ch];
    }
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    double g = 0.0, b = 0.0;
    for (int64_t sidx = 0; sidx < n; ++sidx) {
      g += part_gamma[sidx * c + ch];
      b += part_beta[sidx * c + ch];
    }
    dgamma[ch] = static_cast<float>(g);
    dbeta[ch] = static_cast<float>(b);
  }
  return 0;
}

// BiT's stem pool on a channels-last map: zero padding of 1, then a 3x3 max pool of stride 2
// (upstream pads with zeros before the pool, so a border window's maximum includes 0; the stem's
// output has no ReLU and can be negative). One operator instead of two concatenations, a pool
// and two transposes. x: (N, H, W, C) -> (N, (H - 1) / 2 + 1, (W - 1) / 2 + 1, C).
// The backward sends each output's gradient to the first maximum of its window in row-major
// order (a padded zero takes it: it goes nowhere), as MaxPool's backward does.
static inline int64_t stem_pool_size(int64_t n) { return (n - 1) / 2 + 1; }

extern "C" int StemPoolNHWC(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                            void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 2 || ndims[0] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = shapes[0][0], h = shapes[0][1], w = shapes[0][2], c = shapes[0][3];
  const int64_t ho = stem_pool_size(h), wo = stem_pool_size(w);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t i = 0; i < ho; ++i) {
      for (int64_t j = 0; j < wo; ++j) {
        float *out = y + ((s * ho + i) * wo + j) * c;
        bool first = true;
        for (int64_t a = 2 * i - 1; a <= 2 * i + 1; ++a) {
          for (int64_t b = 2 * j - 1; b <= 2 * j + 1; ++b) {
            if (a < 0 || a >= h || b < 0 || b >= w) {  // a padded zero
#pragma omp simd
              for (int64_t ch = 0; ch < c; ++ch) out[ch] = first ? 0.0f : std::max(out[ch], 0.0f);
            } else {
              const float *in = x + ((s * h + a) * w + b) * c;
#pragma omp simd
              for (int64_t ch = 0; ch < c; ++ch) out[ch] = first ? in[ch] : std::max(out[ch], in[ch]);
            }
            first = false;
          }
        }
      }
    }
  }
  return 0;
}

// inputs: x, dy; output: dx (like x).
extern "C" int StemPoolNHWCGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                                void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 3 || ndims[0] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = shapes[0][0], h = shapes[0][1], w = shapes[0][2], c = shapes[0][3];
  const int64_t ho = stem_pool_size(h), wo = stem_pool_size(w);
  // One sample per unit: windows overlap, so a sample's dx is written by one thread only.
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < n; ++s) {
    float *dxs = dx + s * h * w * c;
    std::fill(dxs, dxs + h * w * c, 0.0f);
    std::vector<float> best(c);
    std::vector<int64_t> where(c);  // offset of the maximum within the sample, -1 for a padded zero
    for (int64_t i = 0; i < ho; ++i) {
      for (int64_t j = 0; j < wo; ++j) {
        bool first = true;
        for (int64_t a = 2 * i - 1; a <= 2 * i + 1; ++a) {
          for (int64_t b = 2 * j - 1; b <= 2 * j + 1; ++b) {
            const bool pad = a < 0 || a >= h || b < 0 || b >= w;
            const int64_t off = pad ? -1 : (a * w + b) * c;
            const float *in = pad ? nullptr : x + s * h * w * c + off;
            for (int64_t ch = 0; ch < c; ++ch) {
              const float v = pad ? 0.0f : in[ch];
              if (first || v > best[ch]) {
                best[ch] = v;
                where[ch] = pad ? -1 : off + ch;
              }
            }
            first = false;
          }
        }
        const float *g = dy + ((s * ho + i) * wo + j) * c;
        for (int64_t ch = 0; ch < c; ++ch)
          if (where[ch] >= 0) dxs[where[ch]] += g[ch];
      }
    }
  }
  return 0;
}

// Weight standardisation: per output channel o, w <- (w - mean) / sqrt(var + eps).
// inputs: w (O, ...), cfg (1) = {eps}; output: like w.
extern "C" int StdWeight(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 3 || ndims[0] < 1) return 1;
  const float *w = static_cast<const float *>(params[0]);
  const float *cfg = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t out = shapes[0][0], k = row_length(ndims[0], shapes[0]);
  const double eps = cfg[0];
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < out; ++u) {
    const float *ws = w + u * k;
    float *ys = y + u * k;
    double mean, rstd;
    moments(ws, k, eps, &mean, &rstd);
    // Centred on the float mean first (w * r - mean * r would cancel digits when |mean| >> std).
    const float mf = static_cast<float>(mean), r = static_cast<float>(rstd), q = static_cast<float>(-(mean - mf) * rstd);
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) ys[i] = (ws[i] - mf) * r + q;
  }
  return 0;
}

// Backward of StdWeight. inputs: w, dv (gradient of the standardised weight), cfg; output: dw.
// Per output channel, with what = (w - mean) * rstd: dw = rstd * (dv - mean(dv) - what * mean(dv * what)).
extern "C" int StdWeightGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                             void *extra) {
  (void)dtypes, (void)stream, (void)extra;
  if (nparam != 4 || ndims[0] < 1) return 1;
  const float *w = static_cast<const float *>(params[0]);
  const float *dv = static_cast<const float *>(params[1]);
  const float *cfg = static_cast<const float *>(params[2]);
  float *dw = static_cast<float *>(params[3]);
  const int64_t out = shapes[0][0], k = row_length(ndims[0], shapes[0]);
  const double eps = cfg[0];
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < out; ++u) {
    const float *ws = w + u * k, *dvs = dv + u * k;
    double mean, rstd;
    moments(ws, k, eps, &mean, &rstd);
    const float mf = static_cast<float>(mean), r = static_cast<float>(rstd);
    const double m1 = lane_sum(k, [=](int64_t i) { return dvs[i]; }) / static_cast<double>(k);
    const double m2 = lane_sum(k, [=](int64_t i) { return dvs[i] * ((ws[i] - mf) * r); }) / static_cast<double>(k);
    // dw = dv * rstd + (w - mf) * B + C with B = -rstd^2 m2, C = -rstd m1 (mean - mf is below float's resolution here).
    const float b = static_cast<float>(-rstd * rstd * m2), cc = static_cast<float>(-rstd * m1);
    float *dws = dw + u * k;
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) dws[i] = dvs[i] * r + (ws[i] - mf) * b + cc;
  }
  return 0;
}

// The sum of squares of every element of every input: the training step's global gradient norm
// (its square) in one operator instead of a norm kernel per parameter and their sum.
// inputs: any number of float32 tensors; output: (1,) float32. Each input is cut into fixed
// chunks summed in double lanes; the chunk sums are added in input order, so the result does
// not depend on the thread count. A float32 result above FLT_MAX becomes inf, as a float32 sum would.
extern "C" int SumSquares(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                          void *extra) {
  (void)stream, (void)extra;
  if (nparam < 2) return 1;
  const int inputs = nparam - 1;
  const int64_t chunk = 1 << 15;
  std::vector<int64_t> first_chunk(inputs + 1, 0), sizes(inputs);
  for (int t = 0; t < inputs; ++t) {
    if (dtypes[t] == nullptr || std::string(dtypes[t]) != "float32") return 2;
    sizes[t] = 1;
    for (int d = 0; d < ndims[t]; ++d) sizes[t] *= shapes[t][d];
    first_chunk[t + 1] = first_chunk[t] + (sizes[t] + chunk - 1) / chunk;
  }
  std::vector<double> part(first_chunk[inputs], 0.0);
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t u = 0; u < first_chunk[inputs]; ++u) {
    const int t = static_cast<int>(std::upper_bound(first_chunk.begin(), first_chunk.end(), u) - first_chunk.begin()) - 1;
    const int64_t start = (u - first_chunk[t]) * chunk, n = std::min(chunk, sizes[t] - start);
    const float *v = static_cast<const float *>(params[t]) + start;
    part[u] = lane_sum(n, [v](int64_t i) { return static_cast<double>(v[i]) * v[i]; });
  }
  double total = 0.0;
  for (double p : part) total += p;
  *static_cast<float *>(params[inputs]) = total > FLT_MAX ? INFINITY : static_cast<float>(total);  // NaN stays NaN
  return 0;
}
