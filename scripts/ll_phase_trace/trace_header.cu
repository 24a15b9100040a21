
}  // namespace
}  // namespace jax_ep
#include <cstdio>
namespace jax_ep {
namespace {
__device__ unsigned long long g_tmin[64][11];
__device__ unsigned long long g_tmax[64][11];
__device__ __forceinline__ void trace(unsigned long long n, int p) {
  if (threadIdx.x == 0) {
    const unsigned long long t = globaltimer_ns();
    atomicMin(&g_tmin[n % 64][p], t);
    atomicMax(&g_tmax[n % 64][p], t);
  }
}
__device__ void trace_entry(const GroupView& g, unsigned long long n, int op) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const int z = (n + 32) % 64;
    for (int p = 0; p < 11; ++p) { g_tmin[z][p] = ~0ull; g_tmax[z][p] = 0; }
    if (n % 40 == 0 && n > 100) {
      for (int back = 1; back <= 2; ++back) {
        const int s = (n - back) % 64;
        const unsigned long long b = g_tmin[s][0];
        long long v[22];
        for (int p = 0; p < 11; ++p) {
          v[2*p] = g_tmin[s][p] == ~0ull ? -1 : (long long)(g_tmin[s][p] - b) / 100;
          v[2*p+1] = g_tmax[s][p] == 0 ? -1 : (long long)(g_tmax[s][p] - b) / 100;
        }
        printf("TRACE r%d b%d n%llu (0.1us) entry %lld..%lld count %lld..%lld peers %lld..%lld announce %lld..%lld sent %lld..%lld recvwait %lld..%lld recvdone %lld..%lld finish %lld..%lld stores %lld..%lld prefinish %lld..%lld final %lld..%lld\n",
               g.rank, gridDim.x, n - back, v[0],v[1],v[2],v[3],v[4],v[5],v[6],v[7],v[8],v[9],v[10],v[11],v[12],v[13],v[14],v[15],v[16],v[17],v[18],v[19],v[20],v[21]);
      }
    }
  }
  trace(n, 0);
}
