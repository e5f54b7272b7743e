// A connection-table filter bank on small maps -- the lecture's second, 64 -> 256 maps of
// 6x6 from 14x14 with 9x9 kernels, each output map summing 16 of the inputs -- with the
// images interleaved in the vector lanes: one vector holds the same pixel of L images.
//
// With the maps of a block of L images laid out as (C, H, W, L), every multiply-add of
// the bank is one kernel value (a scalar, broadcast) times one vector of L images'
// inputs, whatever the table: no output map shares its inputs with another, so vectors
// along the maps would each need inputs of their own, but the L images of a lane block
// share every kernel. For table row r = (input i, output o) with kernel k_r:
//
//   out[o, y, x, l] = bias[o] + sum_{r -> o} sum_{u, v} k_r[u, v] in[i, y + u, x + v, l]
//   d_in[i, y, x, l] = sum_{r from i} sum_{u, v} k_r[u, v] g[o, y - u, x - v, l]
//   d_k_r[u, v] = sum_{blocks, l, y, x} g[o, y, x, l] in[i, y + u, x + v, l]
//
// (g taken as zero outside its maps). Each kernel is compiled for its width (up to
// kMaxWidth), so that every input a block of outputs reads is loaded once per kernel row
// and multiplied by each of that row's values that meets it, from registers:
// - forward: R output rows by kPixels pixels of one map in registers, over its table
//   rows' taps; maps are read and written in whole blocks of pixels (zeros past their
//   width);
// - input's gradient: R rows of one input map, a window of kw pixels of them in
//   registers sliding along g's pixels (each of g's pixels reaches kw of them), over the
//   table rows from that map; only the taps whose rows of g lie inside it are taken;
// - kernels' gradient: U kernel rows of one table row in registers, summed over the
//   blocks, their pixels and, at the end, their lanes.
// Threads take (lane block, map) pairs, and table rows for the kernels' gradient.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vectors.h"

