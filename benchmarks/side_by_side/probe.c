/* The roofline's ceilings, measured on this core (benchmarks/side_by_side/roofline.py compiles it):
   the clock, from a dependent chain of integer adds (one per cycle), and how many 256-bit
   vpmaddwd (16 int16 MACs), vpmaddubsw (32 uint8 x int8 MACs) and vfmadd231ps (8 fp32 MACs)
   the core retires per nanosecond, from 12 independent instructions per loop turn. With "avx512"
   as the third argument also the 512-bit vfmadd231ps (16 fp32 MACs), and with "vnni" the 512-bit
   vpdpbusd (64 uint8 x int8 MACs, accumulated into int32: what XNNPACK's VNNI kernels use); the
   caller passes them only where /proc/cpuinfo lists avx512f / avx512_vnni (else SIGILL). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define R12(op) op " %%ymm0\n\t" op " %%ymm1\n\t" op " %%ymm2\n\t" op " %%ymm3\n\t" op " %%ymm4\n\t" \
  op " %%ymm5\n\t" op " %%ymm6\n\t" op " %%ymm7\n\t" op " %%ymm8\n\t" op " %%ymm9\n\t" op " %%ymm10\n\t" \
  op " %%ymm11\n\t"
#define R12Z(op) op " %%zmm0\n\t" op " %%zmm1\n\t" op " %%zmm2\n\t" op " %%zmm3\n\t" op " %%zmm4\n\t" \
  op " %%zmm5\n\t" op " %%zmm6\n\t" op " %%zmm7\n\t" op " %%zmm8\n\t" op " %%zmm9\n\t" op " %%zmm10\n\t" \
  op " %%zmm11\n\t"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
  "xmm11", "xmm14", "xmm15", "cc"
#define LOOP(name, body) static double name(long n) { double t0 = now(); \
  __asm__ volatile("vzeroall\n\t1:\n\t" body "dec %0\n\tjnz 1b\n\tvzeroupper" : "+r"(n) :: CLOBBER); \
  return now() - t0; }
LOOP(run_madd_wd, R12("vpmaddwd %%ymm15, %%ymm14,"))
LOOP(run_madd_ubsw, R12("vpmaddubsw %%ymm15, %%ymm14,"))
LOOP(run_fma, R12("vfmadd231ps %%ymm15, %%ymm14,"))
LOOP(run_fma512, R12Z("vfmadd231ps %%zmm15, %%zmm14,"))
LOOP(run_dpbusd512, R12Z("vpdpbusd %%zmm15, %%zmm14,"))
static double run_adds(long n) { double t0 = now();
  __asm__ volatile("1:\n\tadd $1, %%rax\n\tadd $1, %%rax\n\tadd $1, %%rax\n\tadd $1, %%rax\n\t"
                   "add $1, %%rax\n\tadd $1, %%rax\n\tadd $1, %%rax\n\tadd $1, %%rax\n\tdec %0\n\tjnz 1b"
                   : "+r"(n) :: "rax", "cc");
  return now() - t0; }
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 2000000;
  int reps = argc > 2 ? atoi(argv[2]) : 30;
  int avx512 = argc > 3 && strstr(argv[3], "avx512") != NULL, vnni = argc > 3 && strstr(argv[3], "vnni") != NULL;
  double clock = 0, wd = 0, ubsw = 0, fma = 0, fma512 = 0, dpbusd512 = 0, r;
  /* Many short runs, best of each: on a shared machine another job takes the core now and then,
     and a run it interrupted reads slow; the fastest run is the one it did not. */
  for (int rep = 0; rep < reps; rep++) {
    if ((r = 8.0 * n / run_adds(n) / 1e9) > clock) clock = r;
    if ((r = 12.0 * n / run_madd_wd(n) / 1e9) > wd) wd = r;
    if ((r = 12.0 * n / run_madd_ubsw(n) / 1e9) > ubsw) ubsw = r;
    if ((r = 12.0 * n / run_fma(n) / 1e9) > fma) fma = r;
    if (avx512 && (r = 12.0 * n / run_fma512(n) / 1e9) > fma512) fma512 = r;
    if (vnni && (r = 12.0 * n / run_dpbusd512(n) / 1e9) > dpbusd512) dpbusd512 = r;
  }
  printf("{\"clock_ghz\": %.3f, \"vpmaddwd_per_ns\": %.3f, \"vpmaddubsw_per_ns\": %.3f, \"vfmadd231ps_per_ns\": %.3f",
         clock, wd, ubsw, fma);
  if (avx512) printf(", \"vfmadd231ps_zmm_per_ns\": %.3f", fma512);
  if (vnni) printf(", \"vpdpbusd_zmm_per_ns\": %.3f", dpbusd512);
  printf("}\n");
  return 0;
}
