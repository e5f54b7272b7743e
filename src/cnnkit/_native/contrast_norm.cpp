// Local contrast normalization of (N, C, H, W) maps in three passes over them.
//
// For each image, with a = |x| (rectifying) or x, S the sum over maps, and
// smooth(Z) = B_h Z B_w^T for the banded (H, H) and (W, W) matrices of the window:
//
//   shift = mean(S);  m = (smooth(S - shift) + shift * mass) / C
//   P = sum_i (a_i - m)^2;  variance = smooth(P) / C;  sigma = sqrt(max(variance, tiny))
//   den = max(sigma, max(mean(sigma), floor))   or   max(sigma, max(threshold, floor))
//   y_i = (a_i - m) * (1 / den)
//
// the order of operations of cnnkit.ops.normalization._ContrastNorm.forward, which the
// eager path runs as some twenty tensor operations and ten passes over the maps.
// Here: pass 1 reads x for S, pass 2 reads x for P, pass 3 reads x and writes y.
//
// The backward, from the gradient g of y, with r = 1 / den and S^T the adjoint of the
// window sum (B_h^T z B_w, from the transposed matrices' diagonals), is
//
//   g_den = -r sum_i g_i y_i;  g_sigma, g_var: the threshold's and the root's rules
//   k = 2 den S^T(g_var) / C;  g_v = g r + k y;  g_a = g_v - S^T(sum_i g_v) / C
//   g_x = sign(x) g_a (rectifying) or g_a
//
// in three passes: sum_i g_i y_i (reads g, y), sum_i g_v (reads g, y), and g_x (reads
// g, y, x; writes g_x).
//
// The banded matrices come as diagonals: diagonals[d][j] = B[j][j + d - r] for
// d = 0 .. 2r (0 where j + d - r leaves 0 .. n-1), which holds every border rule.
// Maps are contiguous (N, C, H, W) or channels-last (N, H, W, C).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "max_pool.h"

namespace {

// torch.maximum's rule: NaN if either is NaN (written without branches to vectorize).
template <typename T>
inline T nan_max(T a, T b) {
  T larger = a < b ? b : a;
  larger = b != b ? b : larger;
  return a != a ? a : larger;
}

// out = B_h z B_w^T for (h, w) images; column_pad holds w + 2 r_w values.
template <typename T>
void smooth(const T* __restrict z, T* __restrict out, const T* __restrict rows, int64_t r_h,
            const T* __restrict columns, int64_t r_w, int64_t h, int64_t w,
            std::vector<T>& column_pad) {
  T* __restrict line = column_pad.data() + r_w;  // row j of B_h z, r_w zeros either side
  for (int64_t j = 0; j < h; ++j) {
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) line[k] = T(0);
    for (int64_t d = 0; d <= 2 * r_h; ++d) {
      const int64_t i = j + d - r_h;
      if (i < 0 || i >= h) continue;
      const T weight = rows[d * h + j];
      const T* __restrict source = z + i * w;
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) line[k] += weight * source[k];
    }
    T* __restrict target = out + j * w;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) target[k] = T(0);
    for (int64_t d = 0; d <= 2 * r_w; ++d) {
      const T* __restrict weights = columns + d * w;
      const T* __restrict shifted = line + d - r_w;
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) target[k] += weights[k] * shifted[k];
    }
  }
}

template <typename T, bool Rectify>
inline T rectified(T value) {
  return Rectify ? std::abs(value) : value;
}

// The maps of one image: x and y point at its first element; map i, pixel p is at
// i * map_stride + p * pixel_stride (channels-last: map_stride 1; else pixel_stride 1).
template <typename T>
struct Image {
  const T* x;
  T* y;
  int64_t maps, pixels;
};

