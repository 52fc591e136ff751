/* AVX-512 F/BW/VL: 16 fp32 lanes, one lane per weight row.
   With QIGEN_SIMDE defined, SIMD Everywhere implements the same intrinsics in portable C,
   so these kernels can be tested on hosts without AVX-512. */
#ifdef QIGEN_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#else
#include <immintrin.h>
#endif
#define VW 16
typedef __m512 vf;
typedef __m512i vi;
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm512_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vi vi_load(const uint32_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline vi vi_set1(uint32_t a) { return _mm512_set1_epi32((int)a); }
static inline vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
static inline vi vi_or(vi a, vi b) { return _mm512_or_si512(a, b); }
#define vi_srl(a, n) _mm512_srli_epi32((a), (n))
#define vi_sll(a, n) _mm512_slli_epi32((a), (n))
#ifdef QIGEN_SIMDE /* SIMDE 0.7 lacks _mm512_cvtph_ps and _mm512_cvtepi32_ps: convert lane by lane */
static inline vf vf_load_h(const uint16_t *p)
{
    float t[16];
    _mm256_storeu_ps(t, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
    _mm256_storeu_ps(t + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8))));
    return _mm512_loadu_ps(t);
}
static inline vf vi_to_vf(vi a)
{
    int32_t i[16];
    float t[16];
    _mm512_storeu_si512((void *)i, a);
    for (int j = 0; j < 16; j++)
        t[j] = (float)i[j];
    return _mm512_loadu_ps(t);
}
#else
static inline vf vf_load_h(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf vi_to_vf(vi a) { return _mm512_cvtepi32_ps(a); }
#endif
/* KV caches: VW int8 codes or 4-bit codes (the low or high nibbles of VW bytes) as floats; a vector's sum; one
   fp16 value to float and back (rounded to nearest even) */
#ifdef QIGEN_SIMDE /* SIMDE 0.7 lacks the byte-to-int32 conversions: lane by lane */
static inline vf vf_load_s8(const int8_t *p)
{
    float t[16];
    for (int j = 0; j < 16; j++)
        t[j] = (float)p[j];
    return _mm512_loadu_ps(t);
}
static inline vf vf_load_u4(const uint8_t *p, int high)
{
    float t[16];
    for (int j = 0; j < 16; j++)
        t[j] = (float)((high ? p[j] >> 4 : p[j]) & 15);
    return _mm512_loadu_ps(t);
}
#else
static inline vf vf_load_s8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline vf vf_load_u4(const uint8_t *p, int high)
{
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_cvtepi32_ps(_mm512_and_si512(high ? _mm512_srli_epi32(c, 4) : c, _mm512_set1_epi32(15)));
}
#endif
static inline float vf_sum(vf a)
{
    float t[16], s = 0.0f;
    _mm512_storeu_ps(t, a);
    for (int j = 0; j < 16; j++)
        s += t[j];
    return s;
}
static inline float f_half(uint16_t h) { return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h))); }
static inline uint16_t half_f(float f) { return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), 0), 0); }
/* int8 activations: u8 codes x s8 activations summed in int16 pairs, int16 adds, int16 pairs summed to int32 */
static inline vi vi_maddubs(vi u, vi s) { return _mm512_maddubs_epi16(u, s); }
static inline vi vi_add16(vi a, vi b) { return _mm512_add_epi16(a, b); }
#ifdef QIGEN_SIMDE /* SIMDE 0.7's native alias of _mm512_madd_epi16 takes the masked form's four arguments */
static inline vi vi_madd1(vi a) { return simde_mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
#else
static inline vi vi_madd1(vi a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
#endif
/* 8-bit codes: (code - 128) x s8 activations, four bytes summed into each int32 lane (see simd_avx2.h); AVX-512
   has no sign_epi8, so x is negated under the mask of negative codes (a zero code's product is zero anyway) */
static inline vi vi_dot8(vi w, vi x)
{
    const vi c = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
    return vi_madd1(_mm512_maddubs_epi16(_mm512_abs_epi8(c), _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(c),
                                                                                  _mm512_setzero_si512(), x)));
}
static inline vi vi_add32(vi a, vi b) { return _mm512_add_epi32(a, b); }
#if defined(QIGEN_VNNI) && defined(QIGEN_SIMDE)
static inline vi vi_dpbusd(vi s, vi u, vi x) { return _mm512_dpbusd_epi32(s, u, x); }
#elif defined(QIGEN_VNNI)
/* AVX-512 VNNI: per int32 lane, s + the four u8 x s8 byte products (vpdpbusd), no int16 sums on the way. In asm:
   gcc 12 copies the accumulator into a fresh register before the intrinsic and back after it (two moves per
   product; the compute probe ran at half the speed) */
static inline vi vi_dpbusd(vi s, vi u, vi x)
{
    __asm__("vpdpbusd %2, %1, %0" : "+v"(s) : "v"(u), "v"(x));
    return s;
}
#endif
