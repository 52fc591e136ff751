/* AVX2 + FMA + F16C: 8 fp32 lanes, one lane per weight row. */
#include <immintrin.h>
#define VW 8
typedef __m256 vf;
typedef __m256i vi;
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm256_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vf_load_h(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vi vi_load(const uint32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi vi_set1(uint32_t a) { return _mm256_set1_epi32((int)a); }
static inline vi vi_and(vi a, vi b) { return _mm256_and_si256(a, b); }
static inline vi vi_or(vi a, vi b) { return _mm256_or_si256(a, b); }
#define vi_srl(a, n) _mm256_srli_epi32((a), (n))
#define vi_sll(a, n) _mm256_slli_epi32((a), (n))
static inline vf vi_to_vf(vi a) { return _mm256_cvtepi32_ps(a); }
/* KV caches: VW int8 codes or 4-bit codes (the low or high nibbles of VW bytes) as floats; a vector's sum; one
   fp16 value to float and back (rounded to nearest even) */
static inline vf vf_load_s8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline vf vf_load_u4(const uint8_t *p, int high)
{
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_cvtepi32_ps(_mm256_and_si256(high ? _mm256_srli_epi32(c, 4) : c, _mm256_set1_epi32(15)));
}
static inline float vf_sum(vf a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float f_half(uint16_t h) { return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h))); }
static inline uint16_t half_f(float f) { return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), 0), 0); }
/* int8 activations: u8 codes x s8 activations summed in int16 pairs, int16 adds, int16 pairs summed to int32 */
static inline vi vi_maddubs(vi u, vi s) { return _mm256_maddubs_epi16(u, s); }
static inline vi vi_add16(vi a, vi b) { return _mm256_add_epi16(a, b); }
static inline vi vi_madd1(vi a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
/* 8-bit codes: (code - 128) x s8 activations, four bytes summed into each int32 lane; |code - 128| <= 128 and
   |x| <= 127 keep each int16 pair sum within range. The sign of x moves onto the codes' magnitudes (maddubs takes u8) */
static inline vi vi_dot8(vi w, vi x)
{
    const vi c = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
    return vi_madd1(_mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(x, c)));
}
static inline vi vi_add32(vi a, vi b) { return _mm256_add_epi32(a, b); }
#ifdef QIGEN_VNNI
/* AVX-VNNI (VEX-encoded, client CPUs): per int32 lane, s + the four u8 x s8 byte products. In asm, as in
   simd_avx512.h: gcc 12 copies the accumulator around the intrinsic */
static inline vi vi_dpbusd(vi s, vi u, vi x)
{
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(s) : "x"(u), "x"(x));
    return s;
}
#endif
