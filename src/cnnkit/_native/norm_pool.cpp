// Local contrast normalization followed by max pooling, of contiguous or channels-last
// (N, C, H, W) maps, without writing the normalized maps out.
//
// Forward: the normalization's passes 1 and 2 (contrast_norm.cpp); pass 3 makes each
// map's y in a buffer of one map (which stays in the cache) and pools it there, with
// max_pool.h's rules (channels-last: every map of a pixel at once, y computed where the
// pooling needs it). It also keeps, per pixel, mean m, den, variance, sigma and (with
// sums) sum_i y_i for the backward.
//
// Backward: the gradient of y is the pooling's, one value per window at its maximum, so
// the sums over maps that the normalization's backward reads all of g and y for are
// sums over the windows: sum_i g_i y_i from each window's gradient times its pooled value
// (y at its maximum), sum_i g_i from the gradients alone, and sum_i g_v = r sum_i g_i + k sum_i y_i.
// One pass then writes g_x = sign(x) (k y - q) with y = (a - m) r and
// q = S^T(sum_i g_v) / C, and each window adds sign(x) g r at its maximum; g_x has the
// layout of x.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "contrast_norm.h"
#include "direct_conv.h"
#include "max_pool.h"

namespace {

using namespace cnnkit_norm;

struct PoolWindow {
  int64_t kh, kw, sh, sw, h_out, w_out;
};

// The five per-pixel maps the backward needs, each (H, W) of one image.
template <typename T>
struct PixelStatistics {
  T *mean, *den, *variance, *sigma, *y_sum;

  // The five planes one after another from s (no y_sum plane without sums).
  static PixelStatistics planes(T* s, int64_t pixels, bool with_sums = true) {
    return {s, s + pixels, s + 2 * pixels, s + 3 * pixels, with_sums ? s + 4 * pixels : nullptr};
  }
};

// Pass 3 for contiguous maps: each map's y in a buffer of one map, pooled there; and
// y_sum = sum_i y_i unless y_sum is null.
template <typename T, bool Rectify>
void pool_normalized_maps(const T* x, int64_t maps, const Window& window,
                          const PoolWindow& pool, const T* mean, const T* scale, T* pooled,
                          int64_t* index, T* y_sum) {
  const int64_t pixels = window.h * window.w, outputs = pool.h_out * pool.w_out;
  // Each piece of maps sums its own y; the pieces are added in map order afterwards.
  std::mutex pieces_lock;
  std::vector<std::pair<int64_t, std::vector<T>>> pieces;
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> y(pixels), partial(y_sum != nullptr ? pixels : 0, T(0));
    auto scratch = cnnkit_pooling::make_scratch<T>(window.w, pool.kh, pool.sh, pool.h_out);
    for (int64_t i = begin; i < end; ++i) {
      const T* values = x + i * pixels;
      T* __restrict out = y.data();
      T* __restrict total = partial.data();
      if (y_sum != nullptr) {
#pragma omp simd
        for (int64_t p = 0; p < pixels; ++p) {
          out[p] = (rectified<T, Rectify>(values[p]) - mean[p]) * scale[p];
          total[p] += out[p];
        }
      } else {
#pragma omp simd
        for (int64_t p = 0; p < pixels; ++p)
          out[p] = (rectified<T, Rectify>(values[p]) - mean[p]) * scale[p];
      }
      cnnkit_pooling::pool_map(y.data(), pooled + i * outputs, index + i * outputs, window.h,
                               window.w, pool.kh, pool.kw, pool.sh, pool.sw, pool.h_out,
                               pool.w_out, scratch);
    }
    if (y_sum == nullptr) return;
    std::lock_guard<std::mutex> guard(pieces_lock);
    pieces.emplace_back(begin, std::move(partial));
  });
  if (y_sum == nullptr) return;
  std::sort(pieces.begin(), pieces.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::fill_n(y_sum, pixels, T(0));
  for (const auto& piece : pieces) {
#pragma omp simd
    for (int64_t p = 0; p < pixels; ++p) y_sum[p] += piece.second[p];
  }
}