// sums[p] = sum_i f(a_ip) for pixels [begin, end), f(a) = a or (a - mean[p])^2.
template <typename T, bool Rectify, bool ChannelsLast, bool Centred>
void sum_over_maps(const Image<T>& image, const T* mean, int64_t begin, int64_t end,
                   T* sums) {
  if (ChannelsLast) {
    for (int64_t p = begin; p < end; ++p) {
      const T* values = image.x + p * image.maps;
      const T centre = Centred ? mean[p] : T(0);
      T total = T(0);
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < image.maps; ++i) {
        const T a = rectified<T, Rectify>(values[i]);
        total += Centred ? (a - centre) * (a - centre) : a;
      }
      sums[p] = total;
    }
  } else {
    const auto term = [mean](T value, int64_t p) {
      const T a = rectified<T, Rectify>(value);
      return Centred ? (a - mean[p]) * (a - mean[p]) : a;
    };
    for (int64_t p = begin; p < end; ++p) sums[p] = T(0);
    // Four maps per sweep, added one after another in map order (the same sums as one
    // map per sweep, with a quarter of the loads and stores of the running sums).
    const int64_t pixels = image.pixels, blocked = image.maps / 4 * 4;
    for (int64_t i = 0; i < blocked; i += 4) {
      const T* v0 = image.x + i * pixels;
      const T *v1 = v0 + pixels, *v2 = v1 + pixels, *v3 = v2 + pixels;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) {
        T total = sums[p];
        total += term(v0[p], p);
        total += term(v1[p], p);
        total += term(v2[p], p);
        total += term(v3[p], p);
        sums[p] = total;
      }
    }
    for (int64_t i = blocked; i < image.maps; ++i) {
      const T* values = image.x + i * pixels;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) sums[p] += term(values[p], p);
    }
  }
}

// y_ip = (a_ip - mean[p]) * scale[p] for pixels [begin, end).
template <typename T, bool Rectify, bool ChannelsLast>
void write_output(const Image<T>& image, const T* mean, const T* scale, int64_t begin,
                  int64_t end) {
  if (ChannelsLast) {
    for (int64_t p = begin; p < end; ++p) {
      const T* values = image.x + p * image.maps;
      T* out = image.y + p * image.maps;
      const T centre = mean[p], factor = scale[p];
#pragma omp simd
      for (int64_t i = 0; i < image.maps; ++i)
        out[i] = (rectified<T, Rectify>(values[i]) - centre) * factor;
    }
  } else {
    for (int64_t i = 0; i < image.maps; ++i) {
      const T* values = image.x + i * image.pixels;
      T* out = image.y + i * image.pixels;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p)
        out[p] = (rectified<T, Rectify>(values[p]) - mean[p]) * scale[p];
    }
  }
}

struct Window {
  int64_t h, w, r_h, r_w;
};

// Pieces of work on one image's pixels: about 32 K values each, so that an image that is
// the only task splits across threads (a nested parallel_for runs inline).
inline int64_t pixel_grain(int64_t maps) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, maps));
}

// Runs task(begin, end) over images: one image per thread, or, with fewer images than
// threads, one image after another, so that the passes within an image split across the
// threads (a parallel_for inside a parallel region runs on one thread, and torch counts
// a loop of one image as such a region).
template <typename Task>
void over_images(int64_t n_images, const Task& task) {
  if (n_images < at::get_num_threads()) {
    for (int64_t n = 0; n < n_images; ++n) task(n, n + 1);
  } else {
    at::parallel_for(0, n_images, 1, task);
  }
}

