// Vectors of the compiler's vector extension, as wide as the instruction set the kernels
// are built for (see __init__.py): what the compiled kernels share to write loops that
// become vector instructions whatever the sizes of a call.

#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cnnkit_vectors {

// The width of the vector registers the code is built for, and how many of them a kernel
// may keep values in: 32 with AVX-512, 16 with AVX2 or SSE2 (no more assumed elsewhere).
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
constexpr int kRegisters = 32;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
constexpr int kRegisters = 16;
#else
constexpr int64_t kVectorBytes = 16;
constexpr int kRegisters = 16;
#endif

// Lanes of one vector of T. Loops written over exactly this many lanes become single
// vector instructions whatever the map's size, which the compiler cannot see.
template <typename T>
constexpr int64_t kLanes = kVectorBytes / sizeof(T);

// One vector of values, and of row numbers or positions (as many lanes), in the
// compiler's vector extension: held in registers, lowered to the instruction set built for.
template <typename T>
struct Vectors;
template <>
struct Vectors<float> {
  typedef float values __attribute__((vector_size(kVectorBytes)));
  typedef int32_t positions __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Vectors<double> {
  typedef double values __attribute__((vector_size(kVectorBytes)));
  typedef int64_t positions __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Values = typename Vectors<T>::values;
template <typename T>
using Positions = typename Vectors<T>::positions;

template <typename V, typename T>
inline V load(const T* from) {
  V v;
  std::memcpy(&v, from, sizeof v);
  return v;
}

template <typename V, typename T>
inline void store(T* to, V v) {
  std::memcpy(to, &v, sizeof v);
}

// p itself, but the compiler no longer knows where it points: scalars read through it
// are loaded again (a load broadcast into a vector, on a load port) instead of kept in
// registers from an earlier iteration and broadcast from there (a shuffle, which takes
// the port of a multiply-add on some processors).
template <typename T>
inline const T* fresh(const T* p) {
  asm("" : "+r"(p));
  return p;
}

// Calls f(std::integral_constant<int, n>{}) for n in 1 .. Max: a count known only at run
// time (the last, shorter block of a loop) made a constant a template can unroll by.
template <int Max, typename F>
inline void with_constant(int64_t n, F f) {
  if constexpr (Max >= 1) {
    if (n == Max) {
      f(std::integral_constant<int, Max>{});
    } else {
      with_constant<Max - 1>(n, f);
    }
  }
}

}  // namespace cnnkit_vectors
