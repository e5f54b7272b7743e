// Max pooling of (N, C, H, W) maps with the position of each window's maximum, and the
// gradient it sends back: the values and indices of F.max_pool2d(return_indices=True).
//
// Each map is pooled in two passes. For output row a, the vertical pass takes, per
// column c, the largest of rows a s_h .. a s_h + k_h - 1 and the first row holding it
// (a loop along whole rows that vectorizes); the horizontal pass takes, per output
// column b, the largest of those over columns b s_w .. b s_w + k_w - 1. Among equal
// values it keeps the smallest flat index r W + c: the first maximal element of the
// window in row-major order, as the library's kernel does. A NaN in a window wins: the
// value is NaN and the index that of its last NaN in row-major order, again as the
// library's kernel (which takes a value when it is larger or NaN) gives it.
//
// The backward adds each window's gradient at its index of a zero (H, W) map.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Whether a value seen later in row-major order replaces the best so far.
template <typename T>
inline bool beats(T value, T best) {
  return value > best || value != value;
}

// Row numbers kept as wide as T, so that a vector of values and one of rows have as
// many lanes.
template <typename T>
using Row = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// best[c], row[c] <- values[c], row_of(c) wherever values[c] beats best[c]: one more row
// (or block of rows), later in row-major order, merged into the maxima so far.
template <typename T, typename RowOf>
inline void keep_larger(T* __restrict best, Row<T>* __restrict row,
                        const T* __restrict values, RowOf row_of, int64_t w) {
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) {
    const bool take = beats(values[c], best[c]);
    best[c] = take ? values[c] : best[c];
    row[c] = take ? row_of(c) : row[c];
  }
}

// Per column c, the largest of rows top .. top + count - 1 and the first row holding it.
template <typename T>
void column_max(const T* __restrict x, int64_t w, int64_t top, int64_t count,
                T* __restrict best, Row<T>* __restrict row) {
  std::copy_n(x + top * w, w, best);
  std::fill_n(row, w, static_cast<Row<T>>(top));
  for (int64_t r = top + 1; r < top + count; ++r) {
    const Row<T> here = static_cast<Row<T>>(r);
    keep_larger(best, row, x + r * w, [here](int64_t) { return here; }, w);
  }
}

// Scratch space for one map: the vertical pass's maxima and rows for every output row,
// and the same transposed (columns first) with flat indices, for the horizontal pass.
template <typename T>
struct Scratch {
  std::vector<T> blocks, best, across;
  std::vector<Row<T>> block_rows, rows, flat;
};