// Passes 1 and 2 over one image: mean[p] = m, scale[p] = 1 / den, and the den, variance,
// sigma and mean-of-sigma outputs.
template <typename T, bool Rectify, bool ChannelsLast>
void image_statistics(const Image<T>& image, const Window& window, const T* rows,
                      const T* columns, const T* mass, bool mean_threshold, double threshold,
                      double floor, T* mean, T* scale, T* den_out, T* variance_out,
                      T* sigma_out, T* mean_sigma_out) {
  const int64_t pixels = image.pixels, h = window.h, w = window.w;
  const T maps = static_cast<T>(image.maps);
  std::vector<T> sums(pixels), smoothed(pixels), pad(w + 2 * window.r_w);
  const int64_t grain = pixel_grain(image.maps);

  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    sum_over_maps<T, Rectify, ChannelsLast, false>(image, nullptr, begin, end, sums.data());
  });
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t p = 0; p < pixels; ++p) total += sums[p];
  const T shift = static_cast<T>(total / pixels);
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) sums[p] -= shift;
  smooth(sums.data(), smoothed.data(), rows, window.r_h, columns, window.r_w, h, w, pad);
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) mean[p] = (smoothed[p] + shift * mass[p]) / maps;

  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    sum_over_maps<T, Rectify, ChannelsLast, true>(image, mean, begin, end, sums.data());
  });
  smooth(sums.data(), smoothed.data(), rows, window.r_h, columns, window.r_w, h, w, pad);
  const T tiny = std::numeric_limits<T>::min();
  double sigma_total = 0;
#pragma omp simd reduction(+ : sigma_total)
  for (int64_t p = 0; p < pixels; ++p) {
    const T variance = smoothed[p] / maps;
    const T sigma = std::sqrt(nan_max(variance, tiny));
    variance_out[p] = variance;
    sigma_out[p] = sigma;
    sigma_total += sigma;
  }
  const T mean_sigma = static_cast<T>(sigma_total / pixels);
  *mean_sigma_out = mean_sigma;
  const T limit = mean_threshold ? nan_max(mean_sigma, static_cast<T>(floor))
                                 : static_cast<T>(std::max(threshold, floor));
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) {
    den_out[p] = nan_max(sigma_out[p], limit);
    scale[p] = T(1) / den_out[p];
  }
}

template <typename T, bool Rectify, bool ChannelsLast>
void normalize_image(const Image<T>& image, const Window& window, const T* rows,
                     const T* columns, const T* mass, bool mean_threshold, double threshold,
                     double floor, T* den_out, T* variance_out, T* sigma_out,
                     T* mean_sigma_out) {
  std::vector<T> mean(image.pixels), scale(image.pixels);
  image_statistics<T, Rectify, ChannelsLast>(image, window, rows, columns, mass,
                                             mean_threshold, threshold, floor, mean.data(),
                                             scale.data(), den_out, variance_out, sigma_out,
                                             mean_sigma_out);
  at::parallel_for(0, image.pixels, pixel_grain(image.maps), [&](int64_t begin, int64_t end) {
    write_output<T, Rectify, ChannelsLast>(image, mean.data(), scale.data(), begin, end);
  });
}

