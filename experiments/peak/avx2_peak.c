// Per-core peak of the AVX2 micro kernel's inner operation (vpmaddubsw + vpaddw) and of fp32 FMA (issue 17):
//   gcc -O2 -o /tmp/avx2_peak experiments/peak/avx2_peak.c && /tmp/avx2_peak
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
__attribute__((target("avx2,fma"))) int main(){
  __m256i a0=_mm256_setzero_si256(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0,a8=a0,a9=a0,a10=a0,a11=a0;
  __m256i u0=_mm256_set1_epi8(3),u1=_mm256_set1_epi8(2);
  __m256i x0=_mm256_set1_epi8(5),x1=_mm256_set1_epi8(6),x2=_mm256_set1_epi8(7),x3=_mm256_set1_epi8(8),x4=_mm256_set1_epi8(9),x5=_mm256_set1_epi8(10);
  long N=300000000/12;
  double t=now();
  for(long n=0;n<N;n++){
    __asm__ volatile("" : "+x"(u0),"+x"(u1));
    a0=_mm256_add_epi16(a0,_mm256_maddubs_epi16(u0,x0)); a1=_mm256_add_epi16(a1,_mm256_maddubs_epi16(u1,x0));
    a2=_mm256_add_epi16(a2,_mm256_maddubs_epi16(u0,x1)); a3=_mm256_add_epi16(a3,_mm256_maddubs_epi16(u1,x1));
    a4=_mm256_add_epi16(a4,_mm256_maddubs_epi16(u0,x2)); a5=_mm256_add_epi16(a5,_mm256_maddubs_epi16(u1,x2));
    a6=_mm256_add_epi16(a6,_mm256_maddubs_epi16(u0,x3)); a7=_mm256_add_epi16(a7,_mm256_maddubs_epi16(u1,x3));
    a8=_mm256_add_epi16(a8,_mm256_maddubs_epi16(u0,x4)); a9=_mm256_add_epi16(a9,_mm256_maddubs_epi16(u1,x4));
    a10=_mm256_add_epi16(a10,_mm256_maddubs_epi16(u0,x5)); a11=_mm256_add_epi16(a11,_mm256_maddubs_epi16(u1,x5));
    __asm__ volatile("" : "+x"(a0),"+x"(a1),"+x"(a2),"+x"(a3),"+x"(a4),"+x"(a5),"+x"(a6),"+x"(a7),"+x"(a8),"+x"(a9),"+x"(a10),"+x"(a11));
  }
  double dt=now()-t;
  __m256i s=_mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(a0,a1),_mm256_add_epi16(a2,a3)),_mm256_add_epi16(_mm256_add_epi16(a4,a5),_mm256_add_epi16(a6,a7)));
  s=_mm256_add_epi16(s,_mm256_add_epi16(_mm256_add_epi16(a8,a9),_mm256_add_epi16(a10,a11)));
  printf("maddubs(+add)/ns: %.2f chk %d\n", N*12/dt*1e-9, _mm256_extract_epi16(s,0));
  __m256 f0=_mm256_set1_ps(0),f1=f0,f2=f0,f3=f0,f4=f0,f5=f0,f6=f0,f7=f0,f8=f0,f9=f0,f10=f0,f11=f0;
  __m256 b0=_mm256_set1_ps(1e-3f),b1=_mm256_set1_ps(2e-3f),c0=_mm256_set1_ps(1e-4f),c1=_mm256_set1_ps(2e-4f),c2=c0,c3=c1,c4=c0,c5=c1;
  t=now();
  for(long n=0;n<N;n++){
    __asm__ volatile("" : "+x"(b0),"+x"(b1));
    f0=_mm256_fmadd_ps(b0,c0,f0); f1=_mm256_fmadd_ps(b1,c0,f1); f2=_mm256_fmadd_ps(b0,c1,f2); f3=_mm256_fmadd_ps(b1,c1,f3);
    f4=_mm256_fmadd_ps(b0,c2,f4); f5=_mm256_fmadd_ps(b1,c2,f5); f6=_mm256_fmadd_ps(b0,c3,f6); f7=_mm256_fmadd_ps(b1,c3,f7);
    f8=_mm256_fmadd_ps(b0,c4,f8); f9=_mm256_fmadd_ps(b1,c4,f9); f10=_mm256_fmadd_ps(b0,c5,f10); f11=_mm256_fmadd_ps(b1,c5,f11);
    __asm__ volatile("" : "+x"(f0),"+x"(f1),"+x"(f2),"+x"(f3),"+x"(f4),"+x"(f5),"+x"(f6),"+x"(f7),"+x"(f8),"+x"(f9),"+x"(f10),"+x"(f11));
  }
  dt=now()-t;
  printf("fma/ns: %.2f chk %g\n", N*12/dt*1e-9, f0[0]+f11[0]);
}
