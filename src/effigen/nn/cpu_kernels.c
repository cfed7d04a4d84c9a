/* effigen's fused CPU inference kernels (bf16), compiled on first use by effigen/nn/cpu_kernels.py with the system C
 * compiler (-O3 -march=native -fopenmp) and loaded with ctypes. Each kernel replaces a chain of bandwidth-bound eager
 * passes by one pass that reads its input once and writes its output once, computing in fp32 and rounding to bf16 once:
 *
 *   eg_rope_qk      2-D RoPE of q and k read from the qkv projection (B, L, S, H, D), written as (2, B, H, L, D)
 *   eg_gelu_tanh    GELU (tanh form) in place
 *   eg_silu         SiLU in place
 *   eg_gelu_tanh_forward / _backward  GELU (tanh form) out of place and its gradient, for bf16 training
 *   eg_group_norm   GroupNorm (+ optional SiLU) over a channels-last (N, HW, C) activation
 *   eg_silu_mul     SwiGLU's silu(gate) * value from one (rows, 2h) projection (+ _backward, for bf16 training)
 *   eg_l2norm_qk    VAR's l2-normalised q (times a per-head scale) and k, read from the qkv projection
 *   eg_norm_modulate LayerNorm or RMSNorm without affine, then adaLN's x * (1 + scale) (* gain) + shift
 *   eg_attention    softmax(q k^T * scale) v without a mask, on AMX tiles (where the CPU and compiler have AMX-BF16)
 *   eg_attention_dp the same on AVX-512 BF16 dot products (Zen 4, Cooper Lake; where AMX is missing)
 *   eg_attention_backward_dp  its gradients for training (dq, dk, dv from the forward's output and log-sum-exp),
 *                   with an optional mask; AVX-512 BF16 (also on AMX Xeons, which have it)
 *   eg_cross_entropy (+ _backward) the token generators' training loss from bf16 or fp32 logits, and its gradient
 *   eg_sample_tokens guidance, top-k, top-p and the Gumbel-max draw of the token generators, one pass per row (fp32)
 *
 * The vector code needs AVX-512 F/BW/VL (every AMX Xeon and AMD Zen 4 has them); eg_vector_width() returns 0 where the
 * compiler did not target them, and the Python side then keeps the eager ops. Threads: OpenMP, `nt` of them (torch's
 * intra-op thread count); torch's CPU wheel already loaded libgomp.so.1, which this library shares.
 */
#define _GNU_SOURCE /* syscall() for the AMX permission request */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define EG_VECTOR 16

static inline __m512 eg_load(const uint16_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 eg_load_mask(const uint16_t *p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
/* fp32 -> bf16, round to nearest even (NaN stays NaN) */
static inline __m256i eg_round(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
#endif
}
static inline void eg_store(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, eg_round(v)); }
static inline void eg_store_mask(uint16_t *p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, eg_round(v)); }

/* 2^t, t clamped to [-126, 126]: a degree-5 polynomial on the fraction (relative error < 2e-7), scaled by 2^floor */
static inline __m512 eg_exp2(__m512 t) {
  t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(126.f)), _mm512_set1_ps(-126.f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.8758759e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9877350e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5833779e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4014813e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315434e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999988e-1f));
  return _mm512_scalef_ps(p, n);
}
/* x * sigmoid(a * x + b * x^3) = x / (1 + 2^(-(a x + b x^3) log2 e)) */
static inline __m512 eg_x_sigmoid(__m512 x, float a, float b) {
  __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(b), _mm512_set1_ps(a)));
  __m512 e = eg_exp2(_mm512_mul_ps(z, _mm512_set1_ps(-1.4426950408889634f)));
  return _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.f)));
}
#else
#define EG_VECTOR 0
#endif

int eg_vector_width(void) { return EG_VECTOR; }

#if EG_VECTOR

/* q and k of a fused qkv projection x (B, L, S, H, D) (planes 0 and 1 of S), rotated pairwise:
 *   out[2i]   = x[2i] cos[2i] + x[2i+1] sin[2i]       (sin carries the sign of the pair rotation: (-s, +s))
 *   out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]
 * written to out (2, B, H, L, D); cos and sin (L, D) fp32. D % 16 == 0. */
void eg_rope_qk(const uint16_t *x, uint16_t *out, const float *cos, const float *sin, int64_t B, int64_t L,
                int64_t S, int64_t H, int64_t D, int nt) {
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static)
  for (int64_t b = 0; b < B; b++)
    for (int64_t l = 0; l < L; l++) {
      const float *c = cos + l * D, *s = sin + l * D;
      for (int64_t p = 0; p < 2; p++)
        for (int64_t h = 0; h < H; h++) {
          const uint16_t *src = x + (((b * L + l) * S + p) * H + h) * D;
          uint16_t *dst = out + (((p * B + b) * H + h) * L + l) * D;
          for (int64_t i = 0; i < D; i += 16) {
            __m512 v = eg_load(src + i);
            __m512 swapped = _mm512_permute_ps(v, 0xB1); /* (x1, x0, x3, x2, ...) */
            eg_store(dst + i, _mm512_fmadd_ps(v, _mm512_loadu_ps(c + i),
                                              _mm512_mul_ps(swapped, _mm512_loadu_ps(s + i))));
          }
        }
    }
}

/* out = x sigmoid(a x + b x^3) elementwise (out may be x) */
static void eg_x_sigmoid_map(const uint16_t *x, uint16_t *out, int64_t n, float a, float b, int nt) {
  const int64_t chunk = 8192, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < chunks; k++) {
    int64_t lo = k * chunk, hi = lo + chunk < n ? lo + chunk : n, i = lo;
    for (; i + 16 <= hi; i += 16) eg_store(out + i, eg_x_sigmoid(eg_load(x + i), a, b));
    if (i < hi) {
      __mmask16 m = (__mmask16)((1u << (hi - i)) - 1u);
      eg_store_mask(out + i, m, eg_x_sigmoid(eg_load_mask(x + i, m), a, b));
    }
  }
}

/* GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) */
void eg_gelu_tanh(uint16_t *x, int64_t n, int nt) {
  const float a = 1.5957691216057308f; /* 2 sqrt(2 / pi) */
  eg_x_sigmoid_map(x, x, n, a, a * 0.044715f, nt);
}

void eg_silu(uint16_t *x, int64_t n, int nt) { eg_x_sigmoid_map(x, x, n, 1.f, 0.f, nt); }

/* for training: GELU (tanh form) out of place, and its backward. With z = a x + b x^3 (a = 2 sqrt(2/pi),
 * b = 0.044715 a) and s = sigmoid(z): gelu = x s, d gelu / dx = s + x s (1 - s) (a + 3 b x^2). Each reads its inputs
 * once and writes once (torch's bf16 ops: ~5x the time at DiT-B/2's MLP shape). */
void eg_gelu_tanh_forward(const uint16_t *x, uint16_t *out, int64_t n, int nt) {
  const float a = 1.5957691216057308f;
  eg_x_sigmoid_map(x, out, n, a, a * 0.044715f, nt);
}

static inline __m512 eg_gelu_tanh_grad(__m512 g, __m512 x, float a, float b) {
  __m512 x2 = _mm512_mul_ps(x, x);
  __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(x2, _mm512_set1_ps(b), _mm512_set1_ps(a)));
  __m512 s = _mm512_div_ps(_mm512_set1_ps(1.f),
                           _mm512_add_ps(eg_exp2(_mm512_mul_ps(z, _mm512_set1_ps(-1.4426950408889634f))), _mm512_set1_ps(1.f)));
  __m512 slope = _mm512_fmadd_ps(x2, _mm512_set1_ps(3.f * b), _mm512_set1_ps(a));           /* a + 3 b x^2 */
  __m512 ds = _mm512_mul_ps(_mm512_mul_ps(x, s), _mm512_sub_ps(_mm512_set1_ps(1.f), s));    /* x s (1 - s) */
  return _mm512_mul_ps(g, _mm512_fmadd_ps(ds, slope, s));
}