namespace {

using cnnkit_vectors::kLanes;
using cnnkit_vectors::kRegisters;
using cnnkit_vectors::load;
using cnnkit_vectors::store;
using cnnkit_vectors::Values;
using cnnkit_vectors::with_constant;

// Register blocks, as many sums as leave registers for the operands: R rows by kPixels
// pixels of one output map, with one kernel row (kw values) beside them, for the forward;
// rows of the input's gradient (at most kGradientRows, and at most kSums sums, kw per
// row) for its gradient; kernel rows (kw sums each) beside kPixels gradient values for
// the kernels' gradient.
constexpr int kPixels = kRegisters >= 32 ? 6 : 4;
constexpr int kGradientRows = kRegisters >= 32 ? 2 : 1;
constexpr int kSums = kRegisters >= 32 ? 20 : 12;
template <int KW>
constexpr int kOutputRows = std::max(1, std::min(3, (kRegisters - 2 - KW) / kPixels));
template <int KW>
constexpr int kKernelRows = std::max(1, std::min(2, (kRegisters - 2 - kPixels) / KW));
// The widest kernels the kernels are compiled for (one version per width).
constexpr int kMaxWidth = 16;

// Maps are read and written in whole blocks of kPixels pixels, so the interleaved maps
// of a call are this wide (zeros past their own width): output rows rounded up to whole
// blocks, and the inputs those read.
int64_t padded_output_width(int64_t w_out) {
  return (w_out + kPixels - 1) / kPixels * kPixels;
}

// The table's rows grouped by one of its columns: rows[starts[m] .. starts[m + 1]) are
// those of map m, and other[j] is the map in the other column of rows[j].
struct Grouped {
  std::vector<int64_t> starts, rows, other;
};

Grouped group_rows(const at::Tensor& table, int64_t by, int64_t maps) {
  const at::Tensor t = table.to(at::kLong).contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t k = t.size(0);
  Grouped g{std::vector<int64_t>(maps + 1, 0), std::vector<int64_t>(k), std::vector<int64_t>(k)};
  for (int64_t r = 0; r < k; ++r) {
    const int64_t m = tp[2 * r + by];
    TORCH_CHECK(m >= 0 && m < maps, "table row ", r, " names map ", m, " outside 0 .. ",
                maps - 1);
    ++g.starts[m + 1];
  }
  for (int64_t m = 0; m < maps; ++m) g.starts[m + 1] += g.starts[m];
  std::vector<int64_t> next(g.starts.begin(), g.starts.end() - 1);
  for (int64_t r = 0; r < k; ++r) {
    const int64_t j = next[tp[2 * r + by]]++;
    g.rows[j] = r;
    g.other[j] = tp[2 * r + 1 - by];
  }
  return g;
}

// out[y0 + r, :] for R rows (of L lanes) of one output map: `start` plus the
// correlations of the maps of its table rows [first, last) (`maps`: the lane block's
// (C, h, w, L) inputs) with their kernels, kPixels at a time. Each input of a row is
// loaded once and multiplied by every kernel value of the kernel row that reaches an
// output of the block from it, all kept in registers.
template <typename T, int KW, int R>
void correlate_rows(const T* maps, int64_t h, int64_t w, const T* kernels, int64_t kh,
                    const Grouped& group, int64_t first, int64_t last, int64_t y0, T start,
                    T* out, int64_t w_out) {
  using V = Values<T>;
  constexpr int64_t L = kLanes<T>;
  constexpr int X = kPixels;
  const int64_t stride = w * L;
  for (int64_t x0 = 0; x0 < w_out; x0 += X) {
    V sums[R][X];
    for (int r = 0; r < R; ++r) {
      for (int p = 0; p < X; ++p) sums[r][p] = V{} + start;
    }
    for (int64_t j = first; j < last; ++j) {
      const T* corner = maps + ((group.other[j] * h + y0) * w + x0) * L;
      const T* kernel = kernels + group.rows[j] * kh * KW;
      for (int64_t u = 0; u < kh; ++u) {
        V taps[KW];
#pragma GCC unroll 16
        for (int v = 0; v < KW; ++v) taps[v] = V{} + kernel[u * KW + v];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const T* row = corner + (u + r) * stride;
#pragma GCC unroll 32
          for (int q = 0; q < X + KW - 1; ++q) {
            const V input = load<V>(row + q * L);
#pragma GCC unroll 16
            for (int p = std::max(0, q - KW + 1); p <= std::min(X - 1, q); ++p) {
              sums[r][p] += taps[q - p] * input;
            }
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int p = 0; p < X; ++p) store(out + ((y0 + r) * w_out + x0 + p) * L, sums[r][p]);
    }
  }
}

// d_in[y0 + r, :] for R rows (of L lanes) of one input map: the sum over its table rows
// [first, last) (to output map other[j], kernel rows[j]) and over the taps (u, v) of
// k[u, v] g[y0 + r - u, p - v], taken pixel by pixel q of g, which reaches d_in pixels
// q .. q + KW - 1. Those are the window of sums in registers; after pixel q the first has
// had all it gets, is written out, and the window moves on by one. `g` is a lane block's
// (O, h_out, w_out, L) gradient with `margin` rows of zeros above and below each map,
// which a block's rows past the edge of the map read.
template <typename T, int KW, int R>
void input_grad_rows(const T* g, int64_t h_out, int64_t w_out, int64_t margin,
                     const T* kernels, int64_t kh, const Grouped& group, int64_t first,
                     int64_t last, int64_t y0, T* out, int64_t w) {
  using V = Values<T>;
  constexpr int64_t L = kLanes<T>;
  const int64_t stride = w_out * L, map_size = (h_out + 2 * margin) * stride;
  // the taps u for which some row y0 + r - u (r < R) lies in the map
  const int64_t u_lo = std::max<int64_t>(0, y0 - h_out + 1);
  const int64_t u_hi = std::min<int64_t>(kh, y0 + R);
  V sums[R][KW] = {};
  for (int64_t q = 0; q < w; ++q) {
    if (q < w_out) {
      for (int64_t j = first; j < last; ++j) {
        const T* column = g + group.other[j] * map_size + ((y0 + margin) * w_out + q) * L;
        const T* kernel = kernels + group.rows[j] * kh * KW;
        for (int64_t u = u_lo; u < u_hi; ++u) {
          V gradient[R];
          for (int r = 0; r < R; ++r) gradient[r] = load<V>(column + (r - u) * stride);
          const T* taps = kernel + u * KW;
          for (int v = 0; v < KW; ++v) {
            const T value = taps[v];
            for (int r = 0; r < R; ++r) sums[r][v] += value * gradient[r];
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      store(out + ((y0 + r) * w + q) * L, sums[r][0]);
      for (int v = 0; v + 1 < KW; ++v) sums[r][v] = sums[r][v + 1];
      sums[r][KW - 1] = V{};
    }
  }
}

// d_k[u0 + a, :] for U kernel rows of one table row: the sums over the lane blocks
// (`x`, `g`: its input and gradient maps in the first, each block `*_stride` further),
// their lanes and the gradient's pixels of g[y, p] x[y + u, p + v], kPixels gradient
// values at a time, each input of a row loaded once for every kernel value it meets.
template <typename T, int KW, int U>
void kernel_rows(const T* x, const T* g, int64_t blocks, int64_t x_stride,
                 int64_t g_stride, int64_t w, int64_t h_out, int64_t w_out, int64_t u0,
                 T* d_k) {
  using V = Values<T>;
  constexpr int64_t L = kLanes<T>;
  constexpr int X = kPixels;
  V sums[U][KW] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t y = 0; y < h_out; ++y) {
      for (int64_t x0 = 0; x0 < w_out; x0 += X) {
        V gradient[X];
        for (int p = 0; p < X; ++p) gradient[p] = load<V>(g + b * g_stride + (y * w_out + x0 + p) * L);
#pragma GCC unroll 4
        for (int a = 0; a < U; ++a) {
          const T* row = x + b * x_stride + ((y + u0 + a) * w + x0) * L;
#pragma GCC unroll 32
          for (int q = 0; q < X + KW - 1; ++q) {
            const V input = load<V>(row + q * L);
#pragma GCC unroll 16
            for (int p = std::max(0, q - KW + 1); p <= std::min(X - 1, q); ++p) {
              sums[a][q - p] += gradient[p] * input;
            }
          }
        }
      }
    }
  }
  for (int a = 0; a < U; ++a) {
    for (int v = 0; v < KW; ++v) {
      T total = 0;
      for (int64_t l = 0; l < L; ++l) total += sums[a][v][l];
      d_k[(u0 + a) * KW + v] = total;
    }
  }
}

// (N, C, H, W) -> (B, C, H, width, L), width >= W: blocks of L images, with zeros for
// the images past N in the last block and for the pixels past W.
at::Tensor interleave(const at::Tensor& x, int64_t lanes, int64_t width) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t full = n / lanes, blocks = (n + lanes - 1) / lanes;
  if (full == blocks && width == w) {
    return x.view({blocks, lanes, c, h, w}).permute({0, 2, 3, 4, 1}).contiguous();
  }
  at::Tensor out = at::zeros({blocks, c, h, width, lanes}, x.options());
  if (full > 0) {
    out.narrow(0, 0, full).narrow(3, 0, w).copy_(
        x.narrow(0, 0, full * lanes).view({full, lanes, c, h, w}).permute({0, 2, 3, 4, 1}));
  }
  if (full < blocks) {
    out.select(0, full).narrow(2, 0, w).narrow(3, 0, n - full * lanes).copy_(
        x.narrow(0, full * lanes, n - full * lanes).permute({1, 2, 3, 0}));
  }
  return out;
}

// (B, C, H, width, L) -> the first n images and w pixels as (n, C, H, w).
at::Tensor deinterleave(const at::Tensor& y, int64_t n, int64_t w) {
  const int64_t blocks = y.size(0), lanes = y.size(4);
  return y.narrow(3, 0, w)
      .permute({0, 4, 1, 2, 3})
      .contiguous()
      .view({blocks * lanes, y.size(1), y.size(2), w})
      .narrow(0, 0, n);
}

// Every row of the (K, 2) table names an input map below in_maps and an output map below
// out_maps, and there is one kernel per row.
void check_table(const at::Tensor& table, int64_t rows, int64_t in_maps, int64_t out_maps) {
  TORCH_CHECK(table.dim() == 2 && table.size(0) == rows && table.size(1) == 2,
              "table must be (K, 2) with K = ", rows, " (one row per kernel), got sizes ",
              table.sizes());
  const at::Tensor t = table.to(at::kLong).contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(tp[2 * r] >= 0 && tp[2 * r] < in_maps && tp[2 * r + 1] >= 0 &&
                    tp[2 * r + 1] < out_maps,
                "table row ", r, " = (", tp[2 * r], ", ", tp[2 * r + 1],
                ") names maps outside the ", in_maps, " input and ", out_maps, " output maps");
  }
}

void check_kernels(int64_t kh, int64_t kw, int64_t h, int64_t w) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= h && kw <= w && kw <= kMaxWidth, "kernels of ", kh,
              "x", kw, " must fit in maps of ", h, "x", w, " and be at most ", kMaxWidth,
              " wide (the widths the kernels are compiled for)");
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& table,
                  int64_t out_maps) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(),
              "x must be (N, C, H, W) on the CPU, got sizes ", x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == x.scalar_type(),
              "weight must be (K, kh, kw) with the dtype of x, got sizes ", weight.sizes());
  check_kernels(weight.size(1), weight.size(2), x.size(2), x.size(3));
  check_table(table, weight.size(0), x.size(1), out_maps);
}

