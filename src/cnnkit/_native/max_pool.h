// Max pooling of one (H, W) map with the position of each window's maximum: the
// pieces that max_pool.cpp and contrast_norm.cpp (which pools the maps it normalizes,
// without writing them out) share. The rules are max_pool.cpp's.

#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace cnnkit_pooling {

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

// h_out rounded up to whole 64-byte vectors of T.
template <typename T>
constexpr int64_t padded_height(int64_t h_out) {
  constexpr int64_t lanes = 64 / sizeof(T);
  return (h_out + lanes - 1) / lanes * lanes;
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
  // Transposed columns are padded to whole vectors (the padding is never read back), so
  // that the loops along them have no scalar remainder.
  const int64_t column = padded_height<T>(h_out);
  for (int64_t a = 0; a < h_out; ++a) {
    for (int64_t c = 0; c < w; ++c) {
      s.across[c * column + a] = s.best[a * w + c];
      s.flat[c * column + a] = static_cast<Row<T>>(s.rows[a * w + c] * w + c);
    }
  }
  T* value = s.best.data();  // reused: (column,) per output column
  Row<T>* at = s.rows.data();
  for (int64_t b = 0; b < w_out; ++b) {
    const int64_t left = b * sw;
    std::copy_n(s.across.data() + left * column, column, value);
    std::copy_n(s.flat.data() + left * column, column, at);
    for (int64_t c = left + 1; c < left + kw; ++c) {
      const T* candidates = s.across.data() + c * column;
      const Row<T>* flat = s.flat.data() + c * column;
#pragma omp simd
      for (int64_t a = 0; a < column; ++a) {
        // Columns come left to right but their rows in any order: compare positions.
        const T candidate = candidates[a];
        const bool nan = candidate != candidate;
        const bool take = candidate > value[a] ||
                          (nan && (value[a] == value[a] || flat[a] > at[a])) ||
                          (candidate == value[a] && flat[a] < at[a]);
        value[a] = take ? candidate : value[a];
        at[a] = take ? flat[a] : at[a];
      }
    }
    for (int64_t a = 0; a < h_out; ++a) {
      out[a * w_out + b] = value[a];
      index[a * w_out + b] = at[a];
    }
  }
}

// Scratch space for pool_map on (h, w) maps with an (kh, kw) window at stride (sh, sw).
template <typename T>
Scratch<T> make_scratch(int64_t w, int64_t kh, int64_t sh, int64_t h_out) {
  Scratch<T> s;
  const int64_t block_count = sh > 1 && kh % sh == 0 ? h_out + kh / sh - 1 : 0;
  s.blocks.resize(block_count * w);
  s.block_rows.resize(block_count * w);
  const int64_t transposed = padded_height<T>(h_out) * w;
  s.best.resize(std::max(h_out * w, transposed));
  s.rows.resize(std::max(h_out * w, transposed));
  s.across.resize(transposed);
  s.flat.resize(transposed);
  return s;
}

}  // namespace cnnkit_pooling