void eg_gelu_tanh_backward(const uint16_t *grad, const uint16_t *x, uint16_t *dx, int64_t n, int nt) {
  const float a = 1.5957691216057308f, b = a * 0.044715f;
  const int64_t chunk = 8192, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < chunks; k++) {
    int64_t lo = k * chunk, hi = lo + chunk < n ? lo + chunk : n, i = lo;
    for (; i + 16 <= hi; i += 16) eg_store(dx + i, eg_gelu_tanh_grad(eg_load(grad + i), eg_load(x + i), a, b));
    if (i < hi) {
      __mmask16 m = (__mmask16)((1u << (hi - i)) - 1u);
      eg_store_mask(dx + i, m, eg_gelu_tanh_grad(eg_load_mask(grad + i, m), eg_load_mask(x + i, m), a, b));
    }
  }
}

/* GroupNorm of a channels-last activation x (N, HW, C) with G groups of C / G consecutive channels, then the affine
 * (gamma, beta fp32, C) and optionally SiLU, into out (N, HW, C). C % 16 == 0. Scratch from the caller: `partial`,
 * N * chunks * 2 * C doubles (chunks = the row blocks per image), and `affine`, 2 * N * C floats.
 * Statistics: per row block, per-channel sums and sums of squares in fp32 vectors, added into doubles; the variance
 * E[x^2] - E[x]^2 in double (biased, as torch.nn.GroupNorm). */
void eg_group_norm(const uint16_t *x, uint16_t *out, const float *gamma, const float *beta, int64_t N, int64_t HW,
                   int64_t C, int64_t G, float eps, int silu, double *partial, float *affine, int64_t chunks, int nt) {
  const int64_t rows = (HW + chunks - 1) / chunks;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t task = 0; task < N * chunks; task++) {
    int64_t n = task / chunks, k = task % chunks;
    int64_t lo = k * rows, hi = lo + rows < HW ? lo + rows : HW;
    double *sum = partial + task * 2 * C, *sq = sum + C;
    for (int64_t c = 0; c < C; c++) sum[c] = sq[c] = 0.0;
    for (int64_t r0 = lo; r0 < hi; r0 += 64) { /* fp32 over at most 64 rows, then into double */
      int64_t r1 = r0 + 64 < hi ? r0 + 64 : hi;
      for (int64_t c = 0; c < C; c += 16) {
        __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
        for (int64_t r = r0; r < r1; r++) {
          __m512 v = eg_load(x + (n * HW + r) * C + c);
          s = _mm512_add_ps(s, v);
          q = _mm512_fmadd_ps(v, v, q);
        }
        float sv[16], qv[16];
        _mm512_storeu_ps(sv, s);
        _mm512_storeu_ps(qv, q);
        for (int j = 0; j < 16; j++) sum[c + j] += sv[j], sq[c + j] += qv[j];
      }
    }
  }
  /* per (image, group): mean and 1/std; fold with the affine into out = x * scale[c] + shift[c] */
  float *scale = affine, *shift = affine + N * C;
  const int64_t per = C / G;
  for (int64_t n = 0; n < N; n++)
    for (int64_t g = 0; g < G; g++) {
      double s = 0.0, q = 0.0;
      for (int64_t k = 0; k < chunks; k++)
        for (int64_t c = g * per; c < (g + 1) * per; c++)
          s += partial[(n * chunks + k) * 2 * C + c], q += partial[(n * chunks + k) * 2 * C + C + c];
      double count = (double)HW * (double)per, mean = s / count, var = q / count - mean * mean;
      double rstd = 1.0 / sqrt((var > 0.0 ? var : 0.0) + (double)eps);
      for (int64_t c = g * per; c < (g + 1) * per; c++) {
        scale[n * C + c] = (float)(rstd * gamma[c]);
        shift[n * C + c] = (float)(beta[c] - mean * rstd * gamma[c]);
      }
    }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t task = 0; task < N * chunks; task++) {
    int64_t n = task / chunks, k = task % chunks;
    int64_t lo = k * rows, hi = lo + rows < HW ? lo + rows : HW;
    for (int64_t r = lo; r < hi; r++)
      for (int64_t c = 0; c < C; c += 16) {
        int64_t at = (n * HW + r) * C + c;
        __m512 v = _mm512_fmadd_ps(eg_load(x + at), _mm512_loadu_ps(scale + n * C + c),
                                   _mm512_loadu_ps(shift + n * C + c));
        eg_store(out + at, silu ? eg_x_sigmoid(v, 1.f, 0.f) : v);
      }
  }
}

/* out (rows, h) = silu(x[:, :h]) * x[:, h:] for x (rows, 2h) */
void eg_silu_mul(const uint16_t *x, uint16_t *out, int64_t rows, int64_t h, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const uint16_t *gate = x + r * 2 * h, *value = gate + h;
    uint16_t *dst = out + r * h;
    int64_t i = 0;
    for (; i + 16 <= h; i += 16)
      eg_store(dst + i, _mm512_mul_ps(eg_x_sigmoid(eg_load(gate + i), 1.f, 0.f), eg_load(value + i)));
    if (i < h) {
      __mmask16 m = (__mmask16)((1u << (h - i)) - 1u);
      eg_store_mask(dst + i, m, _mm512_mul_ps(eg_x_sigmoid(eg_load_mask(gate + i, m), 1.f, 0.f),
                                              eg_load_mask(value + i, m)));
    }
  }
}

/* its backward for training: with s = sigmoid(gate), d value = g silu(gate) = g gate s and
 * d gate = g value s (1 + gate (1 - s)), written as one (rows, 2h) gradient [d gate | d value] */
static inline void eg_silu_mul_grad(__m512 g, __m512 gate, __m512 value, __m512 *d_gate, __m512 *d_value) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 s = _mm512_div_ps(one, _mm512_add_ps(eg_exp2(_mm512_mul_ps(gate, _mm512_set1_ps(-1.4426950408889634f))), one));
  __m512 gs = _mm512_mul_ps(g, s);
  *d_value = _mm512_mul_ps(gs, gate);
  *d_gate = _mm512_mul_ps(_mm512_mul_ps(gs, value), _mm512_fmadd_ps(gate, _mm512_sub_ps(one, s), one));
}

void eg_silu_mul_backward(const uint16_t *grad, const uint16_t *x, uint16_t *dx, int64_t rows, int64_t h, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const uint16_t *g = grad + r * h, *gate = x + r * 2 * h, *value = gate + h;
    uint16_t *d_gate = dx + r * 2 * h, *d_value = d_gate + h;
    __m512 a, b;
    int64_t i = 0;
    for (; i + 16 <= h; i += 16) {
      eg_silu_mul_grad(eg_load(g + i), eg_load(gate + i), eg_load(value + i), &a, &b);
      eg_store(d_gate + i, a);
      eg_store(d_value + i, b);
    }
    if (i < h) {
      __mmask16 m = (__mmask16)((1u << (h - i)) - 1u);
      eg_silu_mul_grad(eg_load_mask(g + i, m), eg_load_mask(gate + i, m), eg_load_mask(value + i, m), &a, &b);
      eg_store_mask(d_gate + i, m, a);
      eg_store_mask(d_value + i, m, b);
    }
  }
}

/* Cross-entropy of logits (N, V) (bf16, or fp32 with `is32`) against targets in [0, V), for the token generators'
 * training: per row lse = log sum_j exp(x_j) (fp32), loss = lse - (1 - eps) x_t - eps mean_j x_j (label smoothing
 * eps, as F.cross_entropy); lse is kept for the backward, which writes the gradient
 * g_i (softmax(x)_j - eps / V - (1 - eps) [j == t]) in the logits' precision in one pass. */