at::Tensor interleaved_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& table, int64_t out_maps) {
  check_inputs(x, weight, table, out_maps);
  const int64_t n = x.size(0), h = x.size(2), kh = weight.size(1), kw = weight.size(2),
                h_out = h - kh + 1, w_out = x.size(3) - kw + 1;
  const int64_t wide_out = padded_output_width(w_out), w = wide_out + kw - 1;
  const Grouped by_output = group_rows(table, 1, out_maps);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == out_maps && b.scalar_type() == x.scalar_type()),
              "bias must be (", out_maps, ",) with the dtype of x");
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "interleaved_conv2d_forward", [&] {
    using T = scalar_t;
    constexpr int64_t L = kLanes<T>;
    const at::Tensor in = interleave(x, L, w);
    const int64_t blocks = in.size(0);
    at::Tensor out = at::empty({blocks, out_maps, h_out, wide_out, L}, x.options());
    const at::Tensor k = weight.contiguous();
    const T* ip = in.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    at::parallel_for(0, blocks * out_maps, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t block = task / out_maps, o = task % out_maps;
        const int64_t first = by_output.starts[o], last = by_output.starts[o + 1];
        const T start = bp != nullptr ? bp[o] : T(0);
        with_constant<kMaxWidth>(kw, [&](auto width) {
          constexpr int KW = decltype(width)::value;
          constexpr int rows = kOutputRows<KW>;
          for (int64_t y0 = 0; y0 < h_out; y0 += rows) {
            with_constant<rows>(std::min<int64_t>(rows, h_out - y0), [&](auto r) {
              correlate_rows<T, KW, decltype(r)::value>(
                  ip + block * in.stride(0), h, w, kp, kh, by_output, first, last, y0, start,
                  op + task * h_out * wide_out * L, wide_out);
            });
          }
        });
      }
    });
    y = deinterleave(out, n, w_out);
  });
  return y;
}

