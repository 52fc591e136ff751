/* Read-bandwidth probe: stream a buffer much larger than the last-level cache with `threads`
   threads and return the best of `reps` passes in bytes per second. */
#include <stddef.h>
#include <omp.h>

double qigen_read_bandwidth(const float *a, size_t n, int threads, int reps)
{
    double best = 0.0;
    for (int rep = 0; rep < reps; rep++) {
        double t0 = omp_get_wtime();
        float total = 0.0f;
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+ : total)
        for (size_t i = 0; i < n; i++)
            total += a[i];
        double t = omp_get_wtime() - t0;
        if (total != total)
            return -1.0; /* NaN: the buffer was not initialised */
        if (n * sizeof(float) / t > best)
            best = n * sizeof(float) / t;
    }
    return best;
}