// Pass 3 for channels-last maps, every map of a pixel at once (loops along maps
// vectorize): per output row, the largest y of each column over the window's rows (by
// blocks of s_h rows when the window is a whole number of them), then over the window's
// columns. y is computed from x where it is needed and never kept; y_sum as above.
template <typename T, bool Rectify>
void pool_normalized_pixels(const T* x, int64_t maps, const Window& window,
                            const PoolWindow& pool, const T* mean, const T* scale, T* pooled,
                            int64_t* index, T* y_sum) {
  using Row = cnnkit_pooling::Row<T>;
  const int64_t w = window.w, pixels = window.h * w;
  const int64_t summed = y_sum == nullptr ? 0 : pixels;  // no sums: nothing to do
  at::parallel_for(0, summed, pixel_grain(maps), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* values = x + p * maps;
      const T centre = mean[p], factor = scale[p];
      T total = T(0);
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < maps; ++i)
        total += (rectified<T, Rectify>(values[i]) - centre) * factor;
      y_sum[p] = total;
    }
  });
  const bool tiled = pool.sh > 1 && pool.kh % pool.sh == 0;
  const int64_t span = tiled ? pool.sh : pool.kh;            // rows in one vertical piece
  const int64_t per_window = tiled ? pool.kh / pool.sh : 1;  // pieces in one window
  const int64_t line = w * maps;
  // A piece: per column and map, the largest y of rows top .. top + span - 1 and its row.
  const auto make_piece = [&](int64_t top, T* best, Row* row) {
    for (int64_t r = top; r < top + span; ++r) {
      const Row here = static_cast<Row>(r);
      for (int64_t c = 0; c < w; ++c) {
        const int64_t p = r * w + c;
        const T* __restrict values = x + p * maps;
        T* __restrict b = best + c * maps;
        Row* __restrict row_of = row + c * maps;
        const T centre = mean[p], factor = scale[p];
        if (r == top) {
#pragma omp simd
          for (int64_t i = 0; i < maps; ++i) {
            b[i] = (rectified<T, Rectify>(values[i]) - centre) * factor;
            row_of[i] = here;
          }
          continue;
        }
#pragma omp simd
        for (int64_t i = 0; i < maps; ++i) {
          const T y = (rectified<T, Rectify>(values[i]) - centre) * factor;
          const bool take = cnnkit_pooling::beats(y, b[i]);
          b[i] = take ? y : b[i];
          row_of[i] = take ? here : row_of[i];
        }
      }
    }
  };
  at::parallel_for(0, pool.h_out, 1, [&](int64_t first, int64_t last) {
    // pieces of rows, kept in a ring of per_window, then one output row's maxima, then
    // one window's maximum and its flat position (kept as wide as T until stored)
    std::vector<T> ring(per_window * line), best(line), value(maps);
    std::vector<Row> ring_rows(per_window * line), rows(line), where(maps);
    for (int64_t a = first; a < last; ++a) {
      for (int64_t j = a == first ? 0 : per_window - 1; j < per_window; ++j) {
        const int64_t slot = (a + j) % per_window;
        const int64_t top = tiled ? (a + j) * pool.sh : a * pool.sh;
        make_piece(top, ring.data() + slot * line, ring_rows.data() + slot * line);
      }
      std::copy_n(ring.data() + (a % per_window) * line, line, best.data());
      std::copy_n(ring_rows.data() + (a % per_window) * line, line, rows.data());
      for (int64_t j = 1; j < per_window; ++j) {  // later rows: the first-maximum rule
        const int64_t slot = (a + j) % per_window;
        const Row* later = ring_rows.data() + slot * line;
        cnnkit_pooling::keep_larger(best.data(), rows.data(), ring.data() + slot * line,
                                    [later](int64_t k) { return later[k]; }, line);
      }
      for (int64_t b = 0; b < pool.w_out; ++b) {
        const int64_t left = b * pool.sw;
        T* __restrict v = value.data();
        Row* __restrict flat_of = where.data();
        const Row first_column = static_cast<Row>(left);
#pragma omp simd
        for (int64_t i = 0; i < maps; ++i) {
          v[i] = best[left * maps + i];
          flat_of[i] = rows[left * maps + i] * static_cast<Row>(w) + first_column;
        }
        for (int64_t c = left + 1; c < left + pool.kw; ++c) {
          const T* __restrict candidates = best.data() + c * maps;
          const Row* __restrict candidate_rows = rows.data() + c * maps;
          const Row column = static_cast<Row>(c);
#pragma omp simd
          for (int64_t i = 0; i < maps; ++i) {
            const Row flat = candidate_rows[i] * static_cast<Row>(w) + column;
            const T candidate = candidates[i];
            const bool take = cnnkit_pooling::replaces(candidate, v[i], flat, flat_of[i]);
            v[i] = take ? candidate : v[i];
            flat_of[i] = take ? flat : flat_of[i];
          }
        }
        T* __restrict out = pooled + (a * pool.w_out + b) * maps;
        int64_t* __restrict positions = index + (a * pool.w_out + b) * maps;
#pragma omp simd
        for (int64_t i = 0; i < maps; ++i) {
          out[i] = v[i];
          positions[i] = static_cast<int64_t>(flat_of[i]);
        }
      }
    }
  });
}