at::Tensor interleaved_conv2d_input_grad(const at::Tensor& grad, const at::Tensor& weight,
                                         const at::Tensor& table, int64_t in_maps, int64_t h,
                                         int64_t w) {
  TORCH_CHECK(grad.dim() == 4 && grad.device().is_cpu(),
              "grad must be (N, O, H_out, W_out) on the CPU, got sizes ", grad.sizes());
  const int64_t n = grad.size(0), out_maps = grad.size(1), h_out = grad.size(2),
                w_out = grad.size(3);
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == grad.scalar_type() &&
                  weight.size(1) == h - h_out + 1 && weight.size(2) == w - w_out + 1,
              "weight must be (K, ", h - h_out + 1, ", ", w - w_out + 1,
              ") with the dtype of grad, got sizes ", weight.sizes());
  const int64_t kh = weight.size(1), kw = weight.size(2);
  check_kernels(kh, kw, h, w);
  check_table(table, weight.size(0), in_maps, out_maps);
  const Grouped by_input = group_rows(table, 0, in_maps);
  at::Tensor d_x;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "interleaved_conv2d_input_grad", [&] {
    using T = scalar_t;
    constexpr int64_t L = kLanes<T>;
    const at::Tensor packed = interleave(grad, L, w_out);
    const int64_t blocks = packed.size(0), margin = kGradientRows - 1;
    at::Tensor g = at::zeros({blocks, out_maps, h_out + 2 * margin, w_out, L}, grad.options());
    g.narrow(2, margin, h_out).copy_(packed);
    const at::Tensor k = weight.contiguous();
    at::Tensor out = at::empty({blocks, in_maps, h, w, L}, grad.options());
    const T* kp = k.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, blocks * in_maps, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t block = task / in_maps, i = task % in_maps;
        const int64_t first = by_input.starts[i], last = by_input.starts[i + 1];
        with_constant<kMaxWidth>(kw, [&](auto width) {
          constexpr int KW = decltype(width)::value;
          constexpr int rows = std::max(1, std::min(kGradientRows, kSums / KW));
          for (int64_t y0 = 0; y0 < h; y0 += rows) {
            with_constant<rows>(std::min<int64_t>(rows, h - y0), [&](auto r) {
              input_grad_rows<T, KW, decltype(r)::value>(
                  gp + block * g.stride(0), h_out, w_out, margin, kp, kh, by_input, first,
                  last, y0, op + task * h * w * L, w);
            });
          }
        });
      }
    });
    d_x = deinterleave(out, n, w);
  });
  return d_x;
}