static inline __m512 eg_load_any(const void *row, int64_t j, int is32) {
  return is32 ? _mm512_loadu_ps((const float *)row + j) : eg_load((const uint16_t *)row + j);
}
static inline __m512 eg_load_any_mask(const void *row, int64_t j, __mmask16 m, int is32) {
  return is32 ? _mm512_maskz_loadu_ps(m, (const float *)row + j) : eg_load_mask((const uint16_t *)row + j, m);
}
static inline void eg_store_any_mask(void *row, int64_t j, __mmask16 m, __m512 v, int is32) {
  if (is32)
    _mm512_mask_storeu_ps((float *)row + j, m, v);
  else
    eg_store_mask((uint16_t *)row + j, m, v);
}

void eg_cross_entropy(const void *x, int is32, const int64_t *target, int64_t N, int64_t V, float eps, float *loss,
                      float *lse, int nt) {
  const __m512 log2e = _mm512_set1_ps(1.4426950408889634f);
  const size_t bytes = is32 ? 4 : 2;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; r++) {
    const void *row = (const char *)x + (size_t)r * V * bytes;
    __m512 mx = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < V; j += 16) {
      __mmask16 m = V - j >= 16 ? 0xffff : (__mmask16)((1u << (V - j)) - 1u);
      __m512 v = eg_load_any_mask(row, j, m, is32);
      mx = _mm512_mask_max_ps(mx, m, mx, v);
      total = _mm512_add_ps(total, v);
    }
    const float mval = _mm512_reduce_max_ps(mx);
    const __m512 shift = _mm512_set1_ps(mval);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < V; j += 16) {
      __mmask16 m = V - j >= 16 ? 0xffff : (__mmask16)((1u << (V - j)) - 1u);
      __m512 e = eg_exp2(_mm512_mul_ps(_mm512_sub_ps(eg_load_any_mask(row, j, m, is32), shift), log2e));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const float l = mval + logf(_mm512_reduce_add_ps(sum));
    float xt;
    if (is32) {
      xt = ((const float *)row)[target[r]];
    } else {
      uint32_t bits = (uint32_t)((const uint16_t *)row)[target[r]] << 16;
      memcpy(&xt, &bits, 4);
    }
    lse[r] = l;
    loss[r] = l - (1.f - eps) * xt - (eps > 0.f ? eps * _mm512_reduce_add_ps(total) / (float)V : 0.f);
  }
}

void eg_cross_entropy_backward(const void *x, int is32, const int64_t *target, const float *lse, const float *grad,
                               int64_t N, int64_t V, float eps, void *dx, int nt) {
  const __m512 log2e = _mm512_set1_ps(1.4426950408889634f);
  const size_t bytes = is32 ? 4 : 2;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; r++) {
    const void *row = (const char *)x + (size_t)r * V * bytes;
    void *out = (char *)dx + (size_t)r * V * bytes;
    const __m512 g = _mm512_set1_ps(grad[r]), shift = _mm512_set1_ps(lse[r]), floor = _mm512_set1_ps(eps / (float)V);
    const int64_t t = target[r];
    for (int64_t j = 0; j < V; j += 16) {
      __mmask16 m = V - j >= 16 ? 0xffff : (__mmask16)((1u << (V - j)) - 1u);
      __m512 p = eg_exp2(_mm512_mul_ps(_mm512_sub_ps(eg_load_any_mask(row, j, m, is32), shift), log2e));
      __m512 d = _mm512_sub_ps(p, floor);
      if (t >= j && t < j + 16) d = _mm512_mask_sub_ps(d, (__mmask16)(1u << (t - j)), d, _mm512_set1_ps(1.f - eps));
      eg_store_any_mask(out, j, m, _mm512_mul_ps(g, d), is32);
    }
  }
}

static inline float eg_hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* Per row of x (B, L, D) bf16: n = LayerNorm(x) (rms == 0; mean and variance from the row held in cache, two passes)
 * or x / rms(x) (rms == 1), no affine; then out = n * (1 + scale[b]) * gain + shift[b], with scale and shift (B, D)
 * bf16 (shift may be NULL) and gain (D) fp32 (may be NULL). D % 16 == 0. */
void eg_norm_modulate(const uint16_t *x, uint16_t *out, const uint16_t *shift, const uint16_t *scale,
                      const float *gain, int64_t B, int64_t L, int64_t D, float eps, int rms, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t row = 0; row < B * L; row++) {
    const int64_t b = row / L;
    const uint16_t *src = x + row * D;
    uint16_t *dst = out + row * D;
    float mean = 0.f;
    if (!rms) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) s = _mm512_add_ps(s, eg_load(src + i));
      mean = eg_hsum(s) / (float)D;
    }
    __m512 m = _mm512_set1_ps(mean), q = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      __m512 c = _mm512_sub_ps(eg_load(src + i), m);
      q = _mm512_fmadd_ps(c, c, q);
    }
    const float rstd = 1.f / sqrtf(eg_hsum(q) / (float)D + eps);
    const __m512 r = _mm512_set1_ps(rstd), one = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < D; i += 16) {
      __m512 factor = _mm512_add_ps(eg_load(scale + b * D + i), one);
      if (gain) factor = _mm512_mul_ps(factor, _mm512_loadu_ps(gain + i));
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(eg_load(src + i), m), r), factor);
      if (shift) v = _mm512_add_ps(v, eg_load(shift + b * D + i));
      eg_store(dst + i, v);
    }
  }
}

/* q and k of a qkv projection x (B, L, S, H, D) (planes 0 and 1), each divided by max(||.||_2, 1e-12) over D, q also
 * multiplied by q_scale[h] (fp32, H); written to out (2, B, H, L, D). D % 16 == 0. */
void eg_l2norm_qk(const uint16_t *x, uint16_t *out, const float *q_scale, int64_t B, int64_t L, int64_t S, int64_t H,
                  int64_t D, int nt) {
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static)
  for (int64_t b = 0; b < B; b++)
    for (int64_t l = 0; l < L; l++)
      for (int64_t p = 0; p < 2; p++)
        for (int64_t h = 0; h < H; h++) {
          const uint16_t *src = x + (((b * L + l) * S + p) * H + h) * D;
          uint16_t *dst = out + (((p * B + b) * H + h) * L + l) * D;
          __m512 q = _mm512_setzero_ps();
          for (int64_t i = 0; i < D; i += 16) {
            __m512 v = eg_load(src + i);
            q = _mm512_fmadd_ps(v, v, q);
          }
          float norm = sqrtf(_mm512_reduce_add_ps(q));
          float factor = (p == 0 ? q_scale[h] : 1.f) / (norm > 1e-12f ? norm : 1e-12f);
          const __m512 f = _mm512_set1_ps(factor);
          for (int64_t i = 0; i < D; i += 16) eg_store(dst + i, _mm512_mul_ps(eg_load(src + i), f));
        }
}

#endif

/* ---------------------------------------------------------------------------------------------------------------
 * Attention: out = softmax(q k^T * scale) v for every (batch, head), no mask, exact softmax over all keys, in two
 * variants that share the layouts, the softmax and the output pass below: `eg_attention` on AMX tiles (Sapphire
 * Rapids and later) and `eg_attention_dp` on AVX-512 BF16 dot products (Zen 4, Cooper Lake; no AMX).
 *
 * Per (b, h) a thread packs k and v once (zero-padded to 64 keys and to 16/32-wide d chunks):
 *   kp  [key tile of 16][d chunk of 32][16 rows = d pairs][16 keys x 2]   S = q k^T's B operand (a 32-bit
 *       transpose of k: row r holds (k[j][2r], k[j][2r+1]) for the 16 keys j)
 *   vp  [key chunk of 32][d tile of 16][16 rows = key pairs][16 d x 2]     O = P v's B operand (two key rows
 *       interleaved)
 * This is AMX's VNNI layout of a B tile, and a row of it is what one `vdpbf16ps` multiplies with a broadcast pair of
 * the A side. Then, for each block of 16 queries: S (16 x keys, fp32) = q k^T; per row the maximum,
 * p = 2^((s - max) * scale * log2 e) and its sum in fp32, p rounded to bf16 into P; O = P v (fp32); out = O / sum,
 * rounded to bf16 once. Scores and weights are those of the reference up to the bf16 rounding of p (as in flash
 * attention).
 * q, k, v, out: bf16 with element strides (batch, head, row) in `st` (q: 0-2, k: 3-5, v: 6-8, out: 9-11), the last
 * dimension D contiguous, D even and <= 256. */