template <typename T, bool Rectify, bool ChannelsLast>
void normalize_and_pool_image(const T* x, int64_t maps, const Window& window, const T* rows,
                              const T* columns, const T* mass, bool mean_threshold,
                              double threshold, double floor, const PoolWindow& pool,
                              T* pooled, int64_t* index, const PixelStatistics<T>& stats,
                              T* mean_sigma_out) {
  std::vector<T> scale(window.h * window.w);
  const Image<T> image{x, nullptr, maps, window.h * window.w};
  image_statistics<T, Rectify, ChannelsLast>(image, window, rows, columns, mass,
                                             mean_threshold, threshold, floor, stats.mean,
                                             scale.data(), stats.den, stats.variance,
                                             stats.sigma, mean_sigma_out);
  auto* pass = ChannelsLast ? &pool_normalized_pixels<T, Rectify>
                            : &pool_normalized_maps<T, Rectify>;
  pass(x, maps, window, pool, stats.mean, scale.data(), pooled, index, stats.y_sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrast_norm_max_pool_forward(
    const at::Tensor& x, const at::Tensor& row_diagonals, const at::Tensor& column_diagonals,
    const at::Tensor& mass, bool rectify, bool mean_threshold, double threshold, double floor,
    int64_t kh, int64_t kw, int64_t sh, int64_t sw, bool with_sums) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be (N, C, H, W) on the CPU");
  const bool channels_last = channels_last_layout(x);
  TORCH_CHECK(x.is_contiguous() || channels_last, "x must be contiguous or channels-last");
  const int64_t n_images = x.size(0), maps = x.size(1), h = x.size(2), w = x.size(3);
  check_window_matrices(x, row_diagonals, column_diagonals, mass);
  TORCH_CHECK(h * w <= std::numeric_limits<int32_t>::max(),
              "maps of more than 2^31 - 1 values are not supported");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && kh <= h && kw <= w,
              "the pooling window must fit in the map and the stride be positive");
  const PoolWindow pool{kh, kw, sh, sw, (h - kh) / sh + 1, (w - kw) / sw + 1};
  // The pooled maps and indices in the layout of x; the statistics contiguous.
  const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor pooled =
      at::empty({n_images, maps, pool.h_out, pool.w_out}, x.options().memory_format(layout));
  at::Tensor index = at::empty(pooled.sizes(), x.options().dtype(at::kLong).memory_format(layout));
  at::Tensor stats = at::empty({n_images, 5, h, w}, x.options());
  at::Tensor mean_sigma = at::empty({n_images}, x.options());
  const Window window{h, w, row_diagonals.size(0) / 2, column_diagonals.size(0) / 2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrast_norm_max_pool_forward", [&] {
    using T = scalar_t;
    auto* image_forward = rectify ? (channels_last ? &normalize_and_pool_image<T, true, true>
                                                   : &normalize_and_pool_image<T, true, false>)
                                  : (channels_last ? &normalize_and_pool_image<T, false, true>
                                                   : &normalize_and_pool_image<T, false, false>);
    const int64_t pixels = h * w, outputs = pool.h_out * pool.w_out;
    over_images(n_images, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        T* s = stats.data_ptr<T>() + n * 5 * pixels;
        // Without the sums (nothing to differentiate) their plane is NaN, never read.
        if (!with_sums) std::fill_n(s + 4 * pixels, pixels, std::numeric_limits<T>::quiet_NaN());
        const auto image_stats = PixelStatistics<T>::planes(s, pixels, with_sums);
        image_forward(x.data_ptr<T>() + n * maps * pixels, maps, window,
                      row_diagonals.data_ptr<T>(), column_diagonals.data_ptr<T>(),
                      mass.data_ptr<T>(), mean_threshold, threshold, floor, pool,
                      pooled.data_ptr<T>() + n * maps * outputs,
                      index.data_ptr<int64_t>() + n * maps * outputs, image_stats,
                      mean_sigma.data_ptr<T>() + n);
      }
    });
  });
  return {pooled, index, stats, mean_sigma};
}

