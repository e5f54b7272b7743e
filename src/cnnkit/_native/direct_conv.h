// The direct correlation's forward (one image's output row at a time, channels-last) and
// its kernels' gradient (one strip of an image's gradient rows at a time), shared by
// direct_conv.cpp, which has the whole story, and the first stage fused with its filter
// bank (norm_pool.cpp).

#pragma once

#include <algorithm>
#include <cstdint>

#include "vectors.h"

namespace cnnkit_direct {

using cnnkit_vectors::fresh;
using cnnkit_vectors::kLanes;
using cnnkit_vectors::kRegisters;
using cnnkit_vectors::load;
using cnnkit_vectors::store;
using cnnkit_vectors::Values;
using cnnkit_vectors::with_constant;

// Register blocks: pixels by output vectors in the forward; taps by output vectors in the
// kernels' gradient. Both leave a few registers for the operands.
constexpr int kPixels = 6;
constexpr int kOutputVectors = kRegisters >= 32 ? 4 : 2;
constexpr int kTaps = kRegisters >= 32 ? 9 : 5;
constexpr int kGradientVectors = 2;
// Gradient rows summed per block of taps: enough that loading and storing the block's
// sums costs little beside them, few enough to stay in the second-level cache (4 rows of
// the lecture's 75x64 outputs: 77 KB).
constexpr int64_t kStripRows = 4;

struct Sizes {
  int64_t maps, h, w, kh, kw, outputs;  // of x (one image) and of the kernels
  int64_t h_out() const { return h - kh + 1; }
  int64_t w_out() const { return w - kw + 1; }
};

// out[r, o0 + l] for the R pixels from `x` (the first pixel's top-left input) and the
// B * L outputs from o0.
template <typename T, int R, int B>
inline void output_block(const T* __restrict x, const T* __restrict taps,
                         const T* __restrict bias, T* __restrict out, const Sizes& s,
                         int64_t o0) {
  using V = Values<T>;
  constexpr int64_t L = kLanes<T>;
  V sums[R][B];
  for (int j = 0; j < B; ++j) {
    const V start = bias != nullptr ? load<V>(bias + o0 + j * L) : V{};
    for (int r = 0; r < R; ++r) sums[r][j] = start;
  }
  for (int64_t c = 0; c < s.maps; ++c) {
    for (int64_t u = 0; u < s.kh; ++u) {
      const T* __restrict row = x + (c * s.h + u) * s.w;
      const T* __restrict tap = taps + (c * s.kh + u) * s.kw * s.outputs + o0;
      for (int64_t v = 0; v < s.kw; ++v, tap += s.outputs) {
        V kernel[B];
        for (int j = 0; j < B; ++j) kernel[j] = load<V>(tap + j * L);
        const T* __restrict inputs = fresh(row + v);
        for (int r = 0; r < R; ++r) {
          const T value = inputs[r];
          for (int j = 0; j < B; ++j) sums[r][j] += value * kernel[j];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < B; ++j) store(out + r * s.outputs + o0 + j * L, sums[r][j]);
  }
}

// Every output of R pixels, B vectors at a time and then the vectors left.
template <typename T, int R>
void pixel_block(const T* x, const T* taps, const T* bias, T* out, const Sizes& s) {
  constexpr int64_t L = kLanes<T>;
  int64_t o0 = 0;
  for (; o0 + kOutputVectors * L <= s.outputs; o0 += kOutputVectors * L) {
    output_block<T, R, kOutputVectors>(x, taps, bias, out, s, o0);
  }
  with_constant<kOutputVectors - 1>((s.outputs - o0) / L, [&](auto b) {
    output_block<T, R, decltype(b)::value>(x, taps, bias, out, s, o0);
  });
}

// Output row y of one image: x the image's (C, H, W) maps, out its (H_out, W_out, O)
// output.
template <typename T>
void output_row(const T* x, const T* taps, const T* bias, T* out, const Sizes& s, int64_t y) {
  const int64_t w_out = s.w_out();
  const T* xr = x + y * s.w;
  T* orow = out + y * w_out * s.outputs;
  int64_t x0 = 0;
  for (; x0 + kPixels <= w_out; x0 += kPixels) {
    pixel_block<T, kPixels>(xr + x0, taps, bias, orow + x0 * s.outputs, s);
  }
  with_constant<kPixels - 1>(w_out - x0, [&](auto r) {
    pixel_block<T, decltype(r)::value>(xr + x0, taps, bias, orow + x0 * s.outputs, s);
  });
}

// d_taps[t, o0 + l] += the sums over `rows` gradient rows (`g` at the first), for the K
// taps t from d_taps along one kernel row (`x` at the first tap's input for the first
// row) and B vectors of outputs.
template <typename T, int K, int B>
inline void tap_block(const T* __restrict x, const T* __restrict g, T* __restrict d_taps,
                      int64_t rows, const Sizes& s, int64_t o0) {
  using V = Values<T>;
  constexpr int64_t L = kLanes<T>;
  V sums[K][B];
  for (int t = 0; t < K; ++t) {
    for (int j = 0; j < B; ++j) sums[t][j] = load<V>(d_taps + t * s.outputs + o0 + j * L);
  }
  const int64_t outputs = s.outputs, w_out = s.w_out();
  for (int64_t i = 0; i < rows; ++i, x += s.w, g += w_out * outputs) {
    for (int64_t p = 0; p < w_out; ++p) {
      V gradient[B];
      for (int j = 0; j < B; ++j) gradient[j] = load<V>(g + p * outputs + o0 + j * L);
      const T* __restrict inputs = fresh(x + p);
      for (int t = 0; t < K; ++t) {
        const T value = inputs[t];
        for (int j = 0; j < B; ++j) sums[t][j] += value * gradient[j];
      }
    }
  }
  for (int t = 0; t < K; ++t) {
    for (int j = 0; j < B; ++j) store(d_taps + t * s.outputs + o0 + j * L, sums[t][j]);
  }
}

// What gradient rows y .. y + rows - 1 of one image add to d_taps, for every tap and
// output, and to d_bias (the sum of the rows, while they are in the cache).
template <typename T>
void gradient_strip(const T* x, const T* g, T* d_taps, T* d_bias, int64_t y, int64_t rows,
                    const Sizes& s) {
  using V = Values<T>;
  constexpr int64_t L = kLanes<T>;
  for (int64_t o0 = 0; o0 < s.outputs; o0 += L) {
    V sum{};
    for (int64_t p = 0; p < rows * s.w_out(); ++p) sum += load<V>(g + p * s.outputs + o0);
    store(d_bias + o0, load<V>(d_bias + o0) + sum);
  }
  for (int64_t c = 0; c < s.maps; ++c) {
    for (int64_t u = 0; u < s.kh; ++u) {
      const T* row = x + (c * s.h + y + u) * s.w;
      T* d_row = d_taps + (c * s.kh + u) * s.kw * s.outputs;
      for (int64_t o0 = 0; o0 < s.outputs; o0 += kGradientVectors * L) {
        const int64_t vectors = std::min<int64_t>(kGradientVectors, (s.outputs - o0) / L);
        for (int64_t v0 = 0; v0 < s.kw; v0 += kTaps) {
          const int64_t taps = std::min<int64_t>(kTaps, s.kw - v0);
          with_constant<kGradientVectors>(vectors, [&](auto b) {
            with_constant<kTaps>(taps, [&](auto k) {
              tap_block<T, decltype(k)::value, decltype(b)::value>(
                  row + v0, g, d_row + v0 * s.outputs, rows, s, o0);
            });
          });
        }
      }
    }
  }
}

}  // namespace cnnkit_direct