#if EG_VECTOR && defined(__AVX512BF16__)
#define EG_ATTENTION 1

/* 2^t for t <= 0 (attention weights, rounded to bf16 afterwards): a degree-3 polynomial on the fraction, relative
 * error < 9e-5 (a fortieth of bf16's half ulp); scalef flushes t < -149 to 0 */
static inline __m512 eg_exp2_weights(__m512 t) {
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.07706522f), f, _mm512_set1_ps(0.22764698f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69511634f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

static inline void eg_transpose16(__m512i r[16]) { /* 16 x 16 32-bit words, in registers */
  __m512i t[16], u[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; g++) {
    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; c++) {
    __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

/* up to 32 bf16 of a row (the d chunk [d0, d0 + 32) of a D-wide row), zero beyond D */
static inline __m512i eg_load_chunk(const uint16_t *row, int64_t d0, int64_t D) {
  int64_t n = D - d0 < 32 ? D - d0 : 32;
  __mmask32 m = n >= 32 ? 0xffffffffu : (__mmask32)((1u << n) - 1u);
  return _mm512_maskz_loadu_epi16(m, row + d0);
}

/* k of one (b, h) into kp: per 16 keys and 32 dims, a 32-bit transpose */
static void eg_pack_k(const uint16_t *kb, int64_t row_stride, int64_t Lk, int64_t Lk64, int64_t D, uint16_t *kp) {
  const int64_t DC = (D + 31) / 32;
  for (int64_t kt = 0; kt < Lk64 / 16; kt++)
    for (int64_t c = 0; c < DC; c++) {
      __m512i r[16];
      for (int j = 0; j < 16; j++) {
        int64_t key = kt * 16 + j;
        r[j] = key < Lk ? eg_load_chunk(kb + key * row_stride, c * 32, D) : _mm512_setzero_si512();
      }
      eg_transpose16(r);
      uint16_t *dst = kp + (kt * DC + c) * 512;
      for (int j = 0; j < 16; j++) _mm512_store_si512((__m512i *)(dst + j * 32), r[j]);
    }
}

/* v of one (b, h) into vp: per 32 keys and 16 dims, rows 2r and 2r + 1 interleaved */
static void eg_pack_v(const uint16_t *vb, int64_t row_stride, int64_t Lk, int64_t Lk64, int64_t D, uint16_t *vp) {
  const int64_t DT = (D + 15) / 16;
  for (int64_t kc = 0; kc < Lk64 / 32; kc++)
    for (int64_t n = 0; n < DT; n++) {
      int64_t cols = D - n * 16 < 16 ? D - n * 16 : 16;
      __mmask16 m = (__mmask16)((1u << cols) - 1u);
      uint16_t *dst = vp + (kc * DT + n) * 512;
      for (int r = 0; r < 16; r++) {
        int64_t k0 = kc * 32 + 2 * r;
        __m512i a = k0 < Lk ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, vb + k0 * row_stride + n * 16))
                            : _mm512_setzero_si512();
        __m512i c = k0 + 1 < Lk ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, vb + (k0 + 1) * row_stride + n * 16))
                                : _mm512_setzero_si512();
        _mm512_store_si512((__m512i *)(dst + r * 32), _mm512_or_si512(a, _mm512_slli_epi32(c, 16)));
      }
    }
}

/* the 16 query rows [q0, q0 + 16) into qp ([row][d chunk of 32]), zero rows past Lq */
static void eg_pack_q(const uint16_t *qb, int64_t row_stride, int64_t q0, int rows, int64_t D, uint16_t *qp) {
  const int64_t DC = (D + 31) / 32;
  for (int i = 0; i < 16; i++)
    for (int64_t c = 0; c < DC; c++)
      _mm512_store_si512((__m512i *)(qp + (i * DC + c) * 32),
                         i < rows ? eg_load_chunk(qb + (q0 + i) * row_stride, c * 32, D) : _mm512_setzero_si512());
}

/* softmax rows of s (16 x Lk64 fp32): P = 2^((s - max) alpha) in bf16 (zero past Lk, in rows >= rows and where
 * `mask`, the rows' allowed keys (stride Lk) or NULL, is 0), inv = 1 / sum (0 for a row without an allowed key), and
 * where lse2 is not NULL, the log-sum-exp in log2 units max * alpha + log2(sum) */
static void eg_softmax_rows(const float *s, uint16_t *p, float *inv, int rows, int64_t Lk, int64_t Lk64, float alpha,
                            const uint8_t *mask, float *lse2) {
  for (int i = 0; i < 16; i++) {
    const float *srow = s + i * Lk64;
    uint16_t *prow = p + i * Lk64;
    if (i >= rows) {
      memset(prow, 0, (size_t)Lk64 * 2);
      continue;
    }
    const uint8_t *mrow = mask ? mask + i * Lk : NULL;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < Lk; j += 16) {
      __mmask16 m = Lk - j >= 16 ? 0xffff : (__mmask16)((1u << (Lk - j)) - 1u);
      if (mrow) {
        __m128i allowed = _mm_maskz_loadu_epi8(m, mrow + j);
        m &= _mm_test_epi8_mask(allowed, allowed);
      }
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_load_ps(srow + j));
    }
    const float row_max = _mm512_reduce_max_ps(mx);
    const __m512 shift = _mm512_set1_ps(row_max == -INFINITY ? 0.f : -row_max * alpha), a = _mm512_set1_ps(alpha);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Lk64; j += 16) {
      __mmask16 m = j >= Lk ? 0 : Lk - j >= 16 ? 0xffff : (__mmask16)((1u << (Lk - j)) - 1u);
      if (mrow && m) {
        __m128i allowed = _mm_maskz_loadu_epi8(m, mrow + j);
        m &= _mm_test_epi8_mask(allowed, allowed);
      }
      __m512 e = _mm512_maskz_mov_ps(m, eg_exp2_weights(_mm512_fmadd_ps(_mm512_load_ps(srow + j), a, shift)));
      sum = _mm512_add_ps(sum, e);
      _mm256_store_si256((__m256i *)(prow + j), eg_round(e));
    }
    const float total = _mm512_reduce_add_ps(sum);
    inv[i] = total > 0.f ? 1.f / total : 0.f;
    if (lse2) lse2[i] = total > 0.f ? row_max * alpha + log2f(total) : -INFINITY;
  }
}

/* out row = o row (DT * 16 fp32) * inv, bf16, D columns */
static inline void eg_store_row(uint16_t *dst, const float *o, float inv, int64_t D) {
  const __m512 f = _mm512_set1_ps(inv);
  for (int64_t n = 0; n * 16 < D; n++) {
    int64_t cols = D - n * 16 < 16 ? D - n * 16 : 16;
    __m512 val = _mm512_mul_ps(_mm512_load_ps(o + n * 16), f);
    if (cols == 16)
      eg_store(dst + n * 16, val);
    else
      eg_store_mask(dst + n * 16, (__mmask16)((1u << cols) - 1u), val);
  }
}

/* one thread's buffers, one 64-byte aligned block (every part a multiple of 64 bytes): packed k and v, 16 packed
 * query rows, S (16 x Lk64 fp32), P (16 x Lk64 bf16), O (16 x D rounded up to 16, fp32) */
typedef struct {
  void *block;
  uint16_t *kp, *vp, *qp, *p;
  float *s, *o;
  const uint8_t *mask; /* the 16 query rows' allowed keys (stride Lk), or NULL */
  float *lse2;         /* 16 log-sum-exps out (log2 units), or NULL */
} eg_attention_work;

