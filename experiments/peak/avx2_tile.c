// The AVX2 micro kernel (nasq_kernels.cc dot_tile_avx2_b4) in a bare C harness, data in L1 (issue 17):
//   gcc -O3 -o /tmp/avx2_tile experiments/peak/avx2_tile.c && /tmp/avx2_tile KP TOKENS PANELS   (e.g. 384 8 1)
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static inline int32_t load4(const int8_t* p){int32_t v; memcpy(&v,p,4); return v;}
#define PIN(...) __asm__ volatile("" : "+x"(c00),"+x"(c01),"+x"(c10),"+x"(c11),"+x"(c20),"+x"(c21),"+x"(c30),"+x"(c31))
__attribute__((target("avx2"),noinline)) static void tile(const int8_t* x, int64_t Kp, const uint8_t* panel, int32_t* out){
  const int kMR=4,kNR=16,kChunk=8; const __m256i ones=_mm256_set1_epi16(1);
  const int8_t *x0=x,*x1=x+Kp,*x2=x+2*Kp,*x3=x+3*Kp;
  __m256i acc[4][2]; for(int i=0;i<4;i++) acc[i][0]=acc[i][1]=_mm256_setzero_si256();
  for(int64_t s0=0;s0<Kp/4;s0+=kChunk){
    __m256i c00=_mm256_setzero_si256(),c01=c00,c10=c00,c11=c00,c20=c00,c21=c00,c30=c00,c31=c00;
#pragma GCC unroll 8
    for(int j=0;j<kChunk;++j){ const int64_t s=s0+j; const uint8_t* p=panel+s*(kNR*4);
      const __m256i u0=_mm256_loadu_si256((const __m256i*)p), u1=_mm256_loadu_si256((const __m256i*)(p+32));
      __m256i xb=_mm256_set1_epi32(load4(x0+4*s)); c00=_mm256_add_epi16(c00,_mm256_maddubs_epi16(u0,xb)); c01=_mm256_add_epi16(c01,_mm256_maddubs_epi16(u1,xb));
      xb=_mm256_set1_epi32(load4(x1+4*s)); c10=_mm256_add_epi16(c10,_mm256_maddubs_epi16(u0,xb)); c11=_mm256_add_epi16(c11,_mm256_maddubs_epi16(u1,xb));
      xb=_mm256_set1_epi32(load4(x2+4*s)); c20=_mm256_add_epi16(c20,_mm256_maddubs_epi16(u0,xb)); c21=_mm256_add_epi16(c21,_mm256_maddubs_epi16(u1,xb));
      xb=_mm256_set1_epi32(load4(x3+4*s)); c30=_mm256_add_epi16(c30,_mm256_maddubs_epi16(u0,xb)); c31=_mm256_add_epi16(c31,_mm256_maddubs_epi16(u1,xb));
      PIN(); }
    acc[0][0]=_mm256_add_epi32(acc[0][0],_mm256_madd_epi16(c00,ones)); acc[0][1]=_mm256_add_epi32(acc[0][1],_mm256_madd_epi16(c01,ones));
    acc[1][0]=_mm256_add_epi32(acc[1][0],_mm256_madd_epi16(c10,ones)); acc[1][1]=_mm256_add_epi32(acc[1][1],_mm256_madd_epi16(c11,ones));
    acc[2][0]=_mm256_add_epi32(acc[2][0],_mm256_madd_epi16(c20,ones)); acc[2][1]=_mm256_add_epi32(acc[2][1],_mm256_madd_epi16(c21,ones));
    acc[3][0]=_mm256_add_epi32(acc[3][0],_mm256_madd_epi16(c30,ones)); acc[3][1]=_mm256_add_epi32(acc[3][1],_mm256_madd_epi16(c31,ones));
  }
  for(int i=0;i<4;i++) for(int h=0;h<2;h++) _mm256_storeu_si256((__m256i*)(out+i*16+8*h),acc[i][h]);
}
int main(int argc,char**argv){
  int64_t Kp=atoi(argv[1]); int64_t MC=atoi(argv[2]); int npan=atoi(argv[3]);
  int8_t* x=aligned_alloc(64,MC*Kp); uint8_t* pan=aligned_alloc(64,Kp*16*npan); int32_t out[64];
  for(int64_t i=0;i<MC*Kp;i++) x[i]=(int8_t)(i*7); for(int64_t i=0;i<Kp*16*npan;i++) pan[i]=(uint8_t)(i%16);
  long reps = 2000000000L/(MC*Kp*16*npan)+1; long sum=0;
  double t=now();
  for(long r=0;r<reps;r++) for(int q=0;q<npan;q++) for(int64_t m=0;m<MC;m+=4){ tile(x+m*Kp,Kp,pan+q*Kp*16,out); sum+=out[5]; }
  double dt=now()-t; double macs=(double)reps*npan*MC*Kp*16;
  printf("Kp %ld MC %ld panels %d: %.1f GMAC/s (maddubs/ns %.2f) %ld\n",Kp,MC,npan,macs/dt/1e9,macs/32/dt/1e9,sum&1);
}
