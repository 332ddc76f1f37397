// CPU implementation of the split-KV decode attention in decode_attention.h, plus the pieces the
// CPU and CUDA paths share (parameter checks, split heuristic). Same two phases as the CUDA
// kernels, so the algorithm (split boundaries, partial (m, l, acc), combine) is tested on
// machines without a GPU. fp32 only; meant for tests, not speed.
#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace cqil {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("cqil decode_attention: " + what);
}

}  // namespace

int32_t decode_attention_num_splits(int64_t batch_heads, int64_t kv_len, int64_t num_sms) {
  if (batch_heads <= 0 || kv_len <= 0) return 1;
  constexpr int64_t kMinKeysPerSplit = 64;
  constexpr int64_t kMaxSplits = 128;
  const int64_t target_ctas = 4 * std::max<int64_t>(num_sms, 1);
  int64_t splits = (target_ctas + batch_heads - 1) / batch_heads;
  splits = std::min(splits, (kv_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  splits = std::min(splits, kMaxSplits);
  return static_cast<int32_t>(std::max<int64_t>(splits, 1));
}

void check_params(const DecodeAttnParams& p) {
  if (p.batch <= 0 || p.num_layers <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0)
    fail("batch, num_layers, num_heads and num_kv_heads must be positive (got B=" +
         std::to_string(p.batch) + ", P=" + std::to_string(p.num_layers) +
         ", nh=" + std::to_string(p.num_heads) + ", nkv=" + std::to_string(p.num_kv_heads) + ")");
  if (p.num_heads % p.num_kv_heads != 0)
    fail("num_heads (" + std::to_string(p.num_heads) + ") must be a multiple of num_kv_heads (" +
         std::to_string(p.num_kv_heads) + ")");
  if (p.head_dim <= 0 || p.head_dim > kMaxHeadDim)
    fail("head_dim must be in [1, " + std::to_string(kMaxHeadDim) + "], got " +
         std::to_string(p.head_dim));
  if (p.seq_len < 0 || p.kv_len < 0 || p.kv_len > p.seq_len)
    fail("need 0 <= kv_len <= seq_len, got kv_len=" + std::to_string(p.kv_len) +
         ", seq_len=" + std::to_string(p.seq_len));
  if (p.num_splits <= 0) fail("num_splits must be >= 1, got " + std::to_string(p.num_splits));
  if (p.dtype != kFloat32 && p.dtype != kFloat16 && p.dtype != kBFloat16)
    fail("unknown dtype code " + std::to_string(p.dtype));
  if (!p.q || !p.out || !p.workspace) fail("q, out and workspace must not be null");
  if (p.kv_len > 0 && (!p.k || !p.v)) fail("k and v must not be null");
}

void decode_attention_cpu(const DecodeAttnParams& p) {
  check_params(p);
  if (p.dtype != kFloat32) fail("the CPU implementation takes float32 only");

  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  float* out = static_cast<float*>(p.out);
  const int32_t H = p.num_layers * p.num_heads;
  const int32_t D = p.head_dim;
  const int32_t group = p.num_heads / p.num_kv_heads;
  const float scale_log2 = p.scale * kLog2e;  // scores in the log2 domain: exp2 instead of exp
  float* part_m = partial_m(p);
  float* part_l = partial_l(p);
  float* part_acc = partial_acc(p);
  std::vector<float> qf(D);

  // Phase 1: one partial (m, l, acc) per (b, hq, split), online softmax over the split's keys.
  for (int32_t b = 0; b < p.batch; ++b) {
    for (int32_t hq = 0; hq < H; ++hq) {
      const int32_t layer = hq / p.num_heads;
      const int32_t kvh = (hq % p.num_heads) / group;
      const float* qrow = q + b * p.q_stride_b + hq * p.q_stride_h;
      for (int32_t d = 0; d < D; ++d) qf[d] = qrow[d] * scale_log2;
      const float* kb = k + layer * p.k_stride_layer + b * p.k_stride_b + kvh * p.k_stride_h;
      const float* vb = v + layer * p.v_stride_layer + b * p.v_stride_b + kvh * p.v_stride_h;
      const uint8_t* mb = p.kv_mask ? p.kv_mask + b * p.mask_stride_b : nullptr;
      for (int32_t split = 0; split < p.num_splits; ++split) {
        const int64_t row = (static_cast<int64_t>(b) * H + hq) * p.num_splits + split;
        float* acc = part_acc + row * D;
        float m = kNegInf, l = 0.f;
        std::fill(acc, acc + D, 0.f);
        int32_t begin, end;
        split_bounds(p.kv_len, p.num_splits, split, &begin, &end);
        for (int32_t s = begin; s < end; ++s) {
          if (mb && mb[s * p.mask_stride_s] == 0) continue;
          const float* krow = kb + s * p.k_stride_s;
          float score = 0.f;
          for (int32_t d = 0; d < D; ++d) score += qf[d] * krow[d];
          const float m_new = std::max(m, score);
          const float alpha = std::exp2(m - m_new);  // m == -inf: 0
          const float pr = std::exp2(score - m_new);
          const float* vrow = vb + s * p.v_stride_s;
          l = l * alpha + pr;
          for (int32_t d = 0; d < D; ++d) acc[d] = acc[d] * alpha + pr * vrow[d];
          m = m_new;
        }
        part_m[row] = m;
        part_l[row] = l;
      }
    }
  }

  // Phase 2: combine the splits of each (b, hq).
  for (int32_t b = 0; b < p.batch; ++b) {
    for (int32_t hq = 0; hq < H; ++hq) {
      const int64_t row0 = (static_cast<int64_t>(b) * H + hq) * p.num_splits;
      float M = kNegInf;
      for (int32_t i = 0; i < p.num_splits; ++i) M = std::max(M, part_m[row0 + i]);
      float L = 0.f;
      float* orow = out + b * p.out_stride_b + hq * p.out_stride_h;
      std::fill(orow, orow + D, 0.f);
      for (int32_t i = 0; i < p.num_splits; ++i) {
        const float mi = part_m[row0 + i];
        if (mi == kNegInf) continue;  // empty or fully masked split
        const float w = std::exp2(mi - M);
        L += w * part_l[row0 + i];
        const float* acc = part_acc + (row0 + i) * D;
        for (int32_t d = 0; d < D; ++d) orow[d] += w * acc[d];
      }
      const float inv = L > 0.f ? 1.f / L : 0.f;  // no key at all: zeros, not NaN
      for (int32_t d = 0; d < D; ++d) orow[d] *= inv;
    }
  }
}

}  // namespace cqil
