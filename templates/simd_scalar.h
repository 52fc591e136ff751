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
static inline vf vi_to_vf(vi a) { return (float)(int32_t)a; }