static eg_attention_work eg_attention_work_new(int64_t Lk64, int64_t D) {
  const size_t DC = (size_t)(D + 31) / 32, DT = (size_t)(D + 15) / 16, L = (size_t)Lk64;
  const size_t nk = L * DC * 64, nv = L * DT * 32, nq = 16 * DC * 64, ns = 16 * L * 4, np = 16 * L * 2;
  eg_attention_work w;
  char *m = aligned_alloc(64, nk + nv + nq + ns + np + 16 * DT * 64);
  w.block = m;
  w.kp = (uint16_t *)m;
  w.vp = (uint16_t *)(m + nk);
  w.qp = (uint16_t *)(m + nk + nv);
  w.s = (float *)(m + nk + nv + nq);
  w.p = (uint16_t *)(m + nk + nv + nq + ns);
  w.o = (float *)(m + nk + nv + nq + ns + np);
  w.mask = NULL;
  w.lse2 = NULL;
  return w;
}

#define EG_BCAST(ptr) ((__m512bh)_mm512_set1_epi32(*(const int32_t *)(ptr)))
#define EG_ROW(ptr) ((__m512bh)_mm512_load_si512((const void *)(ptr)))

/* S, softmax and O for the 16 packed query rows in w->qp (the first `rows` real): O into w->o, 1 / row sums into inv */
typedef void (*eg_attention_block)(const eg_attention_work *w, int rows, int64_t Lk, int64_t Lk64, int64_t D,
                                   float alpha, float *inv);

/* per (b, h): pack k and v; per 16 queries: pack q, `block`, write out = O / sum. `begin` and `end` (or NULL) run
 * once per thread around its share (AMX: the tile configuration) with 64 aligned bytes of state. */
static void eg_attention_run(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B,
                             int64_t H, int64_t Lq, int64_t Lk, int64_t D, const int64_t *st, float scale,
                             const uint8_t *mask, float *lse, int nt, eg_attention_block block,
                             void (*begin)(void *), void (*end)(void *)) {
  const int64_t Lk64 = (Lk + 63) / 64 * 64, DT = (D + 15) / 16;
  const float alpha = scale * 1.4426950408889634f;
#pragma omp parallel num_threads(nt)
  {
    _Alignas(64) unsigned char state[64];
    if (begin) begin(state);
    eg_attention_work w = eg_attention_work_new(Lk64, D);
    float inv[16], lse2[16];
    w.lse2 = lse ? lse2 : NULL;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
      const int64_t b = bh / H, h = bh % H;
      const uint16_t *qb = q + b * st[0] + h * st[1];
      uint16_t *ob = out + b * st[9] + h * st[10];
      eg_pack_k(k + b * st[3] + h * st[4], st[5], Lk, Lk64, D, w.kp);
      eg_pack_v(v + b * st[6] + h * st[7], st[8], Lk, Lk64, D, w.vp);
      for (int64_t q0 = 0; q0 < Lq; q0 += 16) {
        const int rows = Lq - q0 < 16 ? (int)(Lq - q0) : 16;
        eg_pack_q(qb, st[2], q0, rows, D, w.qp);
        w.mask = mask ? mask + q0 * Lk : NULL;
        block(&w, rows, Lk, Lk64, D, alpha, inv);
        for (int i = 0; i < rows; i++) eg_store_row(ob + (q0 + i) * st[11], w.o + i * DT * 16, inv[i], D);
        if (lse)
          for (int i = 0; i < rows; i++) lse[b * st[12] + h * st[13] + (q0 + i) * st[14]] = lse2[i] * 0.6931471805599453f;
      }
    }
    free(w.block);
    if (end) end(state);
  }
}

/* AVX-512 BF16 products: broadcast pairs of the A side times rows of the packed B side, 4 A rows x 64 columns in 16
 * fp32 accumulators.
 *
 * C (4-row groups below `rows`, N64 columns, stride ldc) = A B^T: A = 16 rows packed by eg_pack_q (rows past `rows`
 * zero), B = N64 rows of D packed by eg_pack_k; the d pairs below D only */
static void eg_gemm_nt_dp(const uint16_t *ap, const uint16_t *bp, int rows, int64_t N64, int64_t D, float *c,
                          int64_t ldc) {
  const int64_t DC = (D + 31) / 32;
  for (int i0 = 0; i0 < rows; i0 += 4)
    for (int64_t kt = 0; kt < N64 / 16; kt += 4) {
      __m512 acc[4][4];
      for (int a = 0; a < 4; a++)
        for (int t = 0; t < 4; t++) acc[a][t] = _mm512_setzero_ps();
      for (int64_t ch = 0; ch < DC; ch++) {
        const int pairs = D - ch * 32 >= 32 ? 16 : (int)(D - ch * 32) / 2;
        const uint16_t *kc = bp + (kt * DC + ch) * 512, *qc = ap + (i0 * DC + ch) * 32;
        for (int r = 0; r < pairs; r++) {
          __m512bh k0 = EG_ROW(kc + r * 32), k1 = EG_ROW(kc + DC * 512 + r * 32);
          __m512bh k2 = EG_ROW(kc + 2 * DC * 512 + r * 32), k3 = EG_ROW(kc + 3 * DC * 512 + r * 32);
          for (int a = 0; a < 4; a++) {
            __m512bh qa = EG_BCAST(qc + a * DC * 32 + 2 * r);
            acc[a][0] = _mm512_dpbf16_ps(acc[a][0], qa, k0);
            acc[a][1] = _mm512_dpbf16_ps(acc[a][1], qa, k1);
            acc[a][2] = _mm512_dpbf16_ps(acc[a][2], qa, k2);
            acc[a][3] = _mm512_dpbf16_ps(acc[a][3], qa, k3);
          }
        }
      }
      for (int a = 0; a < 4; a++)
        for (int t = 0; t < 4; t++) _mm512_store_ps(c + (i0 + a) * ldc + (kt + t) * 16, acc[a][t]);
    }
}

/* C (4-row groups below `rows`, D columns rounded up to 16, stride ldc) = A B: A = bf16 rows of stride lda whose
 * reduction index runs along the row (read as adjacent pairs), B = the reduction's rows of D packed by eg_pack_v; the
 * first `pairs` reduction pairs (A and B must hold zeros, not garbage, in a pair's unused half) */
static void eg_gemm_nn_dp(const uint16_t *a_rows, int64_t lda, const uint16_t *bp, int rows, int64_t pairs, int64_t D,
                          float *c, int64_t ldc) {
  const int64_t DT = (D + 15) / 16;
  for (int i0 = 0; i0 < rows; i0 += 4)
    for (int64_t n0 = 0; n0 < DT; n0 += 4) {
      const int64_t nn = DT - n0 < 4 ? DT - n0 : 4;
      __m512 acc[4][4];
      for (int a = 0; a < 4; a++)
        for (int t = 0; t < 4; t++) acc[a][t] = _mm512_setzero_ps();
      for (int64_t kk = 0; kk < pairs; kk++) {
        const uint16_t *vr = bp + ((kk / 16) * DT + n0) * 512 + (kk % 16) * 32, *pr = a_rows + i0 * lda + 2 * kk;
        if (nn == 4) {
          __m512bh v0 = EG_ROW(vr), v1 = EG_ROW(vr + 512), v2 = EG_ROW(vr + 1024), v3 = EG_ROW(vr + 1536);
          for (int a = 0; a < 4; a++) {
            __m512bh pa = EG_BCAST(pr + a * lda);
            acc[a][0] = _mm512_dpbf16_ps(acc[a][0], pa, v0);
            acc[a][1] = _mm512_dpbf16_ps(acc[a][1], pa, v1);
            acc[a][2] = _mm512_dpbf16_ps(acc[a][2], pa, v2);
            acc[a][3] = _mm512_dpbf16_ps(acc[a][3], pa, v3);
          }
        } else {
          for (int64_t t = 0; t < nn; t++) {
            __m512bh vt = EG_ROW(vr + t * 512);
            for (int a = 0; a < 4; a++) acc[a][t] = _mm512_dpbf16_ps(acc[a][t], EG_BCAST(pr + a * lda), vt);
          }
        }
      }
      for (int a = 0; a < 4; a++)
        for (int64_t t = 0; t < nn; t++) _mm512_store_ps(c + (i0 + a) * ldc + (n0 + t) * 16, acc[a][t]);
    }
}