at::Tensor interleaved_conv2d_weight_grad(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& table, int64_t kh, int64_t kw) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(),
              "x must be (N, C, H, W) on the CPU, got sizes ", x.sizes());
  const int64_t c = x.size(1), h = x.size(2), h_out = h - kh + 1, w_out = x.size(3) - kw + 1;
  check_kernels(kh, kw, h, x.size(3));
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(2) == h_out &&
                  grad.size(3) == w_out && grad.scalar_type() == x.scalar_type(),
              "grad must be (", x.size(0), ", O, ", h_out, ", ", w_out,
              ") with the dtype of x, got sizes ", grad.sizes());
  const int64_t out_maps = grad.size(1), rows = table.dim() > 0 ? table.size(0) : 0;
  check_table(table, rows, c, out_maps);
  const int64_t wide_out = padded_output_width(w_out), w = wide_out + kw - 1;
  const at::Tensor t = table.to(at::kLong).contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  at::Tensor d_k = at::empty({rows, kh, kw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "interleaved_conv2d_weight_grad", [&] {
    using T = scalar_t;
    constexpr int64_t L = kLanes<T>;
    const at::Tensor in = interleave(x, L, w), g = interleave(grad, L, wide_out);
    const int64_t blocks = in.size(0);
    const T* xp = in.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    T* dp = d_k.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xp + tp[2 * r] * h * w * L;
        const T* gr = gp + tp[2 * r + 1] * h_out * wide_out * L;
        with_constant<kMaxWidth>(kw, [&](auto width) {
          constexpr int KW = decltype(width)::value;
          constexpr int per_call = kKernelRows<KW>;
          for (int64_t u0 = 0; u0 < kh; u0 += per_call) {
            with_constant<per_call>(std::min<int64_t>(per_call, kh - u0), [&](auto a) {
              kernel_rows<T, KW, decltype(a)::value>(xr, gr, blocks, in.stride(0), g.stride(0),
                                                    w, h_out, wide_out, u0, dp + r * kh * kw);
            });
          }
        });
      }
    });
  });
  return d_k;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cnnkit_native, m) {
  m.def(
      "interleaved_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor table, "
      "int out_maps) -> Tensor");
  m.impl("interleaved_conv2d_forward", c10::DispatchKey::CPU, &interleaved_conv2d_forward);
  m.def(
      "interleaved_conv2d_input_grad(Tensor grad, Tensor weight, Tensor table, int in_maps, "
      "int h, int w) -> Tensor");
  m.impl("interleaved_conv2d_input_grad", c10::DispatchKey::CPU,
         &interleaved_conv2d_input_grad);
  m.def(
      "interleaved_conv2d_weight_grad(Tensor grad, Tensor x, Tensor table, int kh, int kw) -> "
      "Tensor");
  m.impl("interleaved_conv2d_weight_grad", c10::DispatchKey::CPU,
         &interleaved_conv2d_weight_grad);
}
