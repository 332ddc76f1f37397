// CUDA split-KV ("flash-decoding") decode attention for a CQIL group; see decode_attention.h.
//
// Phase 1: one CTA of 4 warps per (split, hq, b). Each warp walks the split's keys 4 at a time
// (4 independent K/V row loads in flight per warp), each lane holding EPL consecutive elements of
// the head dim (D <= 32*EPL). Scores are reduced across the warp with xor shuffles (every lane
// ends with the bit-identical sum, so the per-key branches are warp-uniform), folded into an
// online softmax in the log2 domain, and the 4 warps are merged through shared memory into one
// partial (m, l, acc[D]) per CTA.
// Phase 2: one CTA per (hq, b) rescales and sums the partials of all splits.
// Accumulation is fp32 for every input type.
#include "decode_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace cqil {
namespace {

constexpr int kWarp = 32;
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * kWarp;
constexpr int kKeysPerIter = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int kBytes>
struct VecOf;
template <>
struct VecOf<4> { using type = unsigned int; };
template <>
struct VecOf<8> { using type = uint2; };
template <>
struct VecOf<16> { using type = uint4; };

// Elements [lane*EPL, lane*EPL + EPL) of a row of D elements, as float; elements past D read 0.
// vec: D % EPL == 0 and the row and chunk are aligned for loads of up to 16 bytes.
template <typename T, int EPL>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int lane, int D, bool vec,
                                           float (&out)[EPL]) {
  const int d0 = lane * EPL;
  if (vec) {
    if (d0 < D) {
      constexpr int kBytes = EPL * static_cast<int>(sizeof(T));
      constexpr int kLoadBytes = kBytes < 16 ? kBytes : 16;
      constexpr int kPerLoad = kLoadBytes / static_cast<int>(sizeof(T));
      using V = typename VecOf<kLoadBytes>::type;
#pragma unroll
      for (int i = 0; i < EPL / kPerLoad; ++i) {
        union {
          V v;
          T t[kPerLoad];
        } u;
        u.v = *reinterpret_cast<const V*>(row + d0 + i * kPerLoad);
#pragma unroll
        for (int j = 0; j < kPerLoad; ++j) out[i * kPerLoad + j] = to_float(u.t[j]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < EPL; ++e) out[e] = 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < EPL; ++e) out[e] = d0 + e < D ? to_float(row[d0 + e]) : 0.f;
  }
}

template <typename T, int EPL>
__global__ void __launch_bounds__(kThreads)
    decode_attn_split_kernel(const DecodeAttnParams p, const bool vec) {
  const int split = blockIdx.x;
  const int hq = blockIdx.y;
  const int b = blockIdx.z;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int D = p.head_dim;
  const int H = p.num_layers * p.num_heads;
  const int layer = hq / p.num_heads;
  const int kvh = (hq % p.num_heads) / (p.num_heads / p.num_kv_heads);
  int begin, end;
  split_bounds(p.kv_len, p.num_splits, split, &begin, &end);

  float qf[EPL];
  load_chunk<T, EPL>(static_cast<const T*>(p.q) + b * p.q_stride_b + hq * p.q_stride_h, lane, D,
                     vec, qf);
  const float scale_log2 = p.scale * kLog2e;  // exp2 in the loop instead of exp
#pragma unroll
  for (int e = 0; e < EPL; ++e) qf[e] *= scale_log2;

  const T* kb = static_cast<const T*>(p.k) + layer * p.k_stride_layer + b * p.k_stride_b +
                kvh * p.k_stride_h;
  const T* vb = static_cast<const T*>(p.v) + layer * p.v_stride_layer + b * p.v_stride_b +
                kvh * p.v_stride_h;
  const uint8_t* mb = p.kv_mask ? p.kv_mask + b * p.mask_stride_b : nullptr;

  float m = neg_inf(), l = 0.f;
  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;

  for (int s0 = begin + warp * kKeysPerIter; s0 < end; s0 += kNumWarps * kKeysPerIter) {
    bool valid[kKeysPerIter];
    float kf[kKeysPerIter][EPL], vf[kKeysPerIter][EPL], sc[kKeysPerIter];
    // Issue all K and V loads of the 4 keys before using any of them.
#pragma unroll
    for (int i = 0; i < kKeysPerIter; ++i) {
      const int s = s0 + i;
      valid[i] = s < end && (mb == nullptr || mb[s * p.mask_stride_s] != 0);
      if (valid[i]) {
        load_chunk<T, EPL>(kb + s * p.k_stride_s, lane, D, vec, kf[i]);
        load_chunk<T, EPL>(vb + s * p.v_stride_s, lane, D, vec, vf[i]);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) kf[i][e] = vf[i][e] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kKeysPerIter; ++i) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < EPL; ++e) dot = fmaf(qf[e], kf[i][e], dot);
      sc[i] = dot;
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int i = 0; i < kKeysPerIter; ++i) sc[i] += __shfl_xor_sync(kFullMask, sc[i], off);
    }
    float m_new = m;
#pragma unroll
    for (int i = 0; i < kKeysPerIter; ++i) {
      sc[i] = valid[i] ? sc[i] : neg_inf();
      m_new = fmaxf(m_new, sc[i]);
    }
    if (m_new == neg_inf()) continue;  // nothing valid yet (warp-uniform)
    const float alpha = exp2f(m - m_new);  // 0 while m == -inf
    l *= alpha;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] *= alpha;
