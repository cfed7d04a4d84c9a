/* effigen's fused CPU inference kernels (bf16), compiled on first use by effigen/nn/cpu_kernels.py with the system C
 * compiler (-O3 -march=native -fopenmp) and loaded with ctypes. Each kernel replaces a chain of bandwidth-bound eager
 * passes by one pass that reads its input once and writes its output once, computing in fp32 and rounding to bf16 once:
 *
 *   eg_rope_qk      2-D RoPE of q and k read from the qkv projection (B, L, S, H, D), written as (2, B, H, L, D)
 *   eg_gelu_tanh    GELU (tanh form) in place
 *   eg_silu         SiLU in place
 *   eg_group_norm   GroupNorm (+ optional SiLU) over a channels-last (N, HW, C) activation
 *   eg_silu_mul     SwiGLU's silu(gate) * value from one (rows, 2h) projection
 *   eg_l2norm_qk    VAR's l2-normalised q (times a per-head scale) and k, read from the qkv projection
 *   eg_norm_modulate LayerNorm or RMSNorm without affine, then adaLN's x * (1 + scale) (* gain) + shift
 *
 * The vector code needs AVX-512 F/BW/VL (every AMX Xeon and AMD Zen 4 has them); eg_vector_width() returns 0 where the
 * compiler did not target them, and the Python side then keeps the eager ops. Threads: OpenMP, `nt` of them (torch's
 * intra-op thread count); torch's CPU wheel already loaded libgomp.so.1, which this library shares.
 */
#include <math.h>
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

static void eg_x_sigmoid_inplace(uint16_t *x, int64_t n, float a, float b, int nt) {
  const int64_t chunk = 8192, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < chunks; k++) {
    int64_t lo = k * chunk, hi = lo + chunk < n ? lo + chunk : n, i = lo;
    for (; i + 16 <= hi; i += 16) eg_store(x + i, eg_x_sigmoid(eg_load(x + i), a, b));
    if (i < hi) {
      __mmask16 m = (__mmask16)((1u << (hi - i)) - 1u);
      eg_store_mask(x + i, m, eg_x_sigmoid(eg_load_mask(x + i, m), a, b));
    }
  }
}

/* GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) */
void eg_gelu_tanh(uint16_t *x, int64_t n, int nt) {
  const float a = 1.5957691216057308f; /* 2 sqrt(2 / pi) */
  eg_x_sigmoid_inplace(x, n, a, a * 0.044715f, nt);
}

void eg_silu(uint16_t *x, int64_t n, int nt) { eg_x_sigmoid_inplace(x, n, 1.f, 0.f, nt); }

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
