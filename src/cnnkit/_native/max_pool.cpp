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
// The loops run over exactly one vector's lanes (the last vector of a row overlapping the
// one before), so that they vectorize whatever the map's size (max_pool.h).
//
// The backward adds each window's gradient at its index of a zero (H, W) map.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "max_pool.h"

namespace {

using cnnkit_pooling::make_scratch;
using cnnkit_pooling::pool_map;
using cnnkit_pooling::Scratch;

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
      Scratch<T> scratch = make_scratch<T>(w, kh, sh, h_out);
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
