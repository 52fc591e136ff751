/* Portable C: one lane, so a "row vector" is one row. Runs on any CPU. */
#include <math.h>
#define VW 1
typedef float vf;
typedef uint32_t vi;
static inline vf vf_zero(void) { return 0.0f; }
static inline vf vf_set1(float a) { return a; }
static inline vf vf_load(const float *p) { return *p; }
static inline vf vf_load_h(const uint16_t *p)
{
    /* IEEE half → float, subnormals included */
    uint32_t h = *p, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 0x400), (int)e - 25);
    return (h & 0x8000) ? -v : v;
}
static inline void vf_store(float *p, vf a) { *p = a; }
static inline vf vf_add(vf a, vf b) { return a + b; }
static inline vf vf_mul(vf a, vf b) { return a * b; }
static inline vf vf_fma(vf a, vf b, vf c) { return a * b + c; }
static inline vi vi_load(const uint32_t *p) { return *p; }
static inline vi vi_set1(uint32_t a) { return a; }
static inline vi vi_and(vi a, vi b) { return a & b; }
static inline vi vi_or(vi a, vi b) { return a | b; }
#define vi_srl(a, n) ((a) >> (n))
#define vi_sll(a, n) ((a) << (n))
static inline vf vi_to_vf(vi a) { return (float)(int32_t)a; }
/* KV caches: an int8 code or a 4-bit code (the low or high nibble of a byte) as a float; a vector's sum; one fp16
   value to float and back (rounded to nearest even) */
static inline vf vf_load_s8(const int8_t *p) { return (float)*p; }
static inline vf vf_load_u4(const uint8_t *p, int high) { return (float)((high ? *p >> 4 : *p) & 15); }
static inline float vf_sum(vf a) { return a; }
static inline float f_half(uint16_t h) { return vf_load_h(&h); }
static inline uint16_t half_f(float f)
{
    const _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}
/* int8 activations, one 32-bit lane: u8 x s8 products of bytes 0-1 and 2-3 summed into int16 halves (the kernels
   keep every sum within int16, so the saturation of the SIMD instruction never applies), int16 adds, halves summed */
static inline vi vi_maddubs(vi u, vi s)
{
    int32_t lo = (int32_t)(u & 0xff) * (int8_t)(s & 0xff) + (int32_t)((u >> 8) & 0xff) * (int8_t)((s >> 8) & 0xff);
    int32_t hi = (int32_t)((u >> 16) & 0xff) * (int8_t)((s >> 16) & 0xff) + (int32_t)(u >> 24) * (int8_t)(s >> 24);
    return (uint32_t)(uint16_t)lo | (uint32_t)(uint16_t)hi << 16;
}
static inline vi vi_add16(vi a, vi b) { return (uint32_t)(uint16_t)(a + b) | (uint32_t)(uint16_t)((a >> 16) + (b >> 16)) << 16; }
static inline vi vi_madd1(vi a) { return (uint32_t)((int32_t)(int16_t)(a & 0xffff) + (int32_t)(int16_t)(a >> 16)); }
/* 8-bit codes: (code - 128) x s8 activations, the four bytes summed */
static inline vi vi_dot8(vi w, vi x)
{
    int32_t s = 0;
    for (int b = 0; b < 32; b += 8)
        s += ((int32_t)((w >> b) & 0xff) - 128) * (int8_t)((x >> b) & 0xff);
    return (uint32_t)s;
}
static inline vi vi_add32(vi a, vi b) { return a + b; }
