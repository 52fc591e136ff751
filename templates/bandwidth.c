/* Read-bandwidth probe: stream a buffer much larger than the last-level cache with `threads`
   threads and return the best of `reps` passes in bytes per second. Sixty-four independent
   partial sums keep the adds off the critical path, so only memory limits the loop. */
#include <stddef.h>
#include <omp.h>

#define LANES 64

double qigen_read_bandwidth(const float *a, size_t n, int threads, int reps)
{
    double best = 0.0;
    size_t blocks = n / LANES;
    for (int rep = 0; rep < reps; rep++) {
        float total = 0.0f;
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : total)
        {
            float acc[LANES] = {0};
#pragma omp for schedule(static)
            for (size_t b = 0; b < blocks; b++)
                for (int j = 0; j < LANES; j++)
                    acc[j] += a[b * LANES + j];
            for (int j = 0; j < LANES; j++)
                total += acc[j];
        }
        double t = omp_get_wtime() - t0;
        if (total != total)
            return -1.0; /* NaN: the buffer was not initialised */
        if (blocks * LANES * sizeof(float) / t > best)
            best = blocks * LANES * sizeof(float) / t;
    }
    return best;
}