// The direct correlation's register blocks take whole vectors of output maps.
template <typename T>
void check_whole_vectors(int64_t maps) {
  TORCH_CHECK(maps % cnnkit_vectors::kLanes<T> == 0, "the ", maps,
              " output maps must fill whole vectors of ", cnnkit_vectors::kLanes<T>);
}

// The first stage whole, when nothing is differentiated: each image's filter bank by the
// direct correlation (direct_conv.h) into a buffer of one image, channels-last, which
// stays in the cache while the normalization's passes and the pooling read it; only the
// pooled maps come out.
at::Tensor direct_conv_norm_max_pool(const at::Tensor& x, const at::Tensor& taps,
                                     const c10::optional<at::Tensor>& bias, int64_t kh,
                                     int64_t kw, const at::Tensor& row_diagonals,
                                     const at::Tensor& column_diagonals, const at::Tensor& mass,
                                     bool rectify, bool mean_threshold, double threshold,
                                     double floor, int64_t pool_kh, int64_t pool_kw, int64_t sh,
                                     int64_t sw) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "x must be contiguous (N, C, H, W) on the CPU, got sizes ", x.sizes());
  TORCH_CHECK(taps.dim() == 2, "taps must be (C kh kw, O), got sizes ", taps.sizes());
  const cnnkit_direct::Sizes s{x.size(1), x.size(2), x.size(3), kh, kw, taps.size(1)};
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= s.h && kw <= s.w, "kernels of ", kh, "x", kw,
              " must fit in x maps of ", s.h, "x", s.w);
  TORCH_CHECK(s.h_out() * s.w_out() <= std::numeric_limits<int32_t>::max(),
              "maps of more than 2^31 - 1 values are not supported");
  TORCH_CHECK(taps.size(0) == s.maps * kh * kw && taps.is_contiguous() &&
                  taps.scalar_type() == x.scalar_type(),
              "taps must be contiguous (C kh kw, O) with the dtype of x, got sizes ",
              taps.sizes());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == s.outputs && b.scalar_type() == x.scalar_type()),
              "bias must be (", s.outputs, ",) with the dtype of x");
  const int64_t n_images = x.size(0), maps = s.outputs, h = s.h_out(), w = s.w_out();
  check_window_matrices(at::empty({0, maps, h, w}, x.options()), row_diagonals,
                        column_diagonals, mass);
  TORCH_CHECK(pool_kh >= 1 && pool_kw >= 1 && sh >= 1 && sw >= 1 && pool_kh <= h && pool_kw <= w,
              "the pooling window must fit in the filter bank's maps and the stride be positive");
  const PoolWindow pool{pool_kh, pool_kw, sh, sw, (h - pool_kh) / sh + 1, (w - pool_kw) / sw + 1};
  at::Tensor pooled = at::empty({n_images, maps, pool.h_out, pool.w_out},
                                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const Window window{h, w, row_diagonals.size(0) / 2, column_diagonals.size(0) / 2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_conv_norm_max_pool", [&] {
    using T = scalar_t;
    check_whole_vectors<T>(maps);
    auto* image_forward = rectify ? &normalize_and_pool_image<T, true, true>
                                  : &normalize_and_pool_image<T, false, true>;
    const int64_t pixels = h * w, outputs = pool.h_out * pool.w_out;
    const T* tp = taps.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    over_images(n_images, [&](int64_t begin, int64_t end) {
      std::vector<T> y(maps * pixels), statistics(4 * pixels);
      std::vector<int64_t> index(maps * outputs);
      const auto image_stats = PixelStatistics<T>::planes(statistics.data(), pixels, false);
      T mean_sigma;
      for (int64_t n = begin; n < end; ++n) {
        const T* image = x.data_ptr<T>() + n * s.maps * s.h * s.w;
        at::parallel_for(0, h, 1, [&](int64_t first, int64_t last) {
          for (int64_t row = first; row < last; ++row) {
            cnnkit_direct::output_row(image, tp, bp, y.data(), s, row);
          }
        });
        image_forward(y.data(), maps, window, row_diagonals.data_ptr<T>(),
                      column_diagonals.data_ptr<T>(), mass.data_ptr<T>(), mean_threshold,
                      threshold, floor, pool, pooled.data_ptr<T>() + n * maps * outputs,
                      index.data(), image_stats, &mean_sigma);
      }
    });
  });
  return pooled;
}