// The window's banded matrices for (h, w) maps of x's dtype; mass may be undefined.
void check_window_matrices(const at::Tensor& x, const at::Tensor& row_diagonals,
                           const at::Tensor& column_diagonals, const at::Tensor& mass) {
  const int64_t h = x.size(2), w = x.size(3);
  TORCH_CHECK(row_diagonals.dim() == 2 && row_diagonals.size(1) == h &&
                  row_diagonals.size(0) % 2 == 1 && row_diagonals.is_contiguous(),
              "row_diagonals must be (2r + 1, H)");
  TORCH_CHECK(column_diagonals.dim() == 2 && column_diagonals.size(1) == w &&
                  column_diagonals.size(0) % 2 == 1 && column_diagonals.is_contiguous(),
              "column_diagonals must be (2r + 1, W)");
  TORCH_CHECK(row_diagonals.scalar_type() == x.scalar_type() &&
                  column_diagonals.scalar_type() == x.scalar_type(),
              "the window's matrices must have the dtype of x");
  if (mass.defined()) {
    TORCH_CHECK(mass.sizes() == at::IntArrayRef({h, w}) && mass.is_contiguous() &&
                    mass.scalar_type() == x.scalar_type(),
                "mass must be (H, W) with the dtype of x");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrast_norm_forward(
    const at::Tensor& x, const at::Tensor& row_diagonals, const at::Tensor& column_diagonals,
    const at::Tensor& mass, bool rectify, bool mean_threshold, double threshold, double floor) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be (N, C, H, W) on the CPU");
  const bool channels_last =
      !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous() || channels_last, "x must be contiguous or channels-last");
  const int64_t n_images = x.size(0), maps = x.size(1), h = x.size(2), w = x.size(3);
  check_window_matrices(x, row_diagonals, column_diagonals, mass);
  at::Tensor y = at::empty_like(x);
  auto small = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor den = at::empty({n_images, h, w}, small);
  at::Tensor variance = at::empty({n_images, h, w}, small);
  at::Tensor sigma = at::empty({n_images, h, w}, small);
  at::Tensor mean_sigma = at::empty({n_images}, small);
  const Window window{h, w, row_diagonals.size(0) / 2, column_diagonals.size(0) / 2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrast_norm_forward", [&] {
    using T = scalar_t;
    auto* normalize = rectify ? (channels_last ? &normalize_image<T, true, true>
                                               : &normalize_image<T, true, false>)
                              : (channels_last ? &normalize_image<T, false, true>
                                               : &normalize_image<T, false, false>);
    const T* source = x.data_ptr<T>();
    T* target = y.data_ptr<T>();
    const T* rows = row_diagonals.data_ptr<T>();
    const T* columns = column_diagonals.data_ptr<T>();
    const T* mass_map = mass.data_ptr<T>();
    T* den_map = den.data_ptr<T>();
    T* variance_map = variance.data_ptr<T>();
    T* sigma_map = sigma.data_ptr<T>();
    T* mean_sigmas = mean_sigma.data_ptr<T>();
    const int64_t image_size = maps * h * w, pixels = h * w;
    over_images(n_images, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const Image<T> image{source + n * image_size, target + n * image_size, maps, pixels};
        normalize(image, window, rows, columns, mass_map, mean_threshold, threshold, floor,
                  den_map + n * pixels, variance_map + n * pixels, sigma_map + n * pixels,
                  mean_sigmas + n);
      }
    });
  });
  return {y, den, variance, sigma, mean_sigma};
}

// For each pixel p of [begin, end): sums[p] = sum_i g_ip y_ip (GradientOfV false) or
// sum_i g_v,ip = sum_i (g_ip r_p + k_p y_ip) (GradientOfV true).
template <typename T, bool ChannelsLast, bool GradientOfV>
void sum_products(const T* __restrict g, const T* __restrict y, int64_t maps, int64_t pixels,
                  const T* __restrict r, const T* __restrict k, int64_t begin, int64_t end,
                  T* __restrict sums) {
  if (ChannelsLast) {
    for (int64_t p = begin; p < end; ++p) {
      const T* gp = g + p * maps;
      const T* yp = y + p * maps;
      const T rp = GradientOfV ? r[p] : T(0), kp = GradientOfV ? k[p] : T(0);
      T total = T(0);
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < maps; ++i)
        total += GradientOfV ? gp[i] * rp + kp * yp[i] : gp[i] * yp[i];
      sums[p] = total;
    }
  } else {
    for (int64_t p = begin; p < end; ++p) sums[p] = T(0);
    for (int64_t i = 0; i < maps; ++i) {
      const T* gi = g + i * pixels;
      const T* yi = y + i * pixels;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p)
        sums[p] += GradientOfV ? gi[p] * r[p] + k[p] * yi[p] : gi[p] * yi[p];
    }
  }
}

template <typename T>
inline T sign(T value) {
  return static_cast<T>((value > T(0)) - (value < T(0)));  // 0 for 0 and NaN, as torch.sgn
}

