// The pieces of local contrast normalization that contrast_norm.cpp (the normalization
// alone) and norm_pool.cpp (the normalization followed by max pooling) share: the
// per-image statistics passes, the banded smoothing, and the part of the backward that
// flows through the divisor. The formulas are in contrast_norm.cpp's notes.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace cnnkit_norm {

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

// Whether x is laid out channels-last (N, H, W, C) rather than contiguous (N, C, H, W);
// a tensor that is both counts as contiguous.
inline bool channels_last_layout(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The window's banded matrices for (h, w) maps of x's dtype; mass may be undefined.
inline void check_window_matrices(const at::Tensor& x, const at::Tensor& row_diagonals,
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

template <typename T>
inline T sign(T value) {
  return static_cast<T>((value > T(0)) - (value < T(0)));  // 0 for 0 and NaN, as torch.sgn
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

}  // namespace cnnkit_norm
