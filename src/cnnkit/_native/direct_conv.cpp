// A valid 2-D correlation at stride 1 for banks with few input maps and many output
// maps -- the lecture's first filter bank, 1 -> 64 maps with 9x9 kernels -- written out
// channels-last, and the gradient with respect to its kernels.
//
// With the kernels laid out as taps[(c kh + u) kw + v, o] (one row of output maps per
// tap), output pixel (y, x) is
//
//   out[y, x, o] = bias[o] + sum_{c, u, v} x[c, y + u, x + v] taps[(c kh + u) kw + v, o]
//
// so each tap adds one input value (broadcast) times one row of kernel values (vectors
// over o) to the pixel's outputs. A block of R pixels by B vectors of outputs stays in
// registers for all of the taps; the kernels (C kh kw rows of O values: 20 KB for the
// lecture) stay in the first-level cache. The kernels' gradient swaps the roles:
//
//   d_taps[(c kh + u) kw + v, o] = sum_{n, y, x} x[n, c, y + u, x + v] g[n, y, x, o]
//   d_bias[o] = sum_{n, y, x} g[n, y, x, o]
//
// with a block of K taps (along one kernel row) by B vectors of outputs in registers,
// summed over the pixels of a strip of a few gradient rows, which every tap then reads
// while it is in the cache. Threads take rows of the output (strips for the gradient);
// each thread sums into its own copy of d_taps, and the copies are added at the end.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "direct_conv.h"
#include "vectors.h"

namespace {

using cnnkit_direct::gradient_strip;
using cnnkit_direct::kStripRows;
using cnnkit_direct::output_row;
using cnnkit_direct::Sizes;
using cnnkit_vectors::kLanes;


at::Tensor direct_conv2d_forward(const at::Tensor& x, const at::Tensor& taps,
                                 const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "x must be contiguous (N, C, H, W) on the CPU, got sizes ", x.sizes());
  TORCH_CHECK(taps.dim() == 2, "taps must be (C kh kw, O), got sizes ", taps.sizes());
  const int64_t n_images = x.size(0);
  const Sizes s{x.size(1), x.size(2), x.size(3), kh, kw, taps.size(1)};
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= s.h && kw <= s.w, "kernels of ", kh, "x", kw,
              " must fit in x maps of ", s.h, "x", s.w);
  TORCH_CHECK(taps.size(0) == s.maps * kh * kw && taps.is_contiguous() &&
                  taps.scalar_type() == x.scalar_type(),
              "taps must be contiguous (C kh kw, O) = (", s.maps * kh * kw,
              ", O) with the dtype of x, got sizes ", taps.sizes());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.dim() == 1 && b.numel() == s.outputs &&
                               b.scalar_type() == x.scalar_type()),
              "bias must be (", s.outputs, ",) with the dtype of x, got sizes ",
              b.defined() ? b.sizes() : at::IntArrayRef());
  const int64_t h_out = s.h_out(), w_out = s.w_out();
  at::Tensor out = at::empty({n_images, s.outputs, h_out, w_out},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_conv2d_forward", [&] {
    using T = scalar_t;
    TORCH_CHECK(s.outputs % kLanes<T> == 0, "the ", s.outputs,
                " output maps must fill whole vectors of ", kLanes<T>);
    const T* xp = x.data_ptr<T>();
    const T* tp = taps.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    at::parallel_for(0, n_images * h_out, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / h_out;
        output_row(xp + n * s.maps * s.h * s.w, tp, bp, op + n * h_out * w_out * s.outputs, s,
                   row % h_out);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> direct_conv2d_weight_grad(const at::Tensor& grad,
                                                              const at::Tensor& x, int64_t kh,
                                                              int64_t kw) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "x must be contiguous (N, C, H, W) on the CPU, got sizes ", x.sizes());
  TORCH_CHECK(grad.dim() == 4 && grad.device().is_cpu(),
              "grad must be (N, O, H_out, W_out) on the CPU, got sizes ", grad.sizes());
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= x.size(2) && kw <= x.size(3), "kernels of ", kh,
              "x", kw, " must fit in x maps of ", x.size(2), "x", x.size(3));
  const int64_t n_images = x.size(0);
  const Sizes s{x.size(1), x.size(2), x.size(3), kh, kw, grad.size(1)};
  const int64_t h_out = s.h_out(), w_out = s.w_out();
  TORCH_CHECK(grad.size(0) == n_images && grad.size(2) == h_out && grad.size(3) == w_out &&
                  grad.scalar_type() == x.scalar_type(),
              "grad must be (", n_images, ", O, ", h_out, ", ", w_out,
              ") with the dtype of x, got sizes ", grad.sizes());
  const at::Tensor g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t threads = at::get_num_threads(), taps = s.maps * kh * kw;
  // Each thread's sums: taps rows of d_taps, then one row of d_bias.
  at::Tensor partial = at::zeros({threads, taps + 1, s.outputs}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_conv2d_weight_grad", [&] {
    using T = scalar_t;
    TORCH_CHECK(s.outputs % kLanes<T> == 0, "the ", s.outputs,
                " output maps must fill whole vectors of ", kLanes<T>);
    const T* xp = x.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    T* pp = partial.data_ptr<T>();
    const int64_t strips = (h_out + kStripRows - 1) / kStripRows;
    at::parallel_for(0, n_images * strips, 1, [&](int64_t begin, int64_t end) {
      T* d_taps = pp + at::get_thread_num() * (taps + 1) * s.outputs;
      for (int64_t strip = begin; strip < end; ++strip) {
        const int64_t n = strip / strips, y = strip % strips * kStripRows;
        const int64_t rows = std::min(kStripRows, h_out - y);
        gradient_strip(xp + n * s.maps * s.h * s.w, gp + (n * h_out + y) * w_out * s.outputs,
                       d_taps, d_taps + taps * s.outputs, y, rows, s);
      }
    });
  });
  const at::Tensor sums = partial.sum(0);
  return {sums.narrow(0, 0, taps), sums[taps].clone()};  // outputs that share no memory
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cnnkit_native, m) {
  m.def("direct_conv2d_forward(Tensor x, Tensor taps, Tensor? bias, int kh, int kw) -> Tensor");
  m.impl("direct_conv2d_forward", c10::DispatchKey::CPU, &direct_conv2d_forward);
  m.def("direct_conv2d_weight_grad(Tensor grad, Tensor x, int kh, int kw) -> (Tensor, Tensor)");
  m.impl("direct_conv2d_weight_grad", c10::DispatchKey::CPU, &direct_conv2d_weight_grad);
}