// Element (i, p) of map i's pixel p, and (i, j) of its pooled value j, in one image's
// contiguous or channels-last maps.
template <bool ChannelsLast>
struct MapLayout {
  int64_t maps, pixels, outputs;
  int64_t at(int64_t i, int64_t p) const { return ChannelsLast ? p * maps + i : i * pixels + p; }
  int64_t pooled(int64_t i, int64_t j) const {
    return ChannelsLast ? j * maps + i : i * outputs + j;
  }
};

template <typename T, bool Rectify, bool ChannelsLast>
void normalize_and_pool_backward_image(const T* grad, const int64_t* index, const T* maxima,
                                       const T* x, T* out, int64_t maps, int64_t outputs,
                                       const Window& window, const T* rows_t,
                                       const T* columns_t, const PixelStatistics<T>& stats,
                                       T mean_sigma, bool mean_threshold, double threshold,
                                       double floor) {
  const int64_t h = window.h, w = window.w, pixels = h * w;
  const MapLayout<ChannelsLast> layout{maps, pixels, outputs};
  const T count = static_cast<T>(maps);
  std::vector<T> g_sum(pixels, T(0)), products(pixels, T(0)), r(pixels), k(pixels),
      q(pixels), pad(w + 2 * window.r_w);
  // Each window's pooled value (`maxima`) is y at its maximum.
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) r[p] = T(1) / stats.den[p];
  for (int64_t i = 0; i < maps; ++i) {
    for (int64_t j = 0; j < outputs; ++j) {
      const int64_t e = layout.pooled(i, j), p = index[e];
      g_sum[p] += grad[e];
      products[p] += grad[e] * maxima[e];
    }
  }
  divisor_gradient(products.data(), maps, window, rows_t, columns_t, stats.den,
                   stats.variance, stats.sigma, mean_sigma, mean_threshold, threshold, floor,
                   r.data(), k.data(), q.data(), pad);
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p)
    products[p] = (g_sum[p] * r[p] + k[p] * stats.y_sum[p]) / count;  // sum_i g_v / C
  smooth(products.data(), q.data(), rows_t, window.r_h, columns_t, window.r_w, h, w, pad);
  const T* __restrict mean = stats.mean;
  const T* __restrict rp = r.data();
  const T* __restrict kp = k.data();
  const T* __restrict qp = q.data();
  // g_x = sign(x) (k y - q) everywhere, and sign(x) g r added at each window's maximum.
  const auto first_term = [&](int64_t e, int64_t p) {
    const T value = kp[p] * ((rectified<T, Rectify>(x[e]) - mean[p]) * rp[p]) - qp[p];
    out[e] = Rectify ? value * sign(x[e]) : value;
  };
  const auto add_window_shares = [&](int64_t i) {
    for (int64_t j = 0; j < outputs; ++j) {
      const int64_t e = layout.pooled(i, j), p = index[e], at = layout.at(i, p);
      const T share = grad[e] * rp[p];
      out[at] += Rectify ? share * sign(x[at]) : share;
    }
  };
  if constexpr (ChannelsLast) {
    // Each pixel's maps, then the windows whose maximum it is, while the pixel is in the
    // cache: the windows sorted by that pixel (in map order, as the contiguous path adds
    // them).
    std::vector<int64_t> starts(pixels + 1, 0), by_pixel(maps * outputs);
    for (int64_t e = 0; e < maps * outputs; ++e) ++starts[index[e] + 1];
    for (int64_t p = 0; p < pixels; ++p) starts[p + 1] += starts[p];
    std::vector<int64_t> next(starts.begin(), starts.end() - 1);
    for (int64_t i = 0; i < maps; ++i) {
      for (int64_t j = 0; j < outputs; ++j) {
        const int64_t e = layout.pooled(i, j);
        by_pixel[next[index[e]]++] = e;
      }
    }
    at::parallel_for(0, pixels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
#pragma omp simd
        for (int64_t i = 0; i < maps; ++i) first_term(p * maps + i, p);
        for (int64_t j = starts[p]; j < starts[p + 1]; ++j) {
          const int64_t e = by_pixel[j], at = p * maps + e % maps;
          const T share = grad[e] * rp[p];
          out[at] += Rectify ? share * sign(x[at]) : share;
        }
      }
    });
  } else {  // each map's pixels and its maxima while the map is in the cache
    at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
#pragma omp simd
        for (int64_t p = 0; p < pixels; ++p) first_term(i * pixels + p, p);
        add_window_shares(i);
      }
    });
  }
}