/* S = q k^T, softmax, O = P v for the 16 packed query rows */
static void eg_attention_block_dp(const eg_attention_work *w, int rows, int64_t Lk, int64_t Lk64, int64_t D, float alpha,
                                  float *inv) {
  eg_gemm_nt_dp(w->qp, w->kp, rows, Lk64, D, w->s, Lk64);
  eg_softmax_rows(w->s, w->p, inv, rows, Lk, Lk64, alpha, w->mask, w->lse2);
  eg_gemm_nn_dp(w->p, Lk64, w->vp, rows, (Lk + 1) / 2, D, w->o, (D + 15) / 16 * 16);
}

void eg_attention_dp(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B, int64_t H,
                     int64_t Lq, int64_t Lk, int64_t D, const int64_t *st, float scale, const uint8_t *mask, float *lse,
                     int nt) {
  eg_attention_run(q, k, v, out, B, H, Lq, Lk, D, st, scale, mask, lse, nt, eg_attention_block_dp, NULL, NULL);
}

/* The backward of softmax attention (bf16, AVX-512 BF16), for training: given q (Lq x D), k, v (Lk x D), the
 * forward's output o and log-sum-exp lse (natural log of sum_j exp(s_ij scale) per query row, fp32), the output's
 * gradient dout and an optional allowed-pairs mask stored transposed (Lk x Lq bytes, shared by every (b, h)):
 *   P = exp(q k^T scale - lse)   dV = P^T dout   dP = dout v^T   delta_i = dout_i . o_i   dS = P (dP - delta)
 *   dQ = dS k scale              dK = dS^T q scale
 * Per (b, h), per 16 keys (FlashAttention-2's key-outer order): S^T and dP^T (16 x Lq, fp32), then P^T and dS^T in
 * bf16, whose products with the packed dout and q give the 16 rows of dV and dK whole (every query in one sum); dS^T
 * is also transposed into a (Lq x Lk) bf16 matrix, from which dQ = dS k is one more pass per 16 queries. Five
 * products, as the materialised backward; nothing of size Lq x Lk in fp32. `st`: the (b, h, row) strides of q, k,
 * v, o, dout, dq, dk, dv and lse, in elements. */
void eg_attention_backward_dp(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                              const uint16_t *dout, const float *lse, const uint8_t *mask_t, uint16_t *dq, uint16_t *dk,
                              uint16_t *dv, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, const int64_t *st,
                              float scale, int nt) {
  const int64_t Lq64 = (Lq + 63) / 64 * 64, Lk64 = (Lk + 63) / 64 * 64, DC = (D + 31) / 32, DT = (D + 15) / 16;
  const float log2e = 1.4426950408889634f, alpha = scale * log2e;
#pragma omp parallel num_threads(nt)
  {
    const size_t nk = (size_t)Lq64 * DC * 64, nv = (size_t)Lq64 * DT * 32, nblk = 16 * DC * 64;
    const size_t nrow = 16 * (size_t)Lq64, nacc = 16 * DT * 16 * 4;
    char *m = aligned_alloc(64, 2 * nk + 2 * nv + (size_t)Lk64 * DT * 32 + 2 * nblk + 2 * nrow * 4 + 2 * nrow * 2 +
                                    2 * nacc + (size_t)Lq64 * Lk64 * 2 + 2 * (size_t)Lq64 * 4);
    char *at = m;
#define EG_TAKE(type, name, bytes) type *name = (type *)at; at += (bytes)
    EG_TAKE(uint16_t, qk, nk);       /* q, packed as the B side of S^T = k q^T */
    EG_TAKE(uint16_t, dok, nk);      /* dout, as the B side of dP^T = v dout^T */
    EG_TAKE(uint16_t, qv, nv);       /* q, as the B side of dK = dS^T q */
    EG_TAKE(uint16_t, dov, nv);      /* dout, as the B side of dV = P^T dout */
    EG_TAKE(uint16_t, kv, (size_t)Lk64 * DT * 32); /* k, as the B side of dQ = dS k */
    EG_TAKE(uint16_t, kblk, nblk);   /* 16 key rows, the A side */
    EG_TAKE(uint16_t, vblk, nblk);   /* their 16 value rows */
    EG_TAKE(float, sT, nrow * 4);
    EG_TAKE(float, dpT, nrow * 4);
    EG_TAKE(uint16_t, pT, nrow * 2);
    EG_TAKE(uint16_t, dsT, nrow * 2);
    EG_TAKE(float, acc_a, nacc);
    EG_TAKE(float, acc_b, nacc);
    EG_TAKE(uint16_t, ds, (size_t)Lq64 * Lk64 * 2); /* dS, (Lq64 x Lk64) */
    EG_TAKE(float, lse2, (size_t)Lq64 * 4);        /* lse in log2 units, per query */
    EG_TAKE(float, delta, (size_t)Lq64 * 4);
#undef EG_TAKE
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
      const int64_t b = bh / H, h = bh % H;
#define EG_AT(ptr, i) ((ptr) + b * st[3 * (i)] + h * st[3 * (i) + 1])
      const uint16_t *qb = EG_AT(q, 0), *kb_ = EG_AT(k, 1), *vb = EG_AT(v, 2), *ob = EG_AT(o, 3), *gb = EG_AT(dout, 4);
      uint16_t *dqb = EG_AT(dq, 5), *dkb = EG_AT(dk, 6), *dvb = EG_AT(dv, 7);
      const float *lb = EG_AT(lse, 8);
#undef EG_AT
      eg_pack_k(qb, st[2], Lq, Lq64, D, qk);
      eg_pack_k(gb, st[14], Lq, Lq64, D, dok);
      eg_pack_v(qb, st[2], Lq, Lq64, D, qv);
      eg_pack_v(gb, st[14], Lq, Lq64, D, dov);
      eg_pack_v(kb_, st[5], Lk, Lk64, D, kv);
      for (int64_t i = 0; i < Lq64; i++) {
        if (i >= Lq) {
          lse2[i] = 0.f, delta[i] = 0.f;
          continue;
        }
        const uint16_t *orow = ob + i * st[11], *grow = gb + i * st[14];
        __m512 sum = _mm512_setzero_ps();
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) sum = _mm512_fmadd_ps(eg_load(orow + d), eg_load(grow + d), sum);
        if (d < D) {
          __mmask16 tail = (__mmask16)((1u << (D - d)) - 1u);
          sum = _mm512_fmadd_ps(eg_load_mask(orow + d, tail), eg_load_mask(grow + d, tail), sum);
        }
        delta[i] = _mm512_reduce_add_ps(sum);
        lse2[i] = lb[i * st[26]] * log2e;
      }
      const __m512 a = _mm512_set1_ps(alpha);
      for (int64_t k0 = 0; k0 < Lk; k0 += 16) {
        const int rows = Lk - k0 < 16 ? (int)(Lk - k0) : 16;
        eg_pack_q(kb_, st[5], k0, rows, D, kblk);
        eg_pack_q(vb, st[8], k0, rows, D, vblk);
        eg_gemm_nt_dp(kblk, qk, 16, Lq64, D, sT, Lq64);
        eg_gemm_nt_dp(vblk, dok, 16, Lq64, D, dpT, Lq64);
        for (int i = 0; i < 16; i++)
          for (int64_t j = 0; j < Lq64; j += 16) {
            __mmask16 valid = i < rows && j < Lq ? (Lq - j >= 16 ? 0xffff : (__mmask16)((1u << (Lq - j)) - 1u)) : 0;
            if (valid && mask_t) {
              __m128i allowed = _mm_maskz_loadu_epi8(valid, mask_t + (k0 + i) * Lq + j);
              valid &= _mm_test_epi8_mask(allowed, allowed);
            }
            __m512 p = _mm512_maskz_mov_ps(valid, eg_exp2_weights(_mm512_maskz_fmadd_ps(
                valid, _mm512_load_ps(sT + i * Lq64 + j), a, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_load_ps(lse2 + j)))));
            __m512 g = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_load_ps(dpT + i * Lq64 + j), _mm512_load_ps(delta + j)));
            _mm256_store_si256((__m256i *)(pT + i * Lq64 + j), eg_round(p));
            _mm256_store_si256((__m256i *)(dsT + i * Lq64 + j), eg_round(g));
          }
        eg_gemm_nn_dp(pT, Lq64, dov, 16, (Lq + 1) / 2, D, acc_a, DT * 16);
        eg_gemm_nn_dp(dsT, Lq64, qv, 16, (Lq + 1) / 2, D, acc_b, DT * 16);
        for (int i = 0; i < rows; i++) {
          eg_store_row(dvb + (k0 + i) * st[23], acc_a + i * DT * 16, 1.f, D);
          eg_store_row(dkb + (k0 + i) * st[20], acc_b + i * DT * 16, scale, D);
        }
        /* dS^T's 16 rows into columns k0.. of dS, 16 x 16 at a time (as 32-bit words, through registers) */
        for (int64_t j = 0; j < Lq64; j += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; i++) r[i] = _mm512_cvtepu16_epi32(_mm256_load_si256((const __m256i *)(dsT + i * Lq64 + j)));
          eg_transpose16(r);
          for (int i = 0; i < 16; i++) _mm256_store_si256((__m256i *)(ds + (j + i) * Lk64 + k0), _mm512_cvtepi32_epi16(r[i]));
        }
      }
      for (int64_t q0 = 0; q0 < Lq; q0 += 16) {
        const int rows = Lq - q0 < 16 ? (int)(Lq - q0) : 16;
        eg_gemm_nn_dp(ds + q0 * Lk64, Lk64, kv, rows, (Lk + 1) / 2, D, acc_a, DT * 16);
        for (int i = 0; i < rows; i++) eg_store_row(dqb + (q0 + i) * st[17], acc_a + i * DT * 16, scale, D);
      }
    }
    free(m);
  }
}
#else
#define EG_ATTENTION 0
void eg_attention_backward_dp(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                              const uint16_t *dout, const float *lse, const uint8_t *mask_t, uint16_t *dq, uint16_t *dk,
                              uint16_t *dv, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, const int64_t *st,
                              float scale, int nt) {
  (void)q, (void)k, (void)v, (void)o, (void)dout, (void)lse, (void)mask_t, (void)dq, (void)dk, (void)dv, (void)B;
  (void)H, (void)Lq, (void)Lk, (void)D, (void)st, (void)scale, (void)nt;
}
void eg_attention_dp(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B, int64_t H,
                     int64_t Lq, int64_t Lk, int64_t D, const int64_t *st, float scale, const uint8_t *mask, float *lse,
                     int nt) {
  (void)q, (void)k, (void)v, (void)out, (void)B, (void)H, (void)Lq, (void)Lk, (void)D, (void)st, (void)scale, (void)nt;
  (void)mask, (void)lse;
}
#endif