#pragma unroll
    for (int i = 0; i < kKeysPerIter; ++i) {
      const float pr = exp2f(sc[i] - m_new);  // 0 for invalid keys
      l += pr;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[e] = fmaf(pr, vf[i][e], acc[e]);
    }
    m = m_new;
  }

  // Merge the warps' partials into the CTA's.
  __shared__ float sm_m[kNumWarps], sm_l[kNumWarps];
  __shared__ float sm_acc[kNumWarps][kWarp * EPL];
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < EPL; ++e) sm_acc[warp][lane * EPL + e] = acc[e];
  __syncthreads();

  float M = neg_inf();
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) M = fmaxf(M, sm_m[w]);
  float wt[kNumWarps];
  float L = 0.f;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) {
    wt[w] = sm_m[w] == neg_inf() ? 0.f : exp2f(sm_m[w] - M);
    L = fmaf(wt[w], sm_l[w], L);
  }
  const int64_t row = (static_cast<int64_t>(b) * H + hq) * p.num_splits + split;
  if (threadIdx.x == 0) {
    partial_m(p)[row] = M;
    partial_l(p)[row] = L;
  }
  float* out_acc = partial_acc(p) + row * D;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) a = fmaf(wt[w], sm_acc[w][d], a);
    out_acc[d] = a;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_attn_combine_kernel(const DecodeAttnParams p) {
  const int hq = blockIdx.x;
  const int b = blockIdx.y;
  const int D = p.head_dim;
  const int H = p.num_layers * p.num_heads;
  const int64_t row0 = (static_cast<int64_t>(b) * H + hq) * p.num_splits;
  const float* pm = partial_m(p) + row0;
  const float* pl = partial_l(p) + row0;
  const float* pa = partial_acc(p) + row0 * D;

  float M = neg_inf();
  for (int i = 0; i < p.num_splits; ++i) M = fmaxf(M, pm[i]);
  float L = 0.f;
  for (int i = 0; i < p.num_splits; ++i)
    if (pm[i] != neg_inf()) L = fmaf(exp2f(pm[i] - M), pl[i], L);
  const float inv = L > 0.f ? 1.f / L : 0.f;  // no key at all: zeros, not NaN

  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + hq * p.out_stride_h;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.f;
    for (int i = 0; i < p.num_splits; ++i)
      if (pm[i] != neg_inf()) o = fmaf(exp2f(pm[i] - M), pa[static_cast<int64_t>(i) * D + d], o);
    out[d] = from_float<T>(o * inv);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cqil decode_attention_cuda: ") + what +
                             " launch failed: " + cudaGetErrorString(err));
}

bool divisible(int64_t x, int64_t by) { return x % by == 0; }

template <typename T, int EPL>
void launch(const DecodeAttnParams& p, cudaStream_t stream) {
  // Vector loads when every row start and every lane's chunk is aligned to the load width.
  constexpr int64_t kLoadBytes = EPL * sizeof(T) < 16 ? EPL * sizeof(T) : 16;
  constexpr int64_t kLoadElems = kLoadBytes / sizeof(T);
  const auto aligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % kLoadBytes == 0;
  };
  const bool vec = p.head_dim % EPL == 0 && aligned(p.q) && aligned(p.k) && aligned(p.v) &&
                   divisible(p.q_stride_b, kLoadElems) && divisible(p.q_stride_h, kLoadElems) &&
                   divisible(p.k_stride_layer, kLoadElems) &&
                   divisible(p.k_stride_b, kLoadElems) && divisible(p.k_stride_h, kLoadElems) &&
                   divisible(p.k_stride_s, kLoadElems) &&
                   divisible(p.v_stride_layer, kLoadElems) &&
                   divisible(p.v_stride_b, kLoadElems) && divisible(p.v_stride_h, kLoadElems) &&
                   divisible(p.v_stride_s, kLoadElems);
  const int H = p.num_layers * p.num_heads;
  decode_attn_split_kernel<T, EPL>
      <<<dim3(p.num_splits, H, p.batch), kThreads, 0, stream>>>(p, vec);
  check_launch("split (phase 1)");
  decode_attn_combine_kernel<T><<<dim3(H, p.batch), kThreads, 0, stream>>>(p);
  check_launch("combine (phase 2)");
}

template <typename T>
void dispatch_head_dim(const DecodeAttnParams& p, cudaStream_t stream) {
  if (p.head_dim <= 64)
    launch<T, 2>(p, stream);
  else if (p.head_dim <= 128)
    launch<T, 4>(p, stream);
  else
    launch<T, 8>(p, stream);
}

}  // namespace

void decode_attention_cuda(const DecodeAttnParams& p, uintptr_t stream_handle) {
  check_params(p);
  const int64_t H = static_cast<int64_t>(p.num_layers) * p.num_heads;
  if (H > 65535 || p.batch > 65535)
    throw std::invalid_argument(
        "cqil decode_attention_cuda: grid too large (need P*nh <= 65535 and B <= 65535)");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case kFloat32: dispatch_head_dim<float>(p, stream); break;
    case kFloat16: dispatch_head_dim<__half>(p, stream); break;
    case kBFloat16: dispatch_head_dim<__nv_bfloat16>(p, stream); break;
    default: throw std::invalid_argument("cqil decode_attention_cuda: unknown dtype");
  }
}

}  // namespace cqil
