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

#include <tuple>
#include <vector>

#include "contrast_norm.h"

namespace {

using namespace cnnkit_norm;

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrast_norm_forward(
    const at::Tensor& x, const at::Tensor& row_diagonals, const at::Tensor& column_diagonals,
    const at::Tensor& mass, bool rectify, bool mean_threshold, double threshold, double floor) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be (N, C, H, W) on the CPU");
  const bool channels_last = channels_last_layout(x);
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
  const bool channels_last = channels_last_layout(x);
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
}
