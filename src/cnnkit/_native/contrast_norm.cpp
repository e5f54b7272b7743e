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

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

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
    for (int64_t p = begin; p < end; ++p) sums[p] = T(0);
    for (int64_t i = 0; i < image.maps; ++i) {
      const T* values = image.x + i * image.pixels;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) {
        const T a = rectified<T, Rectify>(values[p]);
        sums[p] += Centred ? (a - mean[p]) * (a - mean[p]) : a;
      }
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

template <typename T, bool Rectify, bool ChannelsLast>
void normalize_image(const Image<T>& image, const Window& window, const T* rows,
                     const T* columns, const T* mass, bool mean_threshold, double threshold,
                     double floor, T* den_out, T* variance_out, T* sigma_out,
                     T* mean_sigma_out) {
  const int64_t pixels = image.pixels, h = window.h, w = window.w;
  const T maps = static_cast<T>(image.maps);
  std::vector<T> sums(pixels), smoothed(pixels), mean(pixels), pad(w + 2 * window.r_w);
  // Split pixels across threads when this image is the only task (a nested parallel_for
  // runs inline); about 32 K values per piece.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, image.maps));

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
    sum_over_maps<T, Rectify, ChannelsLast, true>(image, mean.data(), begin, end, sums.data());
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
  T* scale = smoothed.data();  // now 1 / den
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) {
    den_out[p] = nan_max(sigma_out[p], limit);
    scale[p] = T(1) / den_out[p];
  }
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    write_output<T, Rectify, ChannelsLast>(image, mean.data(), scale, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrast_norm_forward(
    const at::Tensor& x, const at::Tensor& row_diagonals, const at::Tensor& column_diagonals,
    const at::Tensor& mass, bool rectify, bool mean_threshold, double threshold, double floor) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be (N, C, H, W) on the CPU");
  const bool channels_last =
      !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous() || channels_last, "x must be contiguous or channels-last");
  const int64_t n_images = x.size(0), maps = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(row_diagonals.dim() == 2 && row_diagonals.size(1) == h &&
                  row_diagonals.size(0) % 2 == 1 && row_diagonals.is_contiguous(),
              "row_diagonals must be (2r + 1, H)");
  TORCH_CHECK(column_diagonals.dim() == 2 && column_diagonals.size(1) == w &&
                  column_diagonals.size(0) % 2 == 1 && column_diagonals.is_contiguous(),
              "column_diagonals must be (2r + 1, W)");
  TORCH_CHECK(mass.sizes() == at::IntArrayRef({h, w}) && mass.is_contiguous(),
              "mass must be (H, W)");
  TORCH_CHECK(row_diagonals.scalar_type() == x.scalar_type() &&
                  column_diagonals.scalar_type() == x.scalar_type() &&
                  mass.scalar_type() == x.scalar_type(),
              "the window's matrices must have the dtype of x");
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
    // One image per task; with a single image the passes split its pixels instead.
    at::parallel_for(0, n_images, 1, [&](int64_t begin, int64_t end) {
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

template <typename T, bool Rectify, bool ChannelsLast>
void backward_image(const T* g, const T* y, const T* x, T* out, int64_t maps,
                    const Window& window, const T* rows_t, const T* columns_t, const T* den,
                    const T* variance, const T* sigma, T mean_sigma, bool mean_threshold,
                    double threshold, double floor) {
  const int64_t h = window.h, w = window.w, pixels = h * w;
  const T count = static_cast<T>(maps);
  std::vector<T> sums(pixels), r(pixels), k(pixels), g_var(pixels), pad(w + 2 * window.r_w);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, maps));

  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    sum_products<T, ChannelsLast, false>(g, y, maps, pixels, nullptr, nullptr, begin, end,
                                         sums.data());
  });
  const T tiny = std::numeric_limits<T>::min();
  const T c = mean_threshold ? nan_max(mean_sigma, static_cast<T>(floor)) : T(0);
  const T limit = static_cast<T>(std::max(threshold, floor));
  double g_c = 0;
#pragma omp simd reduction(+ : g_c)
  for (int64_t p = 0; p < pixels; ++p) {
    r[p] = T(1) / den[p];
    const T g_den = -(sums[p] * r[p]);
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
  smooth(g_var.data(), k.data(), rows_t, window.r_h, columns_t, window.r_w, h, w, pad);
#pragma omp simd
  for (int64_t p = 0; p < pixels; ++p) k[p] = T(2) * den[p] * k[p];

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
    at::parallel_for(0, n_images, 1, [&](int64_t begin, int64_t end) {
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