/* which attention kernels this build has: bit 0 AVX-512 BF16 (`eg_attention_dp`), bit 1 AMX (`eg_attention`, still
 * subject to `eg_amx_init`) */
int eg_attention_kernels(void) {
#if EG_ATTENTION && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return 3;
#else
  return EG_ATTENTION;
#endif
}

/* AMX tiles: S and O in tile registers, 4 accumulator tiles of 16 x 16 fp32 (64 keys or 64 dims), tile 4 the A
 * operand, 5 and 6 B operands, all 16 rows x 64 bytes. The thread's previous tile configuration (oneDNN's) is saved
 * and restored around the kernel. */
#if EG_ATTENTION && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((aligned(64))) eg_tilecfg;

/* Linux grants AMX tile data per process on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); 1 when granted */
int eg_amx_init(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

/* the thread's tile configuration (oneDNN's, or none) is kept in `state` and restored at the end */
static void eg_tiles_begin(void *state) {
  eg_tilecfg cfg;
  _tile_storeconfig(state);
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 7; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
}

static void eg_tiles_end(void *state) {
  if (((const eg_tilecfg *)state)->palette)
    _tile_loadconfig(state);
  else
    _tile_release();
}

static void eg_attention_block_amx(const eg_attention_work *w, int rows, int64_t Lk, int64_t Lk64, int64_t D,
                                   float alpha, float *inv) {
  const int64_t DC = (D + 31) / 32, DT = (D + 15) / 16;
  const uint16_t *kp = w->kp, *vp = w->vp, *qp = w->qp;
  uint16_t *p = w->p;
  float *s = w->s, *o = w->o;
  /* S = q k^T, 64 keys (4 tiles) at a time */
  for (int64_t kt = 0; kt < Lk64 / 16; kt += 4) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < DC; c++) {
      const uint16_t *kc = kp + (kt * DC + c) * 512;
      _tile_loadd(4, qp + c * 32, DC * 64);
      _tile_loadd(5, kc, 64);
      _tile_loadd(6, kc + DC * 512, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, kc + 2 * DC * 512, 64);
      _tile_loadd(6, kc + 3 * DC * 512, 64);
      _tile_dpbf16ps(2, 4, 5);
      _tile_dpbf16ps(3, 4, 6);
    }
    _tile_stored(0, s + kt * 16, Lk64 * 4);
    _tile_stored(1, s + kt * 16 + 16, Lk64 * 4);
    _tile_stored(2, s + kt * 16 + 32, Lk64 * 4);
    _tile_stored(3, s + kt * 16 + 48, Lk64 * 4);
  }
  eg_softmax_rows(s, p, inv, rows, Lk, Lk64, alpha, w->mask, w->lse2);
  /* O = P v, 4 output tiles of 16 dims at a time */
  for (int64_t n0 = 0; n0 < DT; n0 += 4) {
    const int64_t nn = DT - n0 < 4 ? DT - n0 : 4;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kc = 0; kc < Lk64 / 32; kc++) {
      const uint16_t *vc = vp + (kc * DT + n0) * 512;
      _tile_loadd(4, p + kc * 32, Lk64 * 2);
      _tile_loadd(5, vc, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (nn > 1) {
        _tile_loadd(6, vc + 512, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (nn > 2) {
        _tile_loadd(5, vc + 1024, 64);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (nn > 3) {
        _tile_loadd(6, vc + 1536, 64);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    _tile_stored(0, o + n0 * 16, DT * 64);
    if (nn > 1) _tile_stored(1, o + n0 * 16 + 16, DT * 64);
    if (nn > 2) _tile_stored(2, o + n0 * 16 + 32, DT * 64);
    if (nn > 3) _tile_stored(3, o + n0 * 16 + 48, DT * 64);
  }
}

void eg_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B, int64_t H,
                  int64_t Lq, int64_t Lk, int64_t D, const int64_t *st, float scale, const uint8_t *mask, float *lse,
                  int nt) {
  eg_attention_run(q, k, v, out, B, H, Lq, Lk, D, st, scale, mask, lse, nt, eg_attention_block_amx, eg_tiles_begin,
                   eg_tiles_end);
}
#else
int eg_amx_init(void) { return 0; }
void eg_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B, int64_t H,
                  int64_t Lq, int64_t Lk, int64_t D, const int64_t *st, float scale, const uint8_t *mask, float *lse,
                  int nt) {
  (void)q, (void)k, (void)v, (void)out, (void)B, (void)H, (void)Lq, (void)Lk, (void)D, (void)st, (void)scale, (void)nt;
  (void)mask, (void)lse;
}
#endif

/* ---------------------------------------------------------------------------------------------------------------
 * Token sampling (samplers/tokens.py): for each of `rows` rows of V fp32 logits, in one pass over the row:
 *   guidance   x = (1 + w) * cond - w * uncond where `uncond` is given (the eager ops' fp32 products and difference)
 *   top-k      every value >= the k-th largest survives (ties with it included), 0 < top_k < V
 *   top-p      the survivors sorted ascending, softmax over them, cumulative sum; the entries whose cumulative mass
 *              is <= 1 - top_p go, the largest never, 0 < top_p < 1
 *   draw       Gumbel-max: argmax over the kept entries of x / temperature - log(-log(u)), u the row's uniform noise
 *              clamped to [1e-20, 1 - 1e-7]; `greedy`: argmax of the kept x, no noise. Ties go to the lowest index.
 *   confidence (optional) the drawn token's probability under softmax(kept x / temperature), HMAR's re-masking key.
 * The same arithmetic as the eager chain (guided_logits, filter_logits, draw_tokens): it differs only where a sum or a
 * log rounds differently by an ulp and that decides a cut or an argmax. A row holding a NaN gets token -1.
 * Top-k is a radix select on order-preserving integer keys (11 + 11 + 10 bits, candidates compacted after each
 * digit), top-p a stable 3-pass radix sort of the survivors: O(V) per row, in L1/L2, instead of the eager passes
 * (topk, flip, softmax, cumsum, scatter, clamp, two logs, add, argmax) each reading and writing (rows, V) in memory.
 * Scalar C, so it builds for any CPU; the rows are split over `nt` OpenMP threads. */

static inline uint32_t eg_order_key(float f) { /* ascending float order = ascending key order; -0 counts as +0 */
  uint32_t u;
  if (f == 0.0f) f = 0.0f;
  memcpy(&u, &f, sizeof u);
  return (u >> 31) ? ~u : (u | 0x80000000u);
}

static const int EG_DIGIT_SHIFT[3] = {21, 10, 0}, EG_DIGIT_BITS[3] = {11, 11, 10};

/* the key of the k-th largest of n keys (1 <= k <= n); cand: n scratch words */
static uint32_t eg_kth_largest(const uint32_t *key, int64_t n, int64_t k, uint32_t *cand, int32_t *hist) {
  const uint32_t *src = key;
  uint32_t prefix = 0;
  for (int d = 0; d < 3; d++) {
    const int shift = EG_DIGIT_SHIFT[d], size = 1 << EG_DIGIT_BITS[d];
    const uint32_t mask = (uint32_t)size - 1;
    memset(hist, 0, sizeof(int32_t) * size);
    for (int64_t i = 0; i < n; i++) hist[(src[i] >> shift) & mask]++;
    int64_t above = 0;
    int digit = size - 1;
    for (; digit > 0 && above + hist[digit] < k; digit--) above += hist[digit];
    k -= above;
    prefix |= (uint32_t)digit << shift;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
      if (((src[i] >> shift) & mask) == (uint32_t)digit) cand[m++] = src[i];
    src = cand;
    n = m;
  }
  return prefix;
}

/* stable ascending sort of n (key, index) pairs; returns the buffer pair holding the result (a or b) */
static void eg_sort_pairs(uint32_t **key, int32_t **idx, uint32_t *key_b, int32_t *idx_b, int64_t n, int32_t *hist) {
  uint32_t *ka = *key, *kb = key_b;
  int32_t *ia = *idx, *ib = idx_b;
  for (int d = 2; d >= 0; d--) {
    const int shift = EG_DIGIT_SHIFT[d], size = 1 << EG_DIGIT_BITS[d];
    const uint32_t mask = (uint32_t)size - 1;
    memset(hist, 0, sizeof(int32_t) * size);
    for (int64_t i = 0; i < n; i++) hist[(ka[i] >> shift) & mask]++;
    if (n == 0 || hist[(ka[0] >> shift) & mask] == n) continue; /* one digit value: this pass changes nothing */
    int32_t total = 0;
    for (int j = 0; j < size; j++) {
      const int32_t c = hist[j];
      hist[j] = total;
      total += c;
    }
    for (int64_t i = 0; i < n; i++) {
      const int32_t at = hist[(ka[i] >> shift) & mask]++;
      kb[at] = ka[i];
      ib[at] = ia[i];
    }
    uint32_t *kt = ka; ka = kb; kb = kt;
    int32_t *it = ia; ia = ib; ib = it;
  }
  *key = ka;
  *idx = ia;
}

void eg_sample_tokens(const float *cond, const float *uncond, double weight, int64_t rows, int64_t V,
                      const float *uniform, int64_t top_k, double top_p, double temperature, int greedy,
                      int64_t *tokens, float *confidence, int nt) {
  const float a = (float)(1.0 + weight), b = (float)weight;
  const float cut = (float)(1.0 - top_p), tdiv = (float)(temperature > 1e-6 ? temperature : 1e-6);
  const float lo = (float)1e-20, hi = (float)(1.0 - 1e-7);
  const int use_k = top_k > 0 && top_k < V, use_p = top_p > 0 && top_p < 1;
#pragma omp parallel num_threads(nt)
  {
    float *x = malloc(sizeof(float) * V), *e = malloc(sizeof(float) * V);
    uint32_t *key0 = malloc(sizeof(uint32_t) * V), *key1 = malloc(sizeof(uint32_t) * V);
    int32_t *idx0 = malloc(sizeof(int32_t) * V), *idx1 = malloc(sizeof(int32_t) * V);
    int32_t hist[2048];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *c = cond + r * V;
      int nan = 0;
      if (uncond) {
        const float *u = uncond + r * V;
        for (int64_t j = 0; j < V; j++) {
          const float p = a * c[j], q = b * u[j];
          x[j] = p - q;
        }
      } else {
        memcpy(x, c, sizeof(float) * V);
      }
      for (int64_t j = 0; j < V; j++) nan |= x[j] != x[j];
      if (nan) {
        tokens[r] = -1;
        if (confidence) confidence[r] = NAN;
        continue;
      }
      /* survivors of top-k, in index order: (key, index) pairs in key0 / idx0 */
      uint32_t *key = key0;
      int32_t *idx = idx0;
      int64_t m = 0;
      if (use_k || use_p)
        for (int64_t j = 0; j < V; j++) key0[j] = eg_order_key(x[j]);
      if (use_k) {
        const uint32_t kth = eg_kth_largest(key0, V, top_k, key1, hist);
        for (int64_t j = 0; j < V; j++)
          if (key0[j] >= kth) {
            key0[m] = key0[j];
            idx0[m++] = (int32_t)j;
          }
      } else {
        for (int64_t j = 0; j < V; j++) idx0[j] = (int32_t)j;
        m = V;
      }
      int64_t first = 0; /* the kept entries are idx[first .. m) */
      if (use_p && m > 1) {
        eg_sort_pairs(&key, &idx, key1, idx1, m, hist);
        const float top = x[idx[m - 1]];
        double sum = 0;
        for (int64_t i = 0; i < m; i++) {
          e[i] = expf(x[idx[i]] - top);
          sum += e[i];
        }
        double cumulative = 0;
        for (; first < m - 1; first++) {
          cumulative += (double)(float)(e[first] / sum);
          if (!((float)cumulative <= cut)) break;
        }
      }
      int64_t best = -1;
      float best_score = -INFINITY;
      for (int64_t i = first; i < m; i++) {
        const int64_t j = idx[i];
        float s;
        if (greedy) {
          s = x[j];
        } else {
          float u = uniform[r * V + j];
          u = u < lo ? lo : (u > hi ? hi : u);
          s = x[j] / tdiv + -logf(-logf(u));
        }
        if (best < 0 || s > best_score || (s == best_score && j < best)) {
          best_score = s;
          best = j;
        }
      }
      tokens[r] = best;
      if (confidence) {
        float top = -INFINITY;
        for (int64_t i = first; i < m; i++) {
          const float z = x[idx[i]] / tdiv;
          if (z > top) top = z;
        }
        double sum = 0;
        for (int64_t i = first; i < m; i++) sum += expf(x[idx[i]] / tdiv - top);
        confidence[r] = (float)(expf(x[best] / tdiv - top) / sum);
      }
    }
    free(x); free(e); free(key0); free(key1); free(idx0); free(idx1);
  }
}