// g_x_ip = (g_ip r_p + k_p y_ip - a_p) (times sign(x_ip)) for pixels [begin, end).
template <typename T, bool Rectify, bool ChannelsLast>
void write_gradient(const T* __restrict g, const T* __restrict y, const T* __restrict x,
                    T* __restrict out, int64_t maps, int64_t pixels, const T* __restrict r,
                    const T* __restrict k, const T* __restrict a, int64_t begin, int64_t end) {
  if (ChannelsLast) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t o = p * maps;
      const T rp = r[p], kp = k[p], ap = a[p];
#pragma omp simd
      for (int64_t i = 0; i < maps; ++i) {
        const T value = g[o + i] * rp + kp * y[o + i] - ap;
        out[o + i] = Rectify ? value * sign(x[o + i]) : value;
      }
    }
  } else {
    for (int64_t i = 0; i < maps; ++i) {
      const int64_t o = i * pixels;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) {
        const T value = g[o + p] * r[p] + k[p] * y[o + p] - a[p];
        out[o + p] = Rectify ? value * sign(x[o + p]) : value;
      }
    }
  }
}

// From products[p] = sum_i g_ip y_ip: r[p] = 1 / den and k[p] = 2 den S^T(g_var) / C, the
// part of the gradient that flows through the divisor (the threshold's and the root's
// rules); g_var is scratch.
template <typename T>
void divisor_gradient(const T* products, int64_t maps, const Window& window, const T* rows_t,
                      const T* columns_t, const T* den, const T* variance, const T* sigma,
                      T mean_sigma, bool mean_threshold, double threshold, double floor, T* r,
                      T* k, T* g_var, std::vector<T>& pad) {
  const int64_t h = window.h, w = window.w, pixels = h * w;
  const T count = static_cast<T>(maps);
  const T tiny = std::numeric_limits<T>::min();
  const T c = mean_threshold ? nan_max(mean_sigma, static_cast<T>(floor)) : T(0);
  const T limit = static_cast<T>(std::max(threshold, floor));
  double g_c = 0;
#pragma omp simd reduction(+ : g_c)
  for (int64_t p = 0; p < pixels; ++p) {
    r[p] = T(1) / den[p];
    const T g_den = -(products[p] * r[p]);
    if (mean_threshold) {
      const T half = sigma[p] == c ? g_den / T(2) : g_den;
      g_var[p] = sigma[p] < c ? T(0) : half;  // g_sigma, for now
      g_c += sigma[p] > c ? T(0) : half;
    } else {
      g_var[p] = sigma[p] >= limit ? g_den : T(0);
    }
  }
  const T g_c_share =
      mean_threshold && mean_sigma >= static_cast<T>(floor) ? static_cast<T>(g_c) : T(0);
  const T spread = g_c_share / static_cast<T>(pixels);
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) {
    const T g_sigma = mean_threshold ? g_var[p] + spread : g_var[p];
    g_var[p] = (variance[p] >= tiny ? g_sigma / (T(2) * sigma[p]) : T(0)) / count;
  }
  smooth(g_var, k, rows_t, window.r_h, columns_t, window.r_w, h, w, pad);
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) k[p] = T(2) * den[p] * k[p];
}

template <typename T, bool Rectify, bool ChannelsLast>
void backward_image(const T* g, const T* y, const T* x, T* out, int64_t maps,
                    const Window& window, const T* rows_t, const T* columns_t, const T* den,
                    const T* variance, const T* sigma, T mean_sigma, bool mean_threshold,
                    double threshold, double floor) {
  const int64_t h = window.h, w = window.w, pixels = h * w;
  const T count = static_cast<T>(maps);
  std::vector<T> sums(pixels), r(pixels), k(pixels), g_var(pixels), pad(w + 2 * window.r_w);
  const int64_t grain = pixel_grain(maps);

  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    sum_products<T, ChannelsLast, false>(g, y, maps, pixels, nullptr, nullptr, begin, end,
                                         sums.data());
  });
  divisor_gradient(sums.data(), maps, window, rows_t, columns_t, den, variance, sigma,
                   mean_sigma, mean_threshold, threshold, floor, r.data(), k.data(),
                   g_var.data(), pad);

  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    sum_products<T, ChannelsLast, true>(g, y, maps, pixels, r.data(), k.data(), begin, end,
                                        sums.data());
  });
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) sums[p] /= count;
  // g_var now holds S^T(sum_i g_v) / C.
  smooth(sums.data(), g_var.data(), rows_t, window.r_h, columns_t, window.r_w, h, w, pad);
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    write_gradient<T, Rectify, ChannelsLast>(g, y, x, out, maps, pixels, r.data(), k.data(),
                                             g_var.data(), begin, end);
  });
}

