// A growable, cache-line-aligned, uninitialised array for kernel scratch and operand copies.
//
// Why not std::vector: its storage is only 16-byte aligned, and AMX tile loads whose 64-byte rows
// straddle two cache lines ran at half speed (1.8-1.9 against 0.6-0.95 TFLOP/s on a Sapphire
// Rapids class core, bench/RESULTS.md); and it zero-fills on resize, a pass over megabytes that
// every user here overwrites anyway. Every user writes each element before it reads it.
#pragma once

#include <cstddef>
#include <memory>
#include <new>

namespace pncc {

template <typename T>
class AlignedBuffer {
 public:
  static constexpr std::size_t kAlignment = 64;

  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t n) { resize(n); }

  // Makes room for n elements; their values are unspecified (old contents are not kept when it
  // grows).
  void resize(std::size_t n) {
    if (n > capacity_) {
      data_.reset(static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(kAlignment))));
      capacity_ = n;
    }
    size_ = n;
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::size_t size() const { return size_; }
  T* begin() { return data(); }
  T* end() { return data() + size_; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(kAlignment)); }
  };
  std::unique_ptr<T[], Free> data_;
  std::size_t capacity_ = 0, size_ = 0;
};

}  // namespace pncc
