// Split-KV ("flash-decoding") decode attention for a CQIL group of P layers.
//
// One query token per sequence. The P layers of a group read one shared input, so their queries
// arrive together: q is [B, P*nh, D], head hq = j*nh + h belongs to layer j. Layer j's caches are
// K_j, V_j = base + j*layer_stride, each laid out [B, nkv, S, D] with arbitrary batch/head/seq
// strides (the last dim must be contiguous). GQA: q head h of layer j reads kv head h/(nh/nkv) of
// layer j. Keys at positions >= kv_len, or where kv_mask[b, s] == 0, are ignored.
//
//   phase 1: for each (b, hq, split) the keys [begin, end) of that split give a partial
//            (m = running max of the log2-domain scores, l = sum of exp2(score - m),
//             acc[D] = sum of exp2(score - m) * v), written to the workspace;
//   phase 2: out[b, hq] = sum_i w_i acc_i / sum_i w_i l_i with w_i = exp2(m_i - max_i m_i).
//
// A row whose keys are all ignored (kv_len == 0 or all masked) gets zeros (not NaN).
// The CPU (decode_attention_cpu.cpp) and CUDA (decode_attention.cu) implementations share this
// header: the parameter block, the split boundaries and the workspace layout.
//
// No torch headers: pointers are raw, strides are in elements, the stream is a cudaStream_t
// passed as an integer.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CQIL_HD __host__ __device__ __forceinline__
#else
#define CQIL_HD inline
#endif

namespace cqil {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest head dim the kernels take (8 elements per lane of a 32-lane warp).
constexpr int kMaxHeadDim = 256;

struct DecodeAttnParams {
  // q [B, P*nh, D]; stride of D is 1.
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0;
  // K/V of layer 0; layer j starts layer_stride elements further. Each layer [B, nkv, S, D].
  const void* k = nullptr;
  int64_t k_stride_layer = 0, k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  const void* v = nullptr;
  int64_t v_stride_layer = 0, v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  // kv_mask [B, S] of uint8/bool, nonzero = attend; may be null (attend to all s < kv_len).
  const uint8_t* kv_mask = nullptr;
  int64_t mask_stride_b = 0, mask_stride_s = 0;
  // out [B, P*nh, D] in the dtype of q; stride of D is 1.
  void* out = nullptr;
  int64_t out_stride_b = 0, out_stride_h = 0;
  // fp32 workspace of workspace_floats(B, P*nh, D, num_splits) floats (see partial_* below).
  float* workspace = nullptr;

  int32_t batch = 0;       // B
  int32_t num_layers = 0;  // P
  int32_t num_heads = 0;   // nh: query heads per layer
  int32_t num_kv_heads = 0;  // nkv: kv heads per layer, divides nh
  int32_t seq_len = 0;     // S: capacity of the caches
  int32_t head_dim = 0;    // D, 1..kMaxHeadDim
  int32_t kv_len = 0;      // keys [0, kv_len) are candidates, 0 <= kv_len <= S
  int32_t num_splits = 1;  // >= 1; splits past kv_len are empty (m = -inf, l = 0)
  float scale = 1.0f;      // softmax scale (usually 1/sqrt(D))
  int32_t dtype = kFloat32;  // of q, k, v and out
};

// Keys [begin, end) of split `split`: ceil(kv_len / num_splits) consecutive keys per split.
CQIL_HD void split_bounds(int32_t kv_len, int32_t num_splits, int32_t split, int32_t* begin,
                          int32_t* end) {
  const int32_t per = (kv_len + num_splits - 1) / num_splits;
  int32_t b = split * per;
  int32_t e = b + per;
  if (b > kv_len) b = kv_len;
  if (e > kv_len) e = kv_len;
  *begin = b;
  *end = e;
}

// Workspace layout, for N = B * (P*nh) * num_splits rows indexed ((b*H + hq)*num_splits + split):
//   m[N] | l[N] | acc[N, D]   (all fp32)
CQIL_HD int64_t partial_rows(const DecodeAttnParams& p) {
  return static_cast<int64_t>(p.batch) * p.num_layers * p.num_heads * p.num_splits;
}
CQIL_HD float* partial_m(const DecodeAttnParams& p) { return p.workspace; }
CQIL_HD float* partial_l(const DecodeAttnParams& p) { return p.workspace + partial_rows(p); }
CQIL_HD float* partial_acc(const DecodeAttnParams& p) {
  return p.workspace + 2 * partial_rows(p);
}

inline int64_t workspace_floats(int64_t batch, int64_t total_heads, int64_t head_dim,
                                int64_t num_splits) {
  return batch * total_heads * num_splits * (head_dim + 2);
}

// Number of splits for the CUDA launch: enough CTAs to fill the GPU (about 4 per SM), no split
// shorter than 64 keys, at most 128 splits.
int32_t decode_attention_num_splits(int64_t batch_heads, int64_t kv_len, int64_t num_sms);

// Throws std::invalid_argument with a clear message when p is inconsistent.
void check_params(const DecodeAttnParams& p);

// Plain C++ implementation (fp32 only), same two phases. Synchronous.
void decode_attention_cpu(const DecodeAttnParams& p);

#if defined(CQIL_WITH_CUDA)
// Launches phase 1 and phase 2 on `stream` (a cudaStream_t as an integer; 0 = legacy default).
// Asynchronous; throws std::runtime_error if a launch fails.
void decode_attention_cuda(const DecodeAttnParams& p, uintptr_t stream);
#endif

}  // namespace cqil