at::Tensor contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& y, const at::Tensor& den,
                                  const at::Tensor& variance, const at::Tensor& sigma,
                                  const at::Tensor& mean_sigma,
                                  const at::Tensor& row_diagonals_t,
                                  const at::Tensor& column_diagonals_t, bool rectify,
                                  bool mean_threshold, double threshold, double floor) {
  const bool channels_last =
      !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(format),
              "x must be (N, C, H, W) on the CPU, contiguous or channels-last");
  TORCH_CHECK(grad.sizes() == x.sizes() && y.sizes() == x.sizes() &&
                  grad.is_contiguous(format) && y.is_contiguous(format),
              "grad and y must have the shape and layout of x");
  const int64_t n_images = x.size(0), maps = x.size(1), h = x.size(2), w = x.size(3);
  for (const at::Tensor* map : {&den, &variance, &sigma}) {
    TORCH_CHECK(map->sizes() == at::IntArrayRef({n_images, h, w}) && map->is_contiguous(),
                "den, variance and sigma must be contiguous (N, H, W)");
  }
  TORCH_CHECK(mean_sigma.sizes() == at::IntArrayRef({n_images}), "mean_sigma must be (N,)");
  TORCH_CHECK(row_diagonals_t.dim() == 2 && row_diagonals_t.size(1) == h &&
                  column_diagonals_t.dim() == 2 && column_diagonals_t.size(1) == w &&
                  row_diagonals_t.is_contiguous() && column_diagonals_t.is_contiguous(),
              "the transposed matrices' diagonals must be (2r + 1, H) and (2r + 1, W)");
  at::Tensor out = at::empty_like(x);
  const Window window{h, w, row_diagonals_t.size(0) / 2, column_diagonals_t.size(0) / 2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrast_norm_backward", [&] {
    using T = scalar_t;
    auto* image_backward = rectify ? (channels_last ? &backward_image<T, true, true>
                                                    : &backward_image<T, true, false>)
                                   : (channels_last ? &backward_image<T, false, true>
                                                    : &backward_image<T, false, false>);
    const int64_t image_size = maps * h * w, pixels = h * w;
    const T* gs = grad.data_ptr<T>();
    const T* ys = y.data_ptr<T>();
    const T* xs = x.data_ptr<T>();
    T* outs = out.data_ptr<T>();
    const T* dens = den.data_ptr<T>();
    const T* variances = variance.data_ptr<T>();
    const T* sigmas = sigma.data_ptr<T>();
    const T* mean_sigmas = mean_sigma.data_ptr<T>();
    const T* rows_t = row_diagonals_t.data_ptr<T>();
    const T* columns_t = column_diagonals_t.data_ptr<T>();
    over_images(n_images, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t o = n * image_size, q = n * pixels;
        image_backward(gs + o, ys + o, xs + o, outs + o, maps, window, rows_t, columns_t,
                       dens + q, variances + q, sigmas + q, mean_sigmas[n], mean_threshold,
                       threshold, floor);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Normalization followed by max pooling, for contiguous maps
//
// Forward: passes 1 and 2 as above; pass 3 makes each map's y in a buffer of one map
// (which stays in the cache) and pools it there, so y is never written out. It also
// keeps, per pixel, mean m, den, variance, sigma and (with_sums) sum_i y_i for the
// backward.
//
// Backward: the gradient of y is the pooling's, one value per window at its maximum, so
// the sums over maps that the backward above reads all of g and y for are sums over the
// windows: sum_i g_i y_i from each window's gradient times y at its maximum, sum_i g_i
// from the gradients alone, and sum_i g_v = r sum_i g_i + k sum_i y_i. One pass then
// writes g_x = sign(x) (k y - q) with y = (a - m) r and q = S^T(sum_i g_v) / C, and each
// window adds sign(x) g r at its maximum.
// ---------------------------------------------------------------------------------------

struct PoolWindow {
  int64_t kh, kw, sh, sw, h_out, w_out;
};

// The five per-pixel maps the backward needs, each (H, W) of one image.
template <typename T>
struct PixelStatistics {
  T *mean, *den, *variance, *sigma, *y_sum;
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
  const bool channels_last =
      !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
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
        const PixelStatistics<T> image_stats{s, s + pixels, s + 2 * pixels, s + 3 * pixels,
                                             with_sums ? s + 4 * pixels : nullptr};
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

template <typename T, bool Rectify>
void normalize_and_pool_backward_image(const T* grad, const int64_t* index, const T* x,
                                       T* out, int64_t maps, int64_t outputs,
                                       const Window& window, const T* rows_t,
                                       const T* columns_t, const PixelStatistics<T>& stats,
                                       T mean_sigma, bool mean_threshold, double threshold,
                                       double floor) {
  const int64_t h = window.h, w = window.w, pixels = h * w;
  const T count = static_cast<T>(maps);
  std::vector<T> g_sum(pixels, T(0)), products(pixels, T(0)), r(pixels), k(pixels),
      q(pixels), pad(w + 2 * window.r_w);
  // Each window's pooled value is y at its maximum, recomputed as the forward made it.
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) r[p] = T(1) / stats.den[p];
  for (int64_t i = 0; i < maps; ++i) {
    const T* xi = x + i * pixels;
    for (int64_t j = i * outputs; j < (i + 1) * outputs; ++j) {
      const int64_t p = index[j];
      const T y = (rectified<T, Rectify>(xi[p]) - stats.mean[p]) * r[p];
      g_sum[p] += grad[j];
      products[p] += grad[j] * y;
    }
  }
  divisor_gradient(products.data(), maps, window, rows_t, columns_t, stats.den,
                   stats.variance, stats.sigma, mean_sigma, mean_threshold, threshold, floor,
                   r.data(), k.data(), q.data(), pad);
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p)
    products[p] = (g_sum[p] * r[p] + k[p] * stats.y_sum[p]) / count;  // sum_i g_v / C
  smooth(products.data(), q.data(), rows_t, window.r_h, columns_t, window.r_w, h, w, pad);
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
    const T* __restrict mean = stats.mean;
    const T* __restrict rp = r.data();
    const T* __restrict kp = k.data();
    const T* __restrict qp = q.data();
    for (int64_t i = begin; i < end; ++i) {
      const T* __restrict xi = x + i * pixels;
      T* __restrict gi = out + i * pixels;
#pragma omp simd
      for (int64_t p = 0; p < pixels; ++p) {
        const T value = kp[p] * ((rectified<T, Rectify>(xi[p]) - mean[p]) * rp[p]) - qp[p];
        gi[p] = Rectify ? value * sign(xi[p]) : value;
      }
      for (int64_t j = i * outputs; j < (i + 1) * outputs; ++j) {
        const int64_t p = index[j];
        const T share = grad[j] * rp[p];
        gi[p] += Rectify ? share * sign(xi[p]) : share;
      }
    }
  });
}

