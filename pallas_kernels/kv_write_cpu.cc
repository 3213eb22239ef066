// Writes new tokens' K or V rows into a page pool in place: pool[page, h, offset, :] = values[t, h, :]
// for each flat slot page * page_size + offset. XLA passes the pool aliased to the result, so
// nothing else of it is read or copied. XLA:CPU's own scatter into a bfloat16 pool widens the
// whole pool to float32 and back on every call; this kernel serves float32 and bfloat16 pools.
//
// pool [num_pages, KVH, page_size, D], slots [T] int32, values [T, KVH, D] in the pool's dtype.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error KvWrite(ffi::AnyBuffer pool, ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer values,
                   ffi::Result<ffi::AnyBuffer> out) {
  const auto pd = pool.dimensions(), vd = values.dimensions(), sd = slots.dimensions();
  if (pd.size() != 4 || vd.size() != 3 || sd.size() != 1 || vd[0] != sd[0] || vd[1] != pd[1] || vd[2] != pd[3] ||
      values.element_type() != pool.element_type())
    return ffi::Error::InvalidArgument("jaxinfer_kv_write: expected pool [P, KVH, S, D], slots [T], values [T, KVH, D]");
  if (out->untyped_data() != pool.untyped_data())
    return ffi::Error::InvalidArgument("jaxinfer_kv_write: the result must alias the pool");
  const int64_t num_pages = pd[0], kv_heads = pd[1], page_size = pd[2];
  const int64_t row_bytes = pd[3] * static_cast<int64_t>(ffi::ByteWidth(pool.element_type()));
  char* base = static_cast<char*>(out->untyped_data());
  const char* src = static_cast<const char*>(values.untyped_data());
  const int32_t* s = slots.typed_data();
  for (int64_t t = 0; t < sd[0]; ++t) {
    // A slot outside the pool (never issued by the engine) is clamped into it rather than written outside.
    const int64_t slot = std::clamp<int64_t>(s[t], 0, num_pages * page_size - 1);
    const int64_t page = slot / page_size, offset = slot % page_size;
    for (int64_t h = 0; h < kv_heads; ++h)
      std::memcpy(base + ((page * kv_heads + h) * page_size + offset) * row_bytes,
                  src + (t * kv_heads + h) * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_kv_write, KvWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
