// Max pooling of one (H, W) map with the position of each window's maximum: the
// pieces that max_pool.cpp and contrast_norm.cpp (which pools the maps it normalizes,
// without writing them out) share. The rules are max_pool.cpp's.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vectors.h"

namespace cnnkit_pooling {

// Whether a value seen later in row-major order replaces the best so far.
template <typename T>
inline bool beats(T value, T best) {
  return value > best || value != value;
}

// Whether a candidate (value, flat position) replaces the best so far when candidates
// come in no particular order of positions: a larger value; an equal one at an earlier
// position; a NaN over any number, and over another NaN at an earlier position. For
// scalars or, lane by lane, for vectors of the compiler's vector extension.
template <typename V, typename P>
inline auto replaces(V candidate, V best, P position, P best_position) {
  const auto nan = candidate != candidate;
  return (candidate > best) | (nan & ((best == best) | (position > best_position))) |
         ((candidate == best) & (position < best_position));
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

using cnnkit_vectors::kLanes;
using cnnkit_vectors::load;
using cnnkit_vectors::Positions;
using cnnkit_vectors::Values;

// Calls chunk(c0) for c0 = 0, L, 2L, ... and, when L does not divide w, once more at
// w - L, a vector overlapping the one before: its columns are computed twice, to the same
// values, and no column is left to a scalar loop. Maps narrower than L take
// small(0, w) instead.
template <typename T, typename Chunk, typename Small>
inline void over_vectors(int64_t w, Chunk chunk, Small small) {
  constexpr int64_t L = kLanes<T>;
  if (w < L) {
    small(0, w);
    return;
  }
  for (int64_t c0 = 0; c0 + L <= w; c0 += L) chunk(c0);
  if (w % L != 0) chunk(w - L);
}

// Per column c, the largest of rows top .. top + count - 1 and the first row holding it.
template <typename T>
void column_max(const T* __restrict x, int64_t w, int64_t top, int64_t count,
                T* __restrict best, Row<T>* __restrict row) {
  constexpr int64_t L = kLanes<T>;
  const auto chunk = [&](int64_t c0) {
    T b[L];
    Row<T> r[L];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      b[l] = x[top * w + c0 + l];
      r[l] = static_cast<Row<T>>(top);
    }
    for (int64_t i = top + 1; i < top + count; ++i) {
      const T* __restrict values = x + i * w + c0;
      const Row<T> here = static_cast<Row<T>>(i);
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const bool take = beats(values[l], b[l]);
        b[l] = take ? values[l] : b[l];
        r[l] = take ? here : r[l];
      }
    }
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      best[c0 + l] = b[l];
      row[c0 + l] = r[l];
    }
  };
  const auto small = [&](int64_t, int64_t) {
    std::copy_n(x + top * w, w, best);
    std::fill_n(row, w, static_cast<Row<T>>(top));
    for (int64_t i = top + 1; i < top + count; ++i) {
      const Row<T> here = static_cast<Row<T>>(i);
      keep_larger(best, row, x + i * w, [here](int64_t) { return here; }, w);
    }
  };
  over_vectors<T>(w, chunk, small);
}

// Per column c, the largest of the blocks first .. first + count - 1 (each of w values,
// with rows) and its row: the blocks come in row order, so a later one wins only when
// it beats.
template <typename T>
void merge_blocks(const T* __restrict blocks, const Row<T>* __restrict block_rows, int64_t w,
                  int64_t first, int64_t count, T* __restrict best, Row<T>* __restrict row) {
  constexpr int64_t L = kLanes<T>;
  const auto chunk = [&](int64_t c0) {
    T b[L];
    Row<T> r[L];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      b[l] = blocks[first * w + c0 + l];
      r[l] = block_rows[first * w + c0 + l];
    }
    for (int64_t j = first + 1; j < first + count; ++j) {
      const T* __restrict values = blocks + j * w + c0;
      const Row<T>* __restrict rows = block_rows + j * w + c0;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const bool take = beats(values[l], b[l]);
        b[l] = take ? values[l] : b[l];
        r[l] = take ? rows[l] : r[l];
      }
    }
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      best[c0 + l] = b[l];
      row[c0 + l] = r[l];
    }
  };
  const auto small = [&](int64_t, int64_t) {
    std::copy_n(blocks + first * w, w, best);
    std::copy_n(block_rows + first * w, w, row);
    for (int64_t j = first + 1; j < first + count; ++j) {
      const Row<T>* later = block_rows + j * w;
      keep_larger(best, row, blocks + j * w, [later](int64_t c) { return later[c]; }, w);
    }
  };
  over_vectors<T>(w, chunk, small);
}

// h_out rounded up to whole vectors of T.
template <typename T>
constexpr int64_t padded_height(int64_t h_out) {
  return (h_out + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
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
// runs on the transposed maxima, padded to whole vectors, so that it too runs along
// whole vectors: per output column, the largest over the window's columns.
template <typename T>
void pool_map(const T* __restrict x, T* __restrict out, int64_t* __restrict index, int64_t h,
              int64_t w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t h_out,
              int64_t w_out, Scratch<T>& s) {
  constexpr int64_t L = kLanes<T>;
  const bool tiled = sh > 1 && kh % sh == 0;
  if (tiled) {
    const int64_t per_window = kh / sh;
    for (int64_t j = 0; j < h_out + per_window - 1; ++j)
      column_max(x, w, j * sh, sh, s.blocks.data() + j * w, s.block_rows.data() + j * w);
    for (int64_t a = 0; a < h_out; ++a)
      merge_blocks(s.blocks.data(), s.block_rows.data(), w, a, per_window,
                   s.best.data() + a * w, s.rows.data() + a * w);
  } else {
    for (int64_t a = 0; a < h_out; ++a)
      column_max(x, w, a * sh, kh, s.best.data() + a * w, s.rows.data() + a * w);
  }
  const int64_t column = padded_height<T>(h_out);  // the padding is never read back
  T* __restrict across = s.across.data();
  Row<T>* __restrict flat = s.flat.data();
  for (int64_t a = 0; a < h_out; ++a) {
    const T* best = s.best.data() + a * w;
    const Row<T>* rows = s.rows.data() + a * w;
    for (int64_t c = 0; c < w; ++c) {
      across[c * column + a] = best[c];
      flat[c * column + a] = static_cast<Row<T>>(rows[c] * w + c);
    }
  }
  for (int64_t b = 0; b < w_out; ++b) {
    const int64_t left = b * sw;
    for (int64_t a0 = 0; a0 < column; a0 += L) {
      // One vector of output rows, kept in registers while the window's columns pass.
      auto value = load<Values<T>>(across + left * column + a0);
      auto where = load<Positions<T>>(flat + left * column + a0);
      for (int64_t c = left + 1; c < left + kw; ++c) {
        // Columns come left to right but their rows in any order: compare positions.
        const auto candidate = load<Values<T>>(across + c * column + a0);
        const auto position = load<Positions<T>>(flat + c * column + a0);
        const auto take = replaces(candidate, value, position, where);
        value = take ? candidate : value;
        where = take ? position : where;
      }
      for (int64_t l = 0; l < L && a0 + l < h_out; ++l) {
        out[(a0 + l) * w_out + b] = value[l];
        index[(a0 + l) * w_out + b] = where[l];
      }
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
  s.best.resize(h_out * w);
  s.rows.resize(h_out * w);
  s.across.resize(padded_height<T>(h_out) * w);
  s.flat.resize(padded_height<T>(h_out) * w);
  return s;
}

}  // namespace cnnkit_pooling