at::Tensor contrast_norm_max_pool_backward(
    const at::Tensor& grad, const at::Tensor& index, const at::Tensor& maxima, const at::Tensor& x,
    const at::Tensor& stats, const at::Tensor& mean_sigma,
    const at::Tensor& row_diagonals_t, const at::Tensor& column_diagonals_t, bool rectify,
    bool mean_threshold, double threshold, double floor) {
  const bool channels_last = channels_last_layout(x);
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && (x.is_contiguous() || channels_last),
              "x must be contiguous or channels-last (N, C, H, W) on the CPU");
  const int64_t n_images = x.size(0), maps = x.size(1), h = x.size(2), w = x.size(3);
  check_window_matrices(x, row_diagonals_t, column_diagonals_t, at::Tensor());
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == n_images && grad.size(1) == maps,
              "grad must be (N, C, H_out, W_out)");
  TORCH_CHECK(index.sizes() == grad.sizes() && index.scalar_type() == at::kLong,
              "index must be int64 with the shape of grad");
  TORCH_CHECK(maxima.sizes() == grad.sizes() && maxima.scalar_type() == x.scalar_type(),
              "maxima must have the shape of grad and the dtype of x");
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({n_images, 5, h, w}) && stats.is_contiguous(),
              "stats must be contiguous (N, 5, H, W)");
  TORCH_CHECK(mean_sigma.sizes() == at::IntArrayRef({n_images}), "mean_sigma must be (N,)");
  const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor g = grad.contiguous(layout), at_index = index.contiguous(layout),
                   m = maxima.contiguous(layout);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(layout));
  const Window window{h, w, row_diagonals_t.size(0) / 2, column_diagonals_t.size(0) / 2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrast_norm_max_pool_backward", [&] {
    using T = scalar_t;
    auto* image_backward =
        rectify ? (channels_last ? &normalize_and_pool_backward_image<T, true, true>
                                 : &normalize_and_pool_backward_image<T, true, false>)
                : (channels_last ? &normalize_and_pool_backward_image<T, false, true>
                                 : &normalize_and_pool_backward_image<T, false, false>);
    const int64_t pixels = h * w, outputs = g.size(2) * g.size(3);
    over_images(n_images, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const auto image_stats =
            PixelStatistics<T>::planes(stats.data_ptr<T>() + n * 5 * pixels, pixels);
        const int64_t o = n * maps * outputs;
        image_backward(g.data_ptr<T>() + o, at_index.data_ptr<int64_t>() + o,
                       m.data_ptr<T>() + o, x.data_ptr<T>() + n * maps * pixels,
                       out.data_ptr<T>() + n * maps * pixels, maps, outputs, window,
                       row_diagonals_t.data_ptr<T>(), column_diagonals_t.data_ptr<T>(),
                       image_stats, mean_sigma.data_ptr<T>()[n], mean_threshold, threshold,
                       floor);
      }
    });
  });
  return out;
}