at::Tensor contrast_norm_max_pool_backward(
    const at::Tensor& grad, const at::Tensor& index, const at::Tensor& x, const at::Tensor& stats, const at::Tensor& mean_sigma,
    const at::Tensor& row_diagonals_t, const at::Tensor& column_diagonals_t, bool rectify,
    bool mean_threshold, double threshold, double floor) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "x must be contiguous (N, C, H, W) on the CPU");
  const int64_t n_images = x.size(0), maps = x.size(1), h = x.size(2), w = x.size(3);
  check_window_matrices(x, row_diagonals_t, column_diagonals_t, at::Tensor());
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == n_images && grad.size(1) == maps,
              "grad must be (N, C, H_out, W_out)");
  TORCH_CHECK(index.sizes() == grad.sizes() && index.scalar_type() == at::kLong,
              "index must be int64 with the shape of grad");
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({n_images, 5, h, w}) && stats.is_contiguous(),
              "stats must be contiguous (N, 5, H, W)");
  TORCH_CHECK(mean_sigma.sizes() == at::IntArrayRef({n_images}), "mean_sigma must be (N,)");
  const at::Tensor g = grad.contiguous(), at_index = index.contiguous();
  at::Tensor out = at::empty_like(x);
  const Window window{h, w, row_diagonals_t.size(0) / 2, column_diagonals_t.size(0) / 2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrast_norm_max_pool_backward", [&] {
    using T = scalar_t;
    auto* image_backward = rectify ? &normalize_and_pool_backward_image<T, true>
                                   : &normalize_and_pool_backward_image<T, false>;
    const int64_t pixels = h * w, outputs = g.size(2) * g.size(3);
    over_images(n_images, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        T* s = stats.data_ptr<T>() + n * 5 * pixels;
        const PixelStatistics<T> image_stats{s, s + pixels, s + 2 * pixels, s + 3 * pixels,
                                             s + 4 * pixels};
        const int64_t o = n * maps * outputs;
        image_backward(g.data_ptr<T>() + o, at_index.data_ptr<int64_t>() + o,
                       x.data_ptr<T>() + n * maps * pixels,
                       out.data_ptr<T>() + n * maps * pixels, maps, outputs, window,
                       row_diagonals_t.data_ptr<T>(), column_diagonals_t.data_ptr<T>(),
                       image_stats, mean_sigma.data_ptr<T>()[n], mean_threshold, threshold,
                       floor);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(cnnkit_native, m) {
  m.def(
      "contrast_norm_forward(Tensor x, Tensor row_diagonals, Tensor column_diagonals, "
      "Tensor mass, bool rectify, bool mean_threshold, float threshold, float floor) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.impl("contrast_norm_forward", c10::DispatchKey::CPU, &contrast_norm_forward);
  m.def(
      "contrast_norm_backward(Tensor grad, Tensor x, Tensor y, Tensor den, Tensor variance, "
      "Tensor sigma, Tensor mean_sigma, Tensor row_diagonals_t, Tensor column_diagonals_t, "
      "bool rectify, bool mean_threshold, float threshold, float floor) -> Tensor");
  m.impl("contrast_norm_backward", c10::DispatchKey::CPU, &contrast_norm_backward);
  m.def(
      "contrast_norm_max_pool_forward(Tensor x, Tensor row_diagonals, "
      "Tensor column_diagonals, Tensor mass, bool rectify, bool mean_threshold, "
      "float threshold, float floor, int kh, int kw, int sh, int sw, bool with_sums) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.impl("contrast_norm_max_pool_forward", c10::DispatchKey::CPU,
         &contrast_norm_max_pool_forward);
  m.def(
      "contrast_norm_max_pool_backward(Tensor grad, Tensor index, Tensor x, "
      "Tensor stats, Tensor mean_sigma, Tensor row_diagonals_t, Tensor column_diagonals_t, "
      "bool rectify, bool mean_threshold, float threshold, float floor) -> Tensor");
  m.impl("contrast_norm_max_pool_backward", c10::DispatchKey::CPU,
         &contrast_norm_max_pool_backward);
}
