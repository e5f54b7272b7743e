// The forward of the direct correlation (direct_conv.cpp has the whole story), shared
// with the first stage fused with its filter bank (norm_pool.cpp): one image's output
// row at a time, channels-last.

#pragma once

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

// The forward's register block: pixels by output vectors, leaving a few registers for
// the operands.
constexpr int kPixels = 6;
constexpr int kOutputVectors = kRegisters >= 32 ? 4 : 2;

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

}  // namespace cnnkit_direct