// The backward of the first stage whole (its maps y = the filter bank's output kept,
// channels-last): each image's gradient of y, made as contrast_norm_max_pool_backward
// makes it, into a buffer of one image, from which the kernels' and the biases' gradients
// (direct_conv.h) are summed while it is in the cache; the gradient of y never goes out
// to memory. Returns (d_taps (C kh kw, O), d_bias (O)).
std::tuple<at::Tensor, at::Tensor> direct_conv_norm_max_pool_backward(
    const at::Tensor& grad, const at::Tensor& index, const at::Tensor& maxima,
    const at::Tensor& y, const at::Tensor& stats, const at::Tensor& mean_sigma,
    const at::Tensor& row_diagonals_t, const at::Tensor& column_diagonals_t, bool rectify,
    bool mean_threshold, double threshold, double floor, const at::Tensor& x, int64_t kh,
    int64_t kw) {
  TORCH_CHECK(y.dim() == 4 && y.device().is_cpu() &&
                  y.is_contiguous(at::MemoryFormat::ChannelsLast),
              "y must be channels-last (N, O, H, W) on the CPU, got sizes ", y.sizes());
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.size(0) == y.size(0) &&
                  x.size(2) == y.size(2) + kh - 1 && x.size(3) == y.size(3) + kw - 1 &&
                  x.scalar_type() == y.scalar_type(),
              "x must be contiguous (N, C, H + kh - 1, W + kw - 1) with the dtype of y, got "
              "sizes ", x.sizes());
  const int64_t n_images = y.size(0), maps = y.size(1), h = y.size(2), w = y.size(3);
  check_window_matrices(y, row_diagonals_t, column_diagonals_t, at::Tensor());
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == n_images && grad.size(1) == maps,
              "grad must be (N, O, H_out, W_out)");
  TORCH_CHECK(index.sizes() == grad.sizes() && index.scalar_type() == at::kLong &&
                  maxima.sizes() == grad.sizes() && maxima.scalar_type() == y.scalar_type(),
              "index (int64) and maxima must have the shape of grad");
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({n_images, 5, h, w}) && stats.is_contiguous(),
              "stats must be contiguous (N, 5, H, W)");
  TORCH_CHECK(mean_sigma.sizes() == at::IntArrayRef({n_images}), "mean_sigma must be (N,)");
  const auto layout = at::MemoryFormat::ChannelsLast;
  const at::Tensor g = grad.contiguous(layout), at_index = index.contiguous(layout),
                   m = maxima.contiguous(layout);
  const cnnkit_direct::Sizes s{x.size(1), x.size(2), x.size(3), kh, kw, maps};
  const Window window{h, w, row_diagonals_t.size(0) / 2, column_diagonals_t.size(0) / 2};
  const int64_t threads = at::get_num_threads(), taps = s.maps * kh * kw;
  // Each thread's sums: taps rows of d_taps, then one row of d_bias.
  at::Tensor partial = at::zeros({threads, taps + 1, maps}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "direct_conv_norm_max_pool_backward", [&] {
    using T = scalar_t;
    check_whole_vectors<T>(maps);
    auto* image_backward = rectify ? &normalize_and_pool_backward_image<T, true, true>
                                   : &normalize_and_pool_backward_image<T, false, true>;
    const int64_t pixels = h * w, outputs = g.size(2) * g.size(3);
    const int64_t strips = (h + cnnkit_direct::kStripRows - 1) / cnnkit_direct::kStripRows;
    T* pp = partial.data_ptr<T>();
    over_images(n_images, [&](int64_t begin, int64_t end) {
      std::vector<T> g_y(maps * pixels);
      for (int64_t n = begin; n < end; ++n) {
        const auto image_stats =
            PixelStatistics<T>::planes(stats.data_ptr<T>() + n * 5 * pixels, pixels);
        const int64_t o = n * maps * outputs;
        image_backward(g.data_ptr<T>() + o, at_index.data_ptr<int64_t>() + o,
                       m.data_ptr<T>() + o, y.data_ptr<T>() + n * maps * pixels, g_y.data(),
                       maps, outputs, window, row_diagonals_t.data_ptr<T>(),
                       column_diagonals_t.data_ptr<T>(), image_stats,
                       mean_sigma.data_ptr<T>()[n], mean_threshold, threshold, floor);
        const T* image = x.data_ptr<T>() + n * s.maps * s.h * s.w;
        // Inside the loop over images a parallel_for runs inline, as thread number 0.
        const int64_t image_thread = at::in_parallel_region() ? at::get_thread_num() : -1;
        at::parallel_for(0, strips, 1, [&](int64_t first, int64_t last) {
          const int64_t thread = image_thread >= 0 ? image_thread : at::get_thread_num();
          T* d_taps = pp + thread * (taps + 1) * maps;
          for (int64_t strip = first; strip < last; ++strip) {
            const int64_t y0 = strip * cnnkit_direct::kStripRows;
            const int64_t rows = std::min(cnnkit_direct::kStripRows, h - y0);
            cnnkit_direct::gradient_strip(image, g_y.data() + y0 * w * maps, d_taps,
                                          d_taps + taps * maps, y0, rows, s);
          }
        });
      }
    });
  });
  const at::Tensor sums = partial.sum(0);
  return {sums.narrow(0, 0, taps), sums[taps].clone()};  // outputs that share no memory
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cnnkit_native, m) {
  m.def(
      "contrast_norm_max_pool_forward(Tensor x, Tensor row_diagonals, "
      "Tensor column_diagonals, Tensor mass, bool rectify, bool mean_threshold, "
      "float threshold, float floor, int kh, int kw, int sh, int sw, bool with_sums) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.impl("contrast_norm_max_pool_forward", c10::DispatchKey::CPU,
         &contrast_norm_max_pool_forward);
  m.def(
      "contrast_norm_max_pool_backward(Tensor grad, Tensor index, Tensor maxima, Tensor x, "
      "Tensor stats, Tensor mean_sigma, Tensor row_diagonals_t, Tensor column_diagonals_t, "
      "bool rectify, bool mean_threshold, float threshold, float floor) -> Tensor");
  m.impl("contrast_norm_max_pool_backward", c10::DispatchKey::CPU,
         &contrast_norm_max_pool_backward);
  m.def(
      "direct_conv_norm_max_pool(Tensor x, Tensor taps, Tensor? bias, int kh, int kw, "
      "Tensor row_diagonals, Tensor column_diagonals, Tensor mass, bool rectify, "
      "bool mean_threshold, float threshold, float floor, int pool_kh, int pool_kw, int sh, "
      "int sw) -> Tensor");
  m.impl("direct_conv_norm_max_pool", c10::DispatchKey::CPU, &direct_conv_norm_max_pool);
  m.def(
      "direct_conv_norm_max_pool_backward(Tensor grad, Tensor index, Tensor maxima, Tensor y, "
      "Tensor stats, Tensor mean_sigma, Tensor row_diagonals_t, Tensor column_diagonals_t, "
      "bool rectify, bool mean_threshold, float threshold, float floor, Tensor x, int kh, "
      "int kw) -> (Tensor, Tensor)");
  m.impl("direct_conv_norm_max_pool_backward", c10::DispatchKey::CPU,
         &direct_conv_norm_max_pool_backward);
}