// When the window is a whole number of strides (the lecture's 10x10 at stride 5), the
// vertical pass takes each s_h-row block's maximum once and an output row merges its
// k_h / s_h blocks, instead of reading k_h rows per output row. The horizontal pass
// runs on the transposed maxima, so that it too is a loop along whole rows.
template <typename T>
void pool_map(const T* __restrict x, T* __restrict out, int64_t* __restrict index, int64_t h,
              int64_t w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t h_out,
              int64_t w_out, Scratch<T>& s) {
  const bool tiled = sh > 1 && kh % sh == 0;
  const int64_t per_window = tiled ? kh / sh : 1;
  if (tiled) {
    for (int64_t j = 0; j < h_out + per_window - 1; ++j)
      column_max(x, w, j * sh, sh, s.blocks.data() + j * w, s.block_rows.data() + j * w);
  }
  for (int64_t a = 0; a < h_out; ++a) {
    T* best = s.best.data() + a * w;
    Row<T>* row = s.rows.data() + a * w;
    if (!tiled) {
      column_max(x, w, a * sh, kh, best, row);
      continue;
    }
    std::copy_n(s.blocks.data() + a * w, w, best);
    std::copy_n(s.block_rows.data() + a * w, w, row);
    for (int64_t j = a + 1; j < a + per_window; ++j) {
      const Row<T>* block_row = s.block_rows.data() + j * w;
      const auto row_of = [block_row](int64_t c) { return block_row[c]; };
      keep_larger(best, row, s.blocks.data() + j * w, row_of, w);
    }
  }
  for (int64_t a = 0; a < h_out; ++a) {
    for (int64_t c = 0; c < w; ++c) {
      s.across[c * h_out + a] = s.best[a * w + c];
      s.flat[c * h_out + a] = static_cast<Row<T>>(s.rows[a * w + c] * w + c);
    }
  }
  T* value = s.best.data();  // reused: (h_out,) per output column
  Row<T>* at = s.rows.data();
  for (int64_t b = 0; b < w_out; ++b) {
    const int64_t left = b * sw;
    std::copy_n(s.across.data() + left * h_out, h_out, value);
    std::copy_n(s.flat.data() + left * h_out, h_out, at);
    for (int64_t c = left + 1; c < left + kw; ++c) {
      const T* column = s.across.data() + c * h_out;
      const Row<T>* flat = s.flat.data() + c * h_out;
#pragma omp simd
      for (int64_t a = 0; a < h_out; ++a) {
        // Columns come left to right but their rows in any order: compare positions.
        const bool nan = column[a] != column[a];
        const bool take = column[a] > value[a] ||
                          (nan && (value[a] == value[a] || flat[a] > at[a])) ||
                          (column[a] == value[a] && flat[a] < at[a]);
        value[a] = take ? column[a] : value[a];
        at[a] = take ? flat[a] : at[a];
      }
    }
    for (int64_t a = 0; a < h_out; ++a) {
      out[a * w_out + b] = value[a];
      index[a * w_out + b] = at[a];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool_forward(const at::Tensor& x, int64_t kh,
                                                    int64_t kw, int64_t sh, int64_t sw) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "x must be contiguous (N, C, H, W) on the CPU");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h * w <= std::numeric_limits<int32_t>::max(),
              "maps of more than 2^31 - 1 values are not supported");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && kh <= h && kw <= w,
              "the window must fit in the map and the stride be positive");
  const int64_t h_out = (h - kh) / sh + 1, w_out = (w - kw) / sw + 1;
  at::Tensor out = at::empty({n, c, h_out, w_out}, x.options());
  at::Tensor index = at::empty({n, c, h_out, w_out}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool_forward", [&] {
    using T = scalar_t;
    const T* source = x.data_ptr<T>();
    T* target = out.data_ptr<T>();
    int64_t* indices = index.data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (h * w));
    at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
      Scratch<T> scratch;
      const int64_t block_count = sh > 1 && kh % sh == 0 ? h_out + kh / sh - 1 : 0;
      scratch.blocks.resize(block_count * w);
      scratch.block_rows.resize(block_count * w);
      scratch.best.resize(h_out * w);
      scratch.rows.resize(h_out * w);
      scratch.across.resize(h_out * w);
      scratch.flat.resize(h_out * w);
      for (int64_t m = begin; m < end; ++m) {
        pool_map(source + m * h * w, target + m * h_out * w_out, indices + m * h_out * w_out,
                 h, w, kh, kw, sh, sw, h_out, w_out, scratch);
      }
    });
  });
  return {out, index};
}

at::Tensor max_pool_backward(const at::Tensor& grad, const at::Tensor& index, int64_t h,
                             int64_t w) {
  TORCH_CHECK(grad.dim() == 4 && grad.device().is_cpu(), "grad must be (N, C, H_out, W_out)");
  TORCH_CHECK(index.sizes() == grad.sizes() && index.scalar_type() == at::kLong,
              "index must be int64 with the shape of grad");
  TORCH_CHECK(h >= 1 && w >= 1, "the maps must not be empty");
  const at::Tensor g = grad.contiguous();
  const at::Tensor at_index = index.contiguous();
  const int64_t n = g.size(0), c = g.size(1), outputs = g.size(2) * g.size(3);
  at::Tensor grad_x = at::empty({n, c, h, w}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "max_pool_backward", [&] {
    using T = scalar_t;
    const T* gs = g.data_ptr<T>();
    const int64_t* indices = at_index.data_ptr<int64_t>();
    T* target = grad_x.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (h * w));
    at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        T* map = target + m * h * w;
        std::fill(map, map + h * w, T(0));
        const T* gm = gs + m * outputs;
        const int64_t* im = indices + m * outputs;
        for (int64_t j = 0; j < outputs; ++j) map[im[j]] += gm[j];
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cnnkit_native, m) {
  m.def("max_pool_forward(Tensor x, int kh, int kw, int sh, int sw) -> (Tensor, Tensor)");
  m.impl("max_pool_forward", c10::DispatchKey::CPU, &max_pool_forward);
  m.def("max_pool_backward(Tensor grad, Tensor index, int h, int w) -> Tensor");
  m.impl("max_pool_backward", c10::DispatchKey::CPU, &max_pool_backward);
}
