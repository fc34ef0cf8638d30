// nasq native CPU kernels: integer GEMM of int8 activations with bit-packed weights, for XLA (FFI) and ctypes.
//
// WHAT IS COMPUTED (one "segment" of a linear layer: all its rows packed at one bit width b):
//
//   x      int8  [M, K]                    activations, already quantized per token
//   w      uint8 [N, ceil(K*b/8)]          packed weight codes (layout below), one row per output feature
//   acc    int32 [M, N]   acc[m,n] = sum_k x[m,k] * code[n,k]                     (exact integer result)
//   y      fp32  [M, N]   y[m,n]   = float(acc[m,n]) * sx[m] * row_scale[n] (+ bias[n])   (fused epilogue)
//
// The int32 variant exists for exactness tests; the fused one is what the model runs (the int32 matrix never
// goes through memory). The fp32 epilogue is evaluated like XLA's CPU code for
// `acc.astype(f32) * sx * row_scale + bias`: t = float(acc) * sx[m], then fma(t, row_scale[n], bias[n])
// (XLA contracts the multiply-add into one FMA), or t * row_scale[n] without bias; no other contraction
// (build with -ffp-contract=off).
//
// WEIGHT LAYOUT (nasq/quant/packing.py, "dense packing"): each row is a little-endian bitstream; code j of a
// row occupies stream bits [j*b, (j+1)*b), stream bit k is bit k%8 of byte k//8; a row takes ceil(K*b/8)
// bytes (last byte zero padded). Codes are b-bit two's complement for b >= 2; for b == 1 the bit 1 means +1
// and 0 means -1. Hence 8 consecutive codes ("a group") fill exactly b bytes, starting at byte g*b for group
// g. For b in {1, 2, 4, 8} this is the byte-aligned layout (code j of a byte at bits [j*b, (j+1)*b)).
//
// THE OFFSET TRICK (why the weights become unsigned bytes). The fast instructions multiply unsigned by signed
// bytes (AVX512-VNNI vpdpbusd: u8 x s8, 4 products summed into an int32, no saturation). Every b-bit code is
// shifted into an unsigned byte u = code + o with a per-width offset o:
//
//   b >= 2:  o = 2^(b-1),  u = field XOR o           (field = the b stored bits; u in [0, 2^b))
//   b == 1:  o = 1,        u = 2 * field             (code -1 -> u 0, code +1 -> u 2)
//
// so that   acc[m,n] = sum_k x[m,k] * (u[n,k] - o) = dot(x[m], u[n]) - o * xsum[m],   xsum[m] = sum_k x[m,k].
//
// xsum is computed once per token when x is copied (below). Everything is exact: u <= 255, |x| <= 128, and
// int32 arithmetic wraps modulo 2^32, so the result equals the int64 sum whenever that sum fits in int32 (the
// same condition as for XLA's int32 dot).
//
// PANELS (the only unpacked copy of the weights: one small block per thread, sized for L2). NR consecutive
// weight rows (NR = the int32 lanes of two vectors: 32 for AVX-512, 16 otherwise) are unpacked to u and
// interleaved by 4 codes:
//
//   panel[((k4 * planes + p) * NR + n) * 4 + t] = plane p of u[n, 4*k4 + t]       n < NR, t < 4, k4 < Kp/4
//
// The 4 bytes of int32 lane n hold 4 consecutive codes of weight row n; broadcasting 4 bytes of x[m] to all
// lanes and multiplying bytewise (vpdpbusd, or vpmaddubsw + vpmaddwd) adds x[m] . u[n] over those 4 codes
// into lane n. So a micro tile of MR tokens x NR weight rows keeps MR x 2 vector accumulators, one per (token,
// half of the panel), and needs no horizontal sums. planes = 1 (the bytes u), or 2 on the AVX2 path for
// b > 4: the low and high nibbles of u (u = lo + 16 * hi) so that vpmaddubsw stays exact (dot_tile_avx2).
//
// HOW (one call):
//   1. x is copied into a zero-padded buffer xp [Mp, Kp] (Mp = M rounded up to MR, Kp = K rounded up to 64)
//      and xsum is computed. Zero padding makes every loop run over whole vectors; the values of u past K
//      are then irrelevant (multiplied by 0).
//   2. The N output rows are split statically into one contiguous range of panels per thread (a small
//      persistent pool; the calling thread works too).
//   3. Each thread unpacks a block of panels (kPanelBlockBytes) and, for blocks of MC tokens (kXBlockBytes,
//      the xp block stays in L2), runs the ISA's micro kernel on each MR x NR tile: int32 dot products.
//   4. The epilogue applies the offset correction and writes int32 or fused fp32 outputs.
//
// ISA PATHS (chosen at run time; each function carries its own target attribute, so this file compiles with
// plain -O3 on any x86-64, and on other CPUs only the scalar path is compiled):
//   avx512-vnni  vpdpbusd (u8 x s8 -> int32, exact for any u8), 8 x 32 tiles; BMI2 pdep to unpack
//   avx2         vpmaddubsw (u8 x s8 -> int16 pair sums; it saturates in general, but is exact for u <= 15:
//                b <= 4 directly, b > 4 as two nibble planes), 8 steps summed in int16, then vpmaddwd into
//                int32; 4 x 16 tiles (2 x 16 with two planes); BMI2 pdep to unpack; FMA in the epilogue
//   scalar       plain C++ (int64 sums), 4 x 16 tiles
//
// A LAYER IN ONE CALL: a mixed-width layer is several segments (one per bit width). run_segments does steps
// 1-4 once for all of them: x is copied and summed once, and the panels of every segment are split over the
// threads together; each segment writes its columns of the one output (row stride = the layer's width).
//
// A WHOLE LINEAR IN ONE CALL (NasqLinearF32, what the model runs): step 1 also quantizes fp32 x per token
// (quantize_row: scale = absmax * (1 / 127), as quantize_act_int8 computes it, or 1 for an all-zero token; code = clip(round_half_even(x / scale),
// -127, 127), bit for bit nasq.quant.quantizer.quantize_act_int8 for finite x), and the epilogue writes each
// kept row's outputs straight to its column of the layer (out_cols), zeros at pruned rows: no XLA
// quantization, gather or scatter around the call.
//
// EXPORTS: four XLA FFI handlers (NasqIntGemmS32, NasqIntGemmF32, NasqIntLinearSegmentsF32 for a whole
// layer's kept rows, NasqLinearF32 for a whole linear; compiled unless NASQ_NO_FFI) and a small C ABI (nasq_*) used by ctypes: information, thread count,
// and the same GEMMs on raw pointers (tests).
//
// TEST-ONLY BUILD: -DNASQ_SIMDE compiles the x86 paths against SIMDe's portable emulation of the intrinsics
// (headers from Debian's libsimde-dev), so the AVX-512 code can be checked for exactness on a CPU without it.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#include <unistd.h>
#endif

#if defined(NASQ_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#if !defined(_MM_FROUND_NO_EXC)  // SIMDe's native aliases leave out the rounding-mode constants
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#define NASQ_X86 1
#define NASQ_TARGET(features)
#elif defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NASQ_X86 1
#define NASQ_TARGET(features) __attribute__((target(features)))
#else
#define NASQ_X86 0
#endif

// An empty asm that takes the 8 given vectors in (and out of) registers: the compiler must have each one in a
// register at that point, so it can neither reassociate sums across it nor keep them on the stack. A no-op in
// the emulated build (SIMDe's vectors are structs).
#if NASQ_X86 && !defined(NASQ_SIMDE) && defined(__GNUC__)
#define NASQ_IN_REGISTERS(a, b, c, d, e, f, g, h) \
  asm("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d), "+x"(e), "+x"(f), "+x"(g), "+x"(h))
#else
#define NASQ_IN_REGISTERS(a, b, c, d, e, f, g, h)
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "nasq_kernels.cc reads packed rows as little-endian words"
#endif

namespace nasq {

// Bump when the C ABI or the FFI signatures change (Python refuses a library with another version).
constexpr int kAbiVersion = 6;

enum Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512Vnni = 3, kAvxVnni = 4 };
constexpr int kLastIsa = kAvxVnni;

constexpr int kMaxMR = 8;                        // largest micro tile: 8 tokens ...
constexpr int kMaxNR = 32;                       // ... x 32 weight rows (AVX-512)
constexpr int64_t kKAlign = 64;                  // K is padded to whole 64-byte vectors
constexpr int64_t kPanelBlockBytes = 96 << 10;   // unpacked panels per thread and block (L2)
constexpr int64_t kXBlockBytes = 192 << 10;      // tokens of xp reused against one panel block (L2)
constexpr int64_t kMinParallelMacs = int64_t{1} << 20;  // below this many multiply-adds: one thread

static int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// K padded to whole vectors (xp rows and panels use it).
static int64_t padded_k(int64_t K) { return std::max<int64_t>(kKAlign, round_up(K, kKAlign)); }

// ------------------------------------------------------------------------------------------- CPU features

static bool cpu_has(Isa isa) {
  switch (isa) {
    case kScalar:
      return true;
#if defined(NASQ_SIMDE)
    case kAvx2:
    case kAvx512Vnni:
    case kAvxVnni:
      return true;  // emulated
#elif NASQ_X86
    case kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("fma");
    case kAvx512Vnni:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("fma");
    case kAvxVnni:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

static Isa best_isa() {
  if (cpu_has(kAvx512Vnni)) return kAvx512Vnni;
  if (cpu_has(kAvxVnni)) return kAvxVnni;
  if (cpu_has(kAvx2)) return kAvx2;
  return kScalar;
}

// ------------------------------------------------------------------------------------------- buffers

// Grow-only 64-byte aligned byte buffer (one per thread: no allocation, no page faults in steady state).
class AlignedBuffer {
 public:
  ~AlignedBuffer() { std::free(data_); }
  uint8_t* get(int64_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = round_up(std::max<int64_t>(bytes, 4096), 64);
      data_ = static_cast<uint8_t*>(std::aligned_alloc(64, static_cast<size_t>(size_)));
      if (data_ == nullptr) {
        size_ = 0;
        throw std::bad_alloc();
      }
    }
    return data_;
  }

 private:
  uint8_t* data_ = nullptr;
  int64_t size_ = 0;
};

// ------------------------------------------------------------------------------------------- unpacking

// The 8 codes of group g of a packed row (stream bits [8*b*g, 8*b*(g+1))) as the low 8*b bits of a uint64.
static inline uint64_t load_group(const uint8_t* row, int64_t row_bytes, int b, int64_t g) {
  const int64_t start = g * b;
  uint64_t word = 0;
  if (start + 8 <= row_bytes)
    std::memcpy(&word, row + start, 8);  // one load (may read bytes of the next groups: masked below)
  else
    std::memcpy(&word, row + start, static_cast<size_t>(row_bytes - start));  // end of the row
  return b == 8 ? word : word & ((uint64_t{1} << (8 * b)) - 1);
}

// 0x0101...01 * v: v repeated in each of the 8 bytes of a uint64.
static constexpr uint64_t bytes_of(uint64_t v) { return v * 0x0101010101010101ULL; }

// Fields (one per byte) -> unsigned values u = code + offset (header comment).
static inline uint64_t offset_fields(uint64_t fields, int b) {
  return b == 1 ? fields << 1 : fields ^ bytes_of(uint64_t{1} << (b - 1));
}

// The code offset o of width b (u = code + o).
static inline int32_t code_offset(int b) { return b == 1 ? 1 : 1 << (b - 1); }

// Spread the 8 b-bit fields of `word` into the 8 bytes of the result (field j -> byte j), portable version.
static inline uint64_t spread_fields(uint64_t word, int b) {
  const uint64_t mask = (uint64_t{1} << b) - 1;
  uint64_t out = 0;
  for (int j = 0; j < 8; ++j) out |= ((word >> (j * b)) & mask) << (8 * j);
  return out;
}

// One packed row -> u[k] = code k + offset, for k < 8 * ceil(K / 8) (8 codes per group).
using UnpackRowFn = void (*)(const uint8_t* row, int64_t row_bytes, int b, int64_t K, uint8_t* u);

static void unpack_row_portable(const uint8_t* row, int64_t row_bytes, int b, int64_t K, uint8_t* u) {
  for (int64_t g = 0; g < (K + 7) / 8; ++g) {
    const uint64_t v = offset_fields(spread_fields(load_group(row, row_bytes, b, g), b), b);
    std::memcpy(u + 8 * g, &v, 8);
  }
}

#if NASQ_X86
// Same, with BMI2 pdep spreading the 8 fields in one instruction (mask: the b low bits of every byte).
NASQ_TARGET("bmi2")
static void unpack_row_bmi2(const uint8_t* row, int64_t row_bytes, int b, int64_t K, uint8_t* u) {
#if defined(NASQ_SIMDE)
  unpack_row_portable(row, row_bytes, b, K, u);  // SIMDe has no pdep
#else
  const uint64_t byte_mask = bytes_of((uint64_t{1} << b) - 1);
  for (int64_t g = 0; g < (K + 7) / 8; ++g) {
    const uint64_t v = offset_fields(_pdep_u64(load_group(row, row_bytes, b, g), byte_mask), b);
    std::memcpy(u + 8 * g, &v, 8);
  }
#endif
}
#endif

// Unpack weight rows [0, rows) of w (rows <= nr) into one panel (layout: header comment); panel rows past
// `rows` are zero. `row_u`: scratch of Kp bytes.
static void unpack_panel(const uint8_t* w, int64_t row_bytes, int b, int64_t K, int64_t Kp, int64_t rows, int nr,
                         int planes, UnpackRowFn unpack_row, uint8_t* row_u, uint8_t* panel) {
  const int64_t steps = Kp / 4;
  const int64_t unpacked = 8 * ((K + 7) / 8);
  for (int64_t n = 0; n < nr; ++n) {
    if (n < rows) {
      unpack_row(w + n * row_bytes, row_bytes, b, K, row_u);
      std::memset(row_u + unpacked, 0, static_cast<size_t>(Kp - unpacked));
    } else {
      std::memset(row_u, 0, static_cast<size_t>(Kp));
    }
    for (int64_t s = 0; s < steps; ++s) {
      uint32_t v;
      std::memcpy(&v, row_u + 4 * s, 4);
      if (planes == 1) {
        std::memcpy(panel + (s * nr + n) * 4, &v, 4);
      } else {  // nibble planes: u = lo + 16 * hi
        const uint32_t lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
        std::memcpy(panel + ((2 * s) * nr + n) * 4, &lo, 4);
        std::memcpy(panel + ((2 * s + 1) * nr + n) * 4, &hi, 4);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- micro kernels
//
// dot_tile(x, Kp, panel, out): out[i * NR + n] = sum_{k < Kp} x[i * Kp + k] * u[n, k]  (int32, wrapping)
// for the kernel's MR tokens (rows of xp, stride Kp) and the NR weight rows of one panel.

using DotTileFn = void (*)(const int8_t* x, int64_t Kp, const uint8_t* panel, int32_t* out);

// 4 bytes of x as one int32 (to broadcast to every lane).
static inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

static void dot_tile_scalar(const int8_t* x, int64_t Kp, const uint8_t* panel, int32_t* out) {
  constexpr int kMR = 4, kNR = 16;
  for (int i = 0; i < kMR; ++i) {
    for (int n = 0; n < kNR; ++n) {
      int64_t s = 0;
      for (int64_t k = 0; k < Kp; ++k) s += int64_t{panel[((k / 4) * kNR + n) * 4 + k % 4]} * x[i * Kp + k];
      out[i * kNR + n] = static_cast<int32_t>(static_cast<uint32_t>(s));
    }
  }
}

#if NASQ_X86
// AVX2, 16 weight rows (two vectors of 8 int32 lanes) x kMR tokens. vpmaddubsw multiplies u8 by s8 and adds
// adjacent pairs into int16 with saturation; with every u <= 15 (b <= 4, or a nibble plane) a pair sum is at
// most 2 * 15 * 128 = 3840 in magnitude, and 8 of them (kChunk steps) at most 30720 < 2^15: exact. Every
// kChunk steps vpmaddwd (with 1, or 16 for the high nibble plane) adds the int16 pairs into int32 lanes.
template <int kPlanes>
NASQ_TARGET("avx2")
static void dot_tile_avx2(const int8_t* x, int64_t Kp, const uint8_t* panel, int32_t* out) {
  constexpr int kMR = 4 / kPlanes;  // 16 ymm registers: kMR * kPlanes * 2 int16 sums + 2 * kPlanes weights
  constexpr int kNR = 16;
  constexpr int64_t kChunk = 8;
  const __m256i ones = _mm256_set1_epi16(1), sixteens = _mm256_set1_epi16(16);
  alignas(32) int32_t acc[kMR * kNR] = {};
  for (int64_t s0 = 0; s0 < Kp / 4; s0 += kChunk) {
    __m256i sum16[kMR][kPlanes][2];
    for (auto& a : sum16)
      for (auto& b : a)
        for (auto& c : b) c = _mm256_setzero_si256();
    const int64_t s1 = std::min(Kp / 4, s0 + kChunk);
    for (int64_t s = s0; s < s1; ++s) {
      const uint8_t* p = panel + s * (kPlanes * kNR * 4);
      __m256i u[kPlanes][2];
      for (int pl = 0; pl < kPlanes; ++pl)
        for (int h = 0; h < 2; ++h)
          u[pl][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (pl * kNR + 8 * h) * 4));
      for (int i = 0; i < kMR; ++i) {
        const __m256i xb = _mm256_set1_epi32(load4(x + i * Kp + 4 * s));
        for (int pl = 0; pl < kPlanes; ++pl)
          for (int h = 0; h < 2; ++h)
            sum16[i][pl][h] = _mm256_add_epi16(sum16[i][pl][h], _mm256_maddubs_epi16(u[pl][h], xb));
      }
      if constexpr (kPlanes == 2)  // 2 tokens x 2 planes x 2 halves: see dot_tile_avx2_b4
        NASQ_IN_REGISTERS(sum16[0][0][0], sum16[0][0][1], sum16[0][1][0], sum16[0][1][1], sum16[1][0][0],
                          sum16[1][0][1], sum16[1][1][0], sum16[1][1][1]);
    }
    for (int i = 0; i < kMR; ++i) {
      for (int h = 0; h < 2; ++h) {
        __m256i v = _mm256_madd_epi16(sum16[i][0][h], ones);
        if constexpr (kPlanes == 2) v = _mm256_add_epi32(v, _mm256_madd_epi16(sum16[i][1][h], sixteens));
        __m256i* a = reinterpret_cast<__m256i*>(acc + i * kNR + 8 * h);
        _mm256_store_si256(a, _mm256_add_epi32(_mm256_load_si256(a), v));
      }
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

// The same for b <= 4 (one plane), written out so that the 8 int16 sums stay in registers: GCC compiles the
// generic template above with them on the stack (perf annotate: stack stores and loads in the inner loop).
// Kp / 4 is a multiple of 16 (kKAlign), so every chunk is a full kChunk steps, unrolled.
NASQ_TARGET("avx2")
static void dot_tile_avx2_b4(const int8_t* x, int64_t Kp, const uint8_t* panel, int32_t* out) {
  constexpr int kMR = 4, kNR = 16, kChunk = 8;
  static_assert(kKAlign % (4 * kChunk) == 0, "whole chunks");
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x0 = x;
  const int8_t* x1 = x + Kp;
  const int8_t* x2 = x + 2 * Kp;
  const int8_t* x3 = x + 3 * Kp;
  __m256i acc[kMR][2];
  for (auto& a : acc) a[0] = a[1] = _mm256_setzero_si256();
  for (int64_t s0 = 0; s0 < Kp / 4; s0 += kChunk) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
#pragma GCC unroll 8
    for (int j = 0; j < kChunk; ++j) {
      const int64_t s = s0 + j;
      const uint8_t* p = panel + s * (kNR * 4);
      const __m256i u0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i u1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      __m256i xb = _mm256_set1_epi32(load4(x0 + 4 * s));
      c00 = _mm256_add_epi16(c00, _mm256_maddubs_epi16(u0, xb));
      c01 = _mm256_add_epi16(c01, _mm256_maddubs_epi16(u1, xb));
      xb = _mm256_set1_epi32(load4(x1 + 4 * s));
      c10 = _mm256_add_epi16(c10, _mm256_maddubs_epi16(u0, xb));
      c11 = _mm256_add_epi16(c11, _mm256_maddubs_epi16(u1, xb));
      xb = _mm256_set1_epi32(load4(x2 + 4 * s));
      c20 = _mm256_add_epi16(c20, _mm256_maddubs_epi16(u0, xb));
      c21 = _mm256_add_epi16(c21, _mm256_maddubs_epi16(u1, xb));
      xb = _mm256_set1_epi32(load4(x3 + 4 * s));
      c30 = _mm256_add_epi16(c30, _mm256_maddubs_epi16(u0, xb));
      c31 = _mm256_add_epi16(c31, _mm256_maddubs_epi16(u1, xb));
      // Pin the sums to registers at every step: without this GCC reassociates the integer adds into one tree
      // per chunk, computes all 64 products first and spills them to the stack.
      NASQ_IN_REGISTERS(c00, c01, c10, c11, c20, c21, c30, c31);
    }
    acc[0][0] = _mm256_add_epi32(acc[0][0], _mm256_madd_epi16(c00, ones));
    acc[0][1] = _mm256_add_epi32(acc[0][1], _mm256_madd_epi16(c01, ones));
    acc[1][0] = _mm256_add_epi32(acc[1][0], _mm256_madd_epi16(c10, ones));
    acc[1][1] = _mm256_add_epi32(acc[1][1], _mm256_madd_epi16(c11, ones));
    acc[2][0] = _mm256_add_epi32(acc[2][0], _mm256_madd_epi16(c20, ones));
    acc[2][1] = _mm256_add_epi32(acc[2][1], _mm256_madd_epi16(c21, ones));
    acc[3][0] = _mm256_add_epi32(acc[3][0], _mm256_madd_epi16(c30, ones));
    acc[3][1] = _mm256_add_epi32(acc[3][1], _mm256_madd_epi16(c31, ones));
  }
  for (int i = 0; i < kMR; ++i)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * kNR + 8 * h), acc[i][h]);
}

// AVX512-VNNI, 32 weight rows (two vectors of 16 int32 lanes) x 8 tokens: vpdpbusd multiplies u8 by s8 and
// adds each group of 4 products into an int32 lane, without saturation (exact for any u8).
NASQ_TARGET("avx512f,avx512bw,avx512vnni")
static void dot_tile_vnni(const int8_t* x, int64_t Kp, const uint8_t* panel, int32_t* out) {
  constexpr int kMR = 8, kNR = 32;
  __m512i acc[kMR][2];
  for (auto& a : acc) a[0] = a[1] = _mm512_setzero_si512();
  for (int64_t s = 0; s < Kp / 4; ++s) {
    const uint8_t* p = panel + s * (kNR * 4);
    const __m512i u0 = _mm512_loadu_si512(reinterpret_cast<const void*>(p));  // loadu: resident panels may sit
    const __m512i u1 = _mm512_loadu_si512(reinterpret_cast<const void*>(p + 64));  // at any address
    for (int i = 0; i < kMR; ++i) {
      const __m512i xb = _mm512_set1_epi32(load4(x + i * Kp + 4 * s));
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], u0, xb);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], u1, xb);
    }
  }
  for (int i = 0; i < kMR; ++i) {
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i * kNR), acc[i][0]);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i * kNR + 16), acc[i][1]);
  }
}

// AVX-VNNI (the VEX-encoded vpdpbusd of AVX2-class cores: Intel Alder Lake and later, AMD Zen 5), 16 weight
// rows (two vectors of 8 int32 lanes) x 4 tokens, the AVX2 kernel's panels; like dot_tile_vnni, no int16 step.
#if defined(NASQ_SIMDE)
#define _mm256_dpbusd_avx_epi32 _mm256_dpbusd_epi32  // SIMDe emulates the AVX512VL form: the same operation
#endif
NASQ_TARGET("avx2,avxvnni")
static void dot_tile_avxvnni(const int8_t* x, int64_t Kp, const uint8_t* panel, int32_t* out) {
  constexpr int kMR = 4, kNR = 16;
  __m256i acc[kMR][2];
  for (auto& a : acc) a[0] = a[1] = _mm256_setzero_si256();
  for (int64_t s = 0; s < Kp / 4; ++s) {
    const uint8_t* p = panel + s * (kNR * 4);
    const __m256i u0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i u1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    for (int i = 0; i < kMR; ++i) {
      const __m256i xb = _mm256_set1_epi32(load4(x + i * Kp + 4 * s));
      acc[i][0] = _mm256_dpbusd_avx_epi32(acc[i][0], u0, xb);
      acc[i][1] = _mm256_dpbusd_avx_epi32(acc[i][1], u1, xb);
    }
  }
  for (int i = 0; i < kMR; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * kNR + 8 * h), acc[i][h]);
}
#endif

// ------------------------------------------------------------------------------------------- epilogue

struct Gemm {
  const int8_t* x;   // [M, K]
  const uint8_t* w;  // [N, row_bytes]
  int64_t M, N, K;
  int bits;
  int32_t* out_i32;        // [M, N], or null for the fused output
  float* out_f32;          // [M, N] fused: acc * sx[m] * row_scale[n] (+ bias[n])
  const float* sx;         // [M]
  const float* row_scale;  // [N]
  const float* bias;       // [N] or null
  int64_t ldo;             // output row stride (elements): N, or the whole layer's width for one segment of it
  const uint8_t* panels = nullptr;  // resident panels (nasq_prepack, same ISA) instead of w: no unpacking
  const float* xf = nullptr;        // fp32 input [M, K] instead of x: quantized per token inside (run_segments)
  const int32_t* out_cols = nullptr;  // [N]: output column of each row (ldo wide), instead of columns 0..N-1
};

template <int NR, typename T>
static inline __attribute__((always_inline)) void copy_row(T* dst, const T* src, size_t n) {
  if (n == NR)
    std::memcpy(dst, src, sizeof(T) * NR);  // the common case: a constant-size copy (vector stores)
  else
    std::memcpy(dst, src, sizeof(T) * n);
}

// Offset correction and output of one mr x NR tile at (m0, n0) from its dot products `dots` [mr, NR]; rows and
// columns past M, N are dropped. rs, bs: row_scale and bias of the tile's NR columns (zero padded).
// always_inline: compiled into each store_tile_* below with that function's instruction set (vectorized).
template <int NR>
static inline __attribute__((always_inline)) void store_tile_body(const Gemm& g, const int32_t* dots,
                                                                  const int32_t* xsum, int32_t offset,
                                                                  const float* rs, const float* bs, int64_t m0,
                                                                  int mr, int64_t n0) {
  const auto nr = static_cast<size_t>(std::min<int64_t>(NR, g.N - n0));
  const int32_t* cols = g.out_cols != nullptr ? g.out_cols + n0 : nullptr;
  for (int i = 0; i < mr && m0 + i < g.M; ++i) {
    const int64_t m = m0 + i;
    const uint32_t correction = static_cast<uint32_t>(offset) * static_cast<uint32_t>(xsum[m]);
    int32_t acc[NR];
    for (int n = 0; n < NR; ++n) acc[n] = static_cast<int32_t>(static_cast<uint32_t>(dots[i * NR + n]) - correction);
    if (g.out_i32 != nullptr) {  // (int32 outputs never take out_cols)
      copy_row<NR>(g.out_i32 + m * g.ldo + n0, acc, nr);
      continue;
    }
    float y[NR];
    const float s = g.sx[m];
    if (g.bias != nullptr) {
      // XLA's CPU compiler contracts `acc * sx * row_scale + bias` into fma(acc * sx, row_scale, bias): same here.
      for (int n = 0; n < NR; ++n) y[n] = std::fma(static_cast<float>(acc[n]) * s, rs[n], bs[n]);
    } else {
      for (int n = 0; n < NR; ++n) y[n] = static_cast<float>(acc[n]) * s * rs[n];
    }
    if (cols == nullptr) {
      copy_row<NR>(g.out_f32 + m * g.ldo + n0, y, nr);
    } else {
      for (size_t n = 0; n < nr; ++n) g.out_f32[m * g.ldo + cols[n]] = y[n];
    }
  }
}

using StoreTileFn = void (*)(const Gemm&, const int32_t*, const int32_t*, int32_t, const float*, const float*,
                             int64_t, int, int64_t);

template <int NR>
static void store_tile_portable(const Gemm& g, const int32_t* dots, const int32_t* xsum, int32_t offset,
                                const float* rs, const float* bs, int64_t m0, int mr, int64_t n0) {
  store_tile_body<NR>(g, dots, xsum, offset, rs, bs, m0, mr, n0);  // std::fma: a libm call without FMA
}

#if NASQ_X86
// AVX2 + FMA, NR = 16: whole tiles (every row < M, all 16 columns < N) in vector registers straight to the
// output, the rest through store_tile_body. The same operations in the same order as store_tile_body:
// float(acc) * s, then fma(., rs, bs), or (float(acc) * s) * rs without bias; bit-identical.
NASQ_TARGET("avx2,fma")
static void store_tile_avx2_16(const Gemm& g, const int32_t* dots, const int32_t* xsum, int32_t offset,
                               const float* rs, const float* bs, int64_t m0, int mr, int64_t n0) {
  int64_t c0 = n0;  // the output column of the tile's first row
  if (g.out_cols != nullptr && n0 + 16 <= g.N) {  // vector stores if its 16 rows have 16 adjacent columns
    const int32_t* cols = g.out_cols + n0;
    const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i first = _mm256_add_epi32(_mm256_set1_epi32(cols[0]), step);
    const __m256i e0 = _mm256_cmpeq_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols)), first);
    const __m256i e1 = _mm256_cmpeq_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + 8)),
                                          _mm256_add_epi32(first, _mm256_set1_epi32(8)));
    c0 = _mm256_movemask_epi8(_mm256_and_si256(e0, e1)) == -1 ? cols[0] : -1;
  }
  if (n0 + 16 > g.N || m0 + mr > g.M || c0 < 0) {
    store_tile_body<16>(g, dots, xsum, offset, rs, bs, m0, mr, n0);
    return;
  }
  const __m256 rs0 = _mm256_loadu_ps(rs), rs1 = _mm256_loadu_ps(rs + 8);
  const __m256 bs0 = _mm256_loadu_ps(bs), bs1 = _mm256_loadu_ps(bs + 8);
  for (int i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    const __m256i corr = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset) *
                                                                static_cast<uint32_t>(xsum[m])));
    const __m256i a0 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + i * 16)), corr);
    const __m256i a1 =
        _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + i * 16 + 8)), corr);
    if (g.out_i32 != nullptr) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.out_i32 + m * g.ldo + c0), a0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.out_i32 + m * g.ldo + c0 + 8), a1);
      continue;
    }
    const __m256 sv = _mm256_set1_ps(g.sx[m]);
    const __m256 t0 = _mm256_mul_ps(_mm256_cvtepi32_ps(a0), sv), t1 = _mm256_mul_ps(_mm256_cvtepi32_ps(a1), sv);
    float* y = g.out_f32 + m * g.ldo + c0;
    if (g.bias != nullptr) {
      _mm256_storeu_ps(y, _mm256_fmadd_ps(t0, rs0, bs0));
      _mm256_storeu_ps(y + 8, _mm256_fmadd_ps(t1, rs1, bs1));
    } else {
      _mm256_storeu_ps(y, _mm256_mul_ps(t0, rs0));
      _mm256_storeu_ps(y + 8, _mm256_mul_ps(t1, rs1));
    }
  }
}

template <int NR>
NASQ_TARGET("avx2,fma")
static void store_tile_fma(const Gemm& g, const int32_t* dots, const int32_t* xsum, int32_t offset,
                           const float* rs, const float* bs, int64_t m0, int mr, int64_t n0) {
  store_tile_body<NR>(g, dots, xsum, offset, rs, bs, m0, mr, n0);  // std::fma: vfmadd
}
#endif

// ------------------------------------------------------------------------------------------- activations

// One token of fp32 x [K] -> int8 codes in dst and its scale (header comment: quantize_act_int8, bit for bit
// for finite x); returns the sum of the codes (xsum).
using QuantizeRowFn = int32_t (*)(const float* x, int64_t K, int8_t* dst, float* scale);

static inline __attribute__((always_inline)) int32_t quantize_tail(const float* x, int64_t k0, int64_t K,
                                                                   float s, int8_t* dst) {
  int32_t sum = 0;
  for (int64_t k = k0; k < K; ++k) {
    const float q = std::min(std::max(std::nearbyint(x[k] / s), -127.0f), 127.0f);  // nearbyint: half to even
    dst[k] = static_cast<int8_t>(q);
    sum += dst[k];
  }
  return sum;
}

// absmax * float32(1 / 127), as quantize_act_int8 writes it (ACT_INV_QMAX; checked by the tests against it).
static inline float act_scale(float amax) {
  constexpr float kInv127 = 1.0f / 127.0f;
  return amax > 0.0f ? amax * kInv127 : 1.0f;
}

static int32_t quantize_row_portable(const float* x, int64_t K, int8_t* dst, float* scale) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  *scale = act_scale(amax);
  return quantize_tail(x, 0, K, *scale, dst);
}

#if NASQ_X86
// The same with 8 lanes: division, round to nearest even (vroundps), clamp, convert, pack to bytes.
NASQ_TARGET("avx2")
static int32_t quantize_row_avx2(const float* x, int64_t K, int8_t* dst, float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = act_scale(amax);
  *scale = s;
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the per-128-bit-lane packing
  __m256i vsum = _mm256_setzero_si256();
  for (k = 0; k + 32 <= K; k += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + k + 8 * j), vs);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
      vsum = _mm256_add_epi32(vsum, q[j]);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_permutevar8x32_epi32(bytes, order));
  }
  alignas(32) int32_t sums[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), vsum);
  int32_t sum = quantize_tail(x, k, K, s, dst);
  for (int32_t v : sums) sum += v;
  return sum;
}
#endif

static QuantizeRowFn quantize_row_for(Isa isa) {
#if NASQ_X86
  if (isa == kAvx2 || isa == kAvx512Vnni || isa == kAvxVnni) return quantize_row_avx2;
#endif
  (void)isa;
  return quantize_row_portable;
}

// ------------------------------------------------------------------------------------------- thread pool

static int default_num_threads() {
  if (const char* env = std::getenv("NASQ_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// An executor lent for the calls made on this thread: inside an FFI call, XLA's own intra-op thread pool
// (ffi::ThreadPool), so the kernel's tasks run on XLA's threads instead of competing with them for the cores
// (bench.md, 2026-11-30: with both pools, the whole 32 x 128 forward was faster with XLA's ops single-threaded).
struct Executor {
  void* ctx;
  void (*schedule)(void* ctx, std::function<void()> task);
};
static thread_local const Executor* tl_executor = nullptr;

// NASQ_XLA_POOL=0 (or nasq_set_xla_pool(0)): the kernel's own pool even inside XLA (for A/B benchmarks)
static std::atomic<int> g_xla_pool{[] {
  const char* env = std::getenv("NASQ_XLA_POOL");
  return env == nullptr || std::strcmp(env, "0") != 0 ? 1 : 0;
}()};
static bool use_xla_pool() { return g_xla_pool.load(std::memory_order_relaxed) != 0; }

// fn(0..n-1) on `ex` and the calling thread: tasks claim indices from a shared counter, so a task that starts
// late (its thread was busy) finds nothing left and returns; the caller waits only for claimed indices.
static void parallel_for_on(const Executor& ex, int n, const std::function<void(int)>& fn) {
  struct Shared {
    std::atomic<int> next{0}, done{0};
    int n = 0;
    const std::function<void(int)>* fn = nullptr;
  };
  auto st = std::make_shared<Shared>();
  st->n = n;
  st->fn = &fn;
  auto drain = [](Shared& s) {
    for (int i = s.next.fetch_add(1); i < s.n; i = s.next.fetch_add(1)) {
      (*s.fn)(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int t = 1; t < n; ++t) ex.schedule(ex.ctx, [st, drain] { drain(*st); });
  drain(*st);
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// A tiny persistent pool: parallel_for(n, fn) runs fn(0..n-1) on the workers and the calling thread and
// returns when all are done. One parallel_for at a time; a call that finds the pool busy (XLA may run two
// custom calls concurrently) runs its tasks serially on its own thread instead of waiting.
class ThreadPool {
 public:
  ~ThreadPool() { stop_workers(); }

  int num_threads() const { return num_threads_.load(); }

  void set_num_threads(int n) {
    std::lock_guard<std::mutex> run(run_mu_);
    stop_workers();
    num_threads_ = std::max(1, n);
  }

  void parallel_for(int n, const std::function<void(int)>& fn) {
    if (tl_executor != nullptr && n > 1) {
      parallel_for_on(*tl_executor, n, fn);
      return;
    }
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    if (!run.owns_lock() || n <= 1 || num_threads_ <= 1) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    start_workers();
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &fn;
      job_size_ = n;
      next_.store(0);
      busy_ = static_cast<int>(workers_->size());
      ++generation_;
    }
    work_cv_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void drain() {
    for (int i = next_.fetch_add(1); i < job_size_; i = next_.fetch_add(1)) (*job_)(i);
  }

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mu_);
      if (--busy_ == 0) done_cv_.notify_one();
    }
  }

  void start_workers() {  // under run_mu_
#if defined(__linux__)
    if (workers_ != nullptr && pid_ != getpid()) workers_ = nullptr;  // forked child: the threads are gone (leak)
    pid_ = getpid();
#endif
    if (workers_ != nullptr) return;
    stop_ = false;
    workers_ = new std::vector<std::thread>();
    for (int t = 1; t < num_threads_; ++t) workers_->emplace_back([this] { worker(); });
  }

  void stop_workers() {  // under run_mu_ (or at exit)
    if (workers_ == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : *workers_) t.join();
    delete workers_;
    workers_ = nullptr;
  }

  std::mutex run_mu_;  // held by the running parallel_for
  std::atomic<int> num_threads_{default_num_threads()};
  std::vector<std::thread>* workers_ = nullptr;
#if defined(__linux__)
  pid_t pid_ = 0;
#endif
  std::mutex mu_;  // guards the fields below
  std::condition_variable work_cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  int job_size_ = 0;
  std::atomic<int> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

static ThreadPool& pool() {
  static ThreadPool* p = new ThreadPool();  // never destroyed: workers may outlive static destruction order
  return *p;
}

// ------------------------------------------------------------------------------------------- the GEMM

// The pieces of one ISA path for one bit width.
struct IsaKernels {
  int mr, nr, planes;  // micro tile: mr tokens x nr weight rows; panel planes (1, or 2 nibble planes)
  DotTileFn dot_tile;
  UnpackRowFn unpack_row;
  StoreTileFn store_tile;
};

static IsaKernels kernels_for(Isa isa, int bits) {
  switch (isa) {
#if NASQ_X86
    case kAvx512Vnni:
      return {8, 32, 1, dot_tile_vnni, unpack_row_bmi2, store_tile_fma<32>};
    case kAvxVnni:  // the AVX2 b<=4 panel layout (one plane) at every width: vpdpbusd has no int16 step
      return {4, 16, 1, dot_tile_avxvnni, unpack_row_bmi2, store_tile_avx2_16};
    case kAvx2:
      if (bits <= 4) return {4, 16, 1, dot_tile_avx2_b4, unpack_row_bmi2, store_tile_avx2_16};
      return {2, 16, 2, dot_tile_avx2<2>, unpack_row_bmi2, store_tile_avx2_16};
#endif
    default:
      return {4, 16, 1, dot_tile_scalar, unpack_row_portable, store_tile_portable<16>};
  }
}

// The ISA a request (0 = auto) runs: 0 and *isa set, or 3 (unknown code) / 4 (the CPU lacks it).
static int resolve_isa(int isa_request, Isa* isa) {
  *isa = isa_request == kAuto ? best_isa() : static_cast<Isa>(isa_request);
  if (*isa < kScalar || *isa > kLastIsa) return 3;
  return cpu_has(*isa) ? 0 : 4;
}

// Output columns [n0, n1) (n0 a multiple of kern.nr) for all tokens.
static void gemm_columns(const Gemm& g, const IsaKernels& kern, const int8_t* xp, const int32_t* xsum,
                         int64_t Mp, int64_t Kp, int64_t n0, int64_t n1) {
  static thread_local AlignedBuffer panel_buf, row_buf;
  const int64_t row_bytes = (g.K * g.bits + 7) / 8;
  const int32_t offset = code_offset(g.bits);
  const int64_t panel_bytes = Kp * kern.nr * kern.planes;
  const int64_t block_panels = std::max<int64_t>(1, kPanelBlockBytes / panel_bytes);
  const int64_t MC = std::max<int64_t>(kern.mr, kXBlockBytes / Kp / kern.mr * kern.mr);
  uint8_t* panels = g.panels != nullptr ? nullptr : panel_buf.get(block_panels * panel_bytes);
  uint8_t* row_u = g.panels != nullptr ? nullptr : row_buf.get(Kp);
  alignas(64) int32_t dots[kMaxMR * kMaxNR];
  alignas(64) float rs[kMaxNR], bs[kMaxNR];
  for (int64_t nb = n0; nb < n1; nb += block_panels * kern.nr) {
    // 3a. unpack this block's panels
    const int64_t np = std::min(block_panels, (n1 - nb + kern.nr - 1) / kern.nr);
    if (g.panels != nullptr) {  // resident: this block's panels are already laid out, in order
      panels = const_cast<uint8_t*>(g.panels) + (nb / kern.nr) * panel_bytes;
    } else {
      for (int64_t q = 0; q < np; ++q) {
        const int64_t first = nb + q * kern.nr;
        unpack_panel(g.w + first * row_bytes, row_bytes, g.bits, g.K, Kp, std::min<int64_t>(kern.nr, n1 - first),
                     kern.nr, kern.planes, kern.unpack_row, row_u, panels + q * panel_bytes);
      }
    }
    // 3b. all tokens against them, a block of MC tokens at a time
    for (int64_t mb = 0; mb < Mp; mb += MC) {
      for (int64_t q = 0; q < np; ++q) {
        const int64_t first = nb + q * kern.nr;
        for (int c = 0; c < kern.nr; ++c) {  // this panel's scales and biases, zero padded
          const bool real = g.out_f32 != nullptr && first + c < g.N;
          rs[c] = real ? g.row_scale[first + c] : 0.0f;
          bs[c] = real && g.bias != nullptr ? g.bias[first + c] : 0.0f;
        }
        for (int64_t m = mb; m < std::min(mb + MC, Mp); m += kern.mr) {
          kern.dot_tile(xp + m * Kp, Kp, panels + q * panel_bytes, dots);
          kern.store_tile(g, dots, xsum, offset, rs, bs, m, kern.mr, first);  // 4.
        }
      }
    }
  }
}

// One call for a whole layer (issue 17): its segments (one Gemm each: the same x, M, K and sx; each its own
// rows, bit width and output columns, out/row_scale/bias pointing at the segment's first column, ldo the
// layer's width). x is copied and summed once, and one parallel_for splits the panels of all segments over the
// threads, so a mixed-width layer costs what a single-width one of the same shape does.
// Returns 0, or a non-zero error code (see error_message).
static int run_segments(const Gemm* segs, int nseg, int isa_request) {
  if (nseg < 0) return 5;
  for (int s = 0; s < nseg; ++s) {
    const Gemm& g = segs[s];
    if (g.bits < 1 || g.bits > 8) return 1;
    if (g.M < 0 || g.N < 0 || g.K < 0) return 2;
    if (g.x != segs[0].x || g.xf != segs[0].xf || (g.x != nullptr && g.xf != nullptr)) return 5;
    if (g.M > 0 && g.x == nullptr && g.xf == nullptr) return 5;
    if (g.M != segs[0].M || g.K != segs[0].K || (g.out_cols == nullptr && g.ldo < g.N)) return 5;
    if (g.out_cols != nullptr && g.out_f32 == nullptr) return 5;
  }
  Isa isa;
  if (const int err = resolve_isa(isa_request, &isa)) return err;
  if (nseg == 0 || segs[0].M == 0) return 0;
  const int64_t M = segs[0].M, K = segs[0].K;

  // 1. zero-padded int8 copy of x (rows padded for the largest micro tile) and the token sums, once for all
  // segments; fp32 x is quantized here (one scale per token in sxq), in parallel for many tokens.
  static thread_local AlignedBuffer xbuf;
  static thread_local std::vector<int32_t> xsum;
  static thread_local std::vector<float> sxq;
  const int64_t Kp = padded_k(K);
  const int64_t Mx = round_up(M, kMaxMR);  // every ISA's mr divides kMaxMR
  int8_t* xp = reinterpret_cast<int8_t*>(xbuf.get(Mx * Kp));
  xsum.assign(static_cast<size_t>(Mx), 0);
  const float* xf = segs[0].xf;
  if (xf != nullptr) sxq.assign(static_cast<size_t>(M), 0.0f);
  const QuantizeRowFn quantize_row = quantize_row_for(isa);
  int32_t* xsum_p = xsum.data();
  float* sxq_p = sxq.data();
  auto copy_rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* dst = xp + m * Kp;
      if (m >= M) {
        std::memset(dst, 0, static_cast<size_t>(Kp));
        continue;
      }
      std::memset(dst + K, 0, static_cast<size_t>(Kp - K));
      if (xf != nullptr) {
        xsum_p[m] = quantize_row(xf + m * K, K, dst, sxq_p + m);
      } else {
        std::memcpy(dst, segs[0].x + m * K, static_cast<size_t>(K));
        int32_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += dst[k];
        xsum_p[m] = sum;
      }
    }
  };
  const int prep_tasks = xf != nullptr && M * K >= kMinParallelMacs / 4 ? pool().num_threads() : 1;
  pool().parallel_for(prep_tasks, [&](int t) { copy_rows(Mx * t / prep_tasks, Mx * (t + 1) / prep_tasks); });
  static thread_local std::vector<Gemm> quantized;  // the segments reading sxq, when x was quantized here (the
                                                     // pool's tasks see them through `segs`)
  if (xf != nullptr) {
    quantized.assign(segs, segs + nseg);
    for (Gemm& g : quantized) g.sx = sxq_p;
    segs = quantized.data();
  }

  // 2. number the panels of all segments in order and split them over threads (contiguous ranges),
  // 3./4. per thread and segment: unpack, micro tiles, epilogue.
  // (thread_local like the buffers above: no allocation per call once they have grown; the pool's lambda must
  // reach the caller's vectors through these local references: a thread_local named in a lambda is the
  // running thread's own)
  static thread_local std::vector<IsaKernels> kern_buf;
  static thread_local std::vector<int64_t> first_panel_buf;
  std::vector<IsaKernels>& kern = kern_buf;
  std::vector<int64_t>& first_panel = first_panel_buf;
  kern.clear();
  first_panel.assign(static_cast<size_t>(nseg) + 1, 0);
  int64_t macs = 0;
  for (int s = 0; s < nseg; ++s) {
    kern.push_back(kernels_for(isa, segs[s].bits));
    first_panel[s + 1] = first_panel[s] + (segs[s].N + kern[s].nr - 1) / kern[s].nr;
    macs += M * segs[s].N * K;
  }
  const int64_t panels = first_panel[nseg];
  if (panels == 0) return 0;
  int tasks = 1;
  if (macs >= kMinParallelMacs) tasks = static_cast<int>(std::min<int64_t>(pool().num_threads(), panels));
  const int32_t* xs = xsum.data();
  std::atomic<bool> out_of_memory{false};
  pool().parallel_for(tasks, [&](int t) {
    const int64_t p0 = panels * t / tasks, p1 = panels * (t + 1) / tasks;
    try {  // no exception may leave a pool task
      for (int s = 0; s < nseg; ++s) {
        const int64_t q0 = std::max(p0, first_panel[s]) - first_panel[s];
        const int64_t q1 = std::min(p1, first_panel[s + 1]) - first_panel[s];
        if (q0 >= q1) continue;
        const int64_t n0 = q0 * kern[s].nr, n1 = std::min(segs[s].N, q1 * kern[s].nr);
        gemm_columns(segs[s], kern[s], xp, xs, round_up(M, kern[s].mr), Kp, n0, n1);
      }
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  });
  return out_of_memory ? 6 : 0;
}

static int run_gemm(const Gemm& g, int isa_request) { return run_segments(&g, 1, isa_request); }

// RESIDENT PANELS: a layer's weights unpacked once, at load time, into the panels an ISA's kernel reads
// (steps 3a's output for every panel, in order): ceil(N / nr) panels of Kp * nr * planes bytes. A GEMM given
// them (Gemm::panels) skips unpacking: about 1 byte per weight in memory instead of bits / 8, for less work per
// call when few tokens share the unpacking (one short sentence).
static int64_t panel_bytes_for(int64_t N, int64_t K, int bits, int isa_request) {
  Isa isa;
  if (bits < 1 || bits > 8 || N < 0 || K < 0 || resolve_isa(isa_request, &isa) != 0) return -1;
  const IsaKernels kern = kernels_for(isa, bits);
  return (N + kern.nr - 1) / kern.nr * padded_k(K) * kern.nr * kern.planes;
}

static int prepack(const uint8_t* w, int64_t N, int64_t K, int bits, int isa_request, uint8_t* out) {
  if (bits < 1 || bits > 8) return 1;
  if (N < 0 || K < 0) return 2;
  Isa isa;
  if (const int err = resolve_isa(isa_request, &isa)) return err;
  const IsaKernels kern = kernels_for(isa, bits);
  const int64_t Kp = padded_k(K);
  const int64_t row_bytes = (K * bits + 7) / 8, panel_bytes = Kp * kern.nr * kern.planes;
  AlignedBuffer row_buf;
  uint8_t* row_u = row_buf.get(Kp);
  for (int64_t p = 0; p * kern.nr < N; ++p) {
    const int64_t first = p * kern.nr;
    unpack_panel(w + first * row_bytes, row_bytes, bits, K, Kp, std::min<int64_t>(kern.nr, N - first), kern.nr,
                 kern.planes, kern.unpack_row, row_u, out + p * panel_bytes);
  }
  return 0;
}

static const char* error_message(int code) {
  switch (code) {
    case 0: return "ok";
    case 1: return "bit width must be 1..8";
    case 2: return "negative dimension";
    case 3: return "unknown ISA code (0 auto, 1 scalar, 2 avx2, 3 avx512-vnni, 4 avx-vnni)";
    case 4: return "this CPU does not support the requested ISA";
    case 5:
      return "array shapes do not match (x [M,K], w [N,ceil(K*b/8)], out [M,N], sx [M], scale/bias [N]; attention: "
             "q, k, v, out [B,S,H,D], kb [B,S])";
    case 6: return "out of memory";
    default: return "unknown error";
  }
}

static int run_gemm_checked(const Gemm& g, int isa) {
  try {
    return run_gemm(g, isa);
  } catch (const std::bad_alloc&) {
    return 6;
  }
}

// ------------------------------------------------------------------------------------------- attention
// The fp32 attention core of one layer, for the integer model's inference (issue 17: XLA CPU runs the batched
// dots of attention on one thread; this spreads the (batch, head) pairs over the threads):
//
//   out[b, i, h, :] = sum_j p_ij v[b, j, h, :],   p_i = softmax_j(q[b, i, h, :] . k[b, j, h, :] / sqrt(D) + kb[b, j])
//
// q, k, v, out: [B, S, H, D] (C order, so the linears' outputs need no transpose); kb [B, S]: the additive key
// mask (0, or a large negative number at padding). The formula of nasq.kernels.int_bert._attention, with fp32
// sums in another order (results equal up to fp32 rounding, not bit for bit).

#if NASQ_X86
// exp(x) for fp32 lanes (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r; about 1 ulp), exactly 0 below
// -88.38 (so masked keys weigh nothing); NaN stays NaN (max/min return their second operand when one is NaN), so
// a score that overflowed poisons its row's softmax as in XLA.
NASQ_TARGET("avx2,fma")
static inline __m256 exp_avx2(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

NASQ_TARGET("avx2,fma")
static inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

NASQ_TARGET("avx2,fma")
static inline float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// One query row's context: p . v over S keys into NV vectors of 8 (D = 8 NV), v packed [S, D]; even and odd
// keys in separate accumulators (two independent FMA chains per vector) when they fit in the registers.
template <int NV>
NASQ_TARGET("avx2,fma")
static void weighted_rows_avx2(const float* p, const float* v, int64_t S, float* out) {
  constexpr int64_t D = 8 * NV;
  constexpr int kChains = NV <= 4 ? 2 : 1;
  __m256 acc[kChains][NV];
  for (auto& a : acc)
    for (int u = 0; u < NV; ++u) a[u] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kChains <= S; j += kChains)
    for (int c = 0; c < kChains; ++c) {
      const __m256 pj = _mm256_broadcast_ss(p + j + c);
      for (int u = 0; u < NV; ++u) acc[c][u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + (j + c) * D + 8 * u), acc[c][u]);
    }
  for (; j < S; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
    for (int u = 0; u < NV; ++u) acc[0][u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * D + 8 * u), acc[0][u]);
  }
  for (int u = 0; u < NV; ++u) {
    __m256 t = acc[0][u];
    for (int c = 1; c < kChains; ++c) t = _mm256_add_ps(t, acc[c][u]);
    _mm256_storeu_ps(out + 8 * u, t);
  }
}

// One (batch, head) pair; D a multiple of 8, at most 64. kt: [D, Sp] scratch (K transposed), vp: [S, D] scratch
// (V packed), s: [Sp] scratch, kbp: [Sp] the key mask padded with -inf to Sp = round_up(S, 8).
NASQ_TARGET("avx2,fma")
static void attention_head_avx2(const float* q, const float* k, const float* v, const float* kbp, int64_t S,
                                int64_t D, int64_t ld, float* out, float* kt, float* vp, float* s) {
  const int64_t Sp = round_up(S, 8);
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = 0; j < S; ++j) kt[d * Sp + j] = k[j * ld + d];
    for (int64_t j = S; j < Sp; ++j) kt[d * Sp + j] = 0.0f;
  }
  for (int64_t j = 0; j < S; ++j) std::memcpy(vp + j * D, v + j * ld, sizeof(float) * static_cast<size_t>(D));
  const __m256 root = _mm256_set1_ps(std::sqrt(static_cast<float>(D)));
  for (int64_t i = 0; i < S; ++i) {
    const float* qi = q + i * ld;
    // scores, 64 keys at a time in 8 accumulators, then the last keys 8 at a time
    int64_t j0 = 0;
    for (; j0 + 64 <= Sp; j0 += 64) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      const float* kd = kt + j0;
      for (int64_t d = 0; d < D; ++d, kd += Sp) {
        const __m256 qd = _mm256_broadcast_ss(qi + d);
        a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd), a0);
        a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd + 8), a1);
        a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd + 16), a2);
        a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd + 24), a3);
        a4 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd + 32), a4);
        a5 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd + 40), a5);
        a6 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd + 48), a6);
        a7 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kd + 56), a7);
      }
      const __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
      for (int u = 0; u < 8; ++u)
        _mm256_storeu_ps(s + j0 + 8 * u, _mm256_add_ps(_mm256_div_ps(acc[u], root), _mm256_loadu_ps(kbp + j0 + 8 * u)));
    }
    for (; j0 < Sp; j0 += 8) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; ++d) a = _mm256_fmadd_ps(_mm256_broadcast_ss(qi + d), _mm256_loadu_ps(kt + d * Sp + j0), a);
      _mm256_storeu_ps(s + j0, _mm256_add_ps(_mm256_div_ps(a, root), _mm256_loadu_ps(kbp + j0)));
    }
    // softmax over the Sp scores (the padding's -inf gives exp 0)
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < Sp; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
    const __m256 m = _mm256_set1_ps(hmax_avx2(mx));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < Sp; j += 8) {
      const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 total = _mm256_set1_ps(hsum_avx2(sum));
    for (int64_t j = 0; j < Sp; j += 8) _mm256_storeu_ps(s + j, _mm256_div_ps(_mm256_loadu_ps(s + j), total));
    // context
    float* oi = out + i * ld;
    switch (D / 8) {
      case 1: weighted_rows_avx2<1>(s, vp, S, oi); break;
      case 2: weighted_rows_avx2<2>(s, vp, S, oi); break;
      case 3: weighted_rows_avx2<3>(s, vp, S, oi); break;
      case 4: weighted_rows_avx2<4>(s, vp, S, oi); break;
      case 5: weighted_rows_avx2<5>(s, vp, S, oi); break;
      case 6: weighted_rows_avx2<6>(s, vp, S, oi); break;
      case 7: weighted_rows_avx2<7>(s, vp, S, oi); break;
      default: weighted_rows_avx2<8>(s, vp, S, oi); break;
    }
  }
}
#endif

// The same for any D, in plain C++ (the scalar ISA, and head sizes the AVX2 path does not take).
static void attention_head_scalar(const float* q, const float* k, const float* v, const float* kbp, int64_t S,
                                  int64_t D, int64_t ld, float* out, float* s) {
  const float root = std::sqrt(static_cast<float>(D));
  for (int64_t i = 0; i < S; ++i) {
    const float* qi = q + i * ld;
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      float a = 0.0f;
      for (int64_t d = 0; d < D; ++d) a += qi[d] * k[j * ld + d];
      s[j] = a / root + kbp[j];
      mx = std::max(mx, s[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      s[j] = std::exp(s[j] - mx);
      total += s[j];
    }
    for (int64_t j = 0; j < S; ++j) s[j] /= total;
    float* oi = out + i * ld;
    for (int64_t d = 0; d < D; ++d) oi[d] = 0.0f;
    for (int64_t j = 0; j < S; ++j)
      for (int64_t d = 0; d < D; ++d) oi[d] += s[j] * v[(j * ld) + d];
  }
}

// The whole layer: B x H (batch, head) pairs split over the threads. isa: 0 auto, 1 scalar (plain C++); every
// SIMD ISA (AVX2 and both VNNI paths) runs the AVX2 code. Returns 0 or an error code.
static int run_attention(const float* q, const float* k, const float* v, const float* kb, int64_t B, int64_t S,
                         int64_t H, int64_t D, float* out, int isa_request) {
  if (B < 0 || S < 0 || H < 0 || D < 0) return 2;
  Isa isa;
  if (const int err = resolve_isa(isa_request, &isa)) return err;
  if (B == 0 || S == 0 || H == 0) return 0;
  if (D == 0) {
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(B * S * H));
    return 0;
  }
  const bool simd = isa != kScalar && NASQ_X86 && D % 8 == 0 && D <= 64;
  const int64_t ld = H * D, Sp = round_up(S, 8), pairs = B * H;
  int tasks = 1;
  if (2 * B * H * S * S * D >= kMinParallelMacs)
    tasks = static_cast<int>(std::min<int64_t>(pairs, int64_t{4} * pool().num_threads()));
  std::atomic<bool> out_of_memory{false};
  pool().parallel_for(tasks, [&](int t) {
    try {  // no exception may leave a pool task
      static thread_local std::vector<float> kt, vp, s, kbp;
      kt.resize(static_cast<size_t>(D * Sp));
      vp.resize(static_cast<size_t>(D * S));
      s.resize(static_cast<size_t>(Sp));
      kbp.resize(static_cast<size_t>(Sp));
      for (int64_t pr = pairs * t / tasks; pr < pairs * (t + 1) / tasks; ++pr) {
        const int64_t b = pr / H, h = pr % H, at = b * S * ld + h * D;
        std::copy(kb + b * S, kb + (b + 1) * S, kbp.begin());
        std::fill(kbp.begin() + S, kbp.end(), -INFINITY);
#if NASQ_X86
        if (simd) {
          attention_head_avx2(q + at, k + at, v + at, kbp.data(), S, D, ld, out + at, kt.data(), vp.data(),
                              s.data());
          continue;
        }
#endif
        attention_head_scalar(q + at, k + at, v + at, kbp.data(), S, D, ld, out + at, s.data());
      }
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  });
  return out_of_memory ? 6 : 0;
}

}  // namespace nasq

// ------------------------------------------------------------------------------------------- C ABI (ctypes)

extern "C" {

int nasq_abi_version() { return nasq::kAbiVersion; }
int nasq_best_isa() { return nasq::best_isa(); }
int nasq_isa_supported(int isa) {
  return isa >= nasq::kScalar && isa <= nasq::kLastIsa && nasq::cpu_has(static_cast<nasq::Isa>(isa));
}
int nasq_num_threads() { return nasq::pool().num_threads(); }
void nasq_set_num_threads(int n) { nasq::pool().set_num_threads(n); }
int nasq_xla_pool() { return nasq::g_xla_pool.load(); }
void nasq_set_xla_pool(int on) { nasq::g_xla_pool.store(on != 0 ? 1 : 0); }
const char* nasq_error_message(int code) { return nasq::error_message(code); }

// The GEMM on raw C-contiguous arrays: int32 output if out_i32 is not null, else the fused fp32 output
// (sx, row_scale required, bias optional). Returns 0 or an error code (nasq_error_message).
int nasq_int_gemm(const int8_t* x, const uint8_t* w, int64_t M, int64_t N, int64_t K, int bits, int isa,
                  int32_t* out_i32, float* out_f32, const float* sx, const float* row_scale, const float* bias) {
  if (out_i32 == nullptr && (out_f32 == nullptr || sx == nullptr || row_scale == nullptr)) return 5;
  const nasq::Gemm g{x, w, M, N, K, bits, out_i32, out_f32, sx, row_scale, bias, N};
  return nasq::run_gemm_checked(g, isa);
}

// Bytes of the resident panels of an [N, K] b-bit weight for an ISA (0 auto), or -1 if invalid/unsupported.
int64_t nasq_panel_bytes(int64_t N, int64_t K, int bits, int isa) { return nasq::panel_bytes_for(N, K, bits, isa); }

// Unpack packed weights w [N, ceil(K*bits/8)] into resident panels (out: nasq_panel_bytes bytes). 0 or an error.
int nasq_prepack(const uint8_t* w, int64_t N, int64_t K, int bits, int isa, uint8_t* out) {
  try {
    return nasq::prepack(w, N, K, bits, isa, out);
  } catch (const std::bad_alloc&) {
    return 6;
  }
}

// A whole layer in one call: nseg segments, segment s has rows[s] weight rows of bits[s] bits packed in ws[s];
// the outputs of all segments side by side, [M, sum(rows)] in segment order (int32 if out_i32 is not null,
// else fused fp32 with sx [M], row_scale and optional bias [sum(rows)]). Returns 0 or an error code.
// resident != 0: ws[s] are resident panels (nasq_prepack with the same concrete isa), not packed rows.
int nasq_int_gemm_segments(const int8_t* x, int64_t M, int64_t K, int nseg, const uint8_t* const* ws,
                           const int64_t* rows, const int* bits, int isa, int resident, int32_t* out_i32,
                           float* out_f32, const float* sx, const float* row_scale, const float* bias) {
  if (out_i32 == nullptr && (out_f32 == nullptr || sx == nullptr || row_scale == nullptr)) return 5;
  if (nseg < 0) return 5;
  int64_t width = 0;
  for (int s = 0; s < nseg; ++s) {
    if (rows[s] < 0) return 2;
    width += rows[s];
  }
  std::vector<nasq::Gemm> segs;
  int64_t c = 0;
  for (int s = 0; s < nseg; ++s) {
    segs.push_back({x, resident ? nullptr : ws[s], M, rows[s], K, bits[s], out_i32 ? out_i32 + c : nullptr,
                    out_i32 ? nullptr : out_f32 + c, sx, row_scale ? row_scale + c : nullptr,
                    bias ? bias + c : nullptr, width, resident ? ws[s] : nullptr});
    c += rows[s];
  }
  try {
    return nasq::run_segments(segs.data(), nseg, isa);
  } catch (const std::bad_alloc&) {
    return 6;
  }
}

// The fp32 attention core (nasq::run_attention) on raw C-contiguous arrays: q, k, v, out [B, S, H, D], kb [B, S].
int nasq_attention_f32(const float* q, const float* k, const float* v, const float* kb, int64_t B, int64_t S,
                       int64_t H, int64_t D, float* out, int isa) {
  try {
    return nasq::run_attention(q, k, v, kb, B, S, H, D, out, isa);
  } catch (const std::bad_alloc&) {
    return 6;
  }
}

}  // extern "C"

// ------------------------------------------------------------------------------------------- XLA FFI

#if !defined(NASQ_NO_FFI)
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace nasq {

static ffi::Error to_ffi_error(int code) {
  if (code == 0) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("nasq native int GEMM: ") + error_message(code));
}

// x [M, K] and w [N, ceil(K*b/8)]: the problem's dimensions, or false if the shapes do not fit.
static bool gemm_dims(const ffi::Buffer<ffi::S8>& x, const ffi::Buffer<ffi::U8>& w, int64_t bits, int64_t* M,
                      int64_t* N, int64_t* K) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || bits < 1 || bits > 8) return false;
  *M = xd[0];
  *K = xd[1];
  *N = wd[0];
  return wd[1] == (*K * bits + 7) / 8;
}

static ffi::Error IntGemmS32Impl(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::S32> out,
                                 int64_t bits, int64_t isa) {
  int64_t M, N, K;
  if (!gemm_dims(x, w, bits, &M, &N, &K) || out->element_count() != static_cast<size_t>(M * N))
    return to_ffi_error(bits < 1 || bits > 8 ? 1 : 5);
  const Gemm g{x.typed_data(), w.typed_data(), M, N, K, static_cast<int>(bits), out->typed_data(), nullptr,
               nullptr, nullptr, nullptr, N};
  return to_ffi_error(run_gemm_checked(g, static_cast<int>(isa)));
}

static ffi::Error IntGemmF32Impl(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::F32> sx, ffi::Buffer<ffi::U8> w,
                                 ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::F32> bias,
                                 ffi::ResultBuffer<ffi::F32> out, int64_t bits, int64_t isa) {
  int64_t M, N, K;
  if (!gemm_dims(x, w, bits, &M, &N, &K) || out->element_count() != static_cast<size_t>(M * N) ||
      sx.element_count() != static_cast<size_t>(M) || row_scale.element_count() != static_cast<size_t>(N) ||
      (bias.element_count() != 0 && bias.element_count() != static_cast<size_t>(N)))
    return to_ffi_error(bits < 1 || bits > 8 ? 1 : 5);
  const float* b = bias.element_count() == 0 ? nullptr : bias.typed_data();
  const Gemm g{x.typed_data(), w.typed_data(), M, N, K, static_cast<int>(bits), nullptr, out->typed_data(),
               sx.typed_data(), row_scale.typed_data(), b, N};
  return to_ffi_error(run_gemm_checked(g, static_cast<int>(isa)));
}

// The segments of a layer from its FFI buffers (resident panels or packed rows, as `resident` says), each
// checked against its width and row count: copies of `layer` (the fields every segment shares; its row_scale
// and bias point at the layer's first kept row) with the segment's rows, width, buffer and row offset c applied;
// place(g, c) points the segment's output. The rows must add up to R.
template <typename Place>
static ffi::Error layer_segments(ffi::RemainingArgs& ws, ffi::Span<const int64_t> bits, ffi::Span<const int64_t> rows,
                                 int64_t isa, int64_t resident, int64_t R, const Gemm& layer, Place place,
                                 std::vector<Gemm>* segs) {
  if (bits.size() != ws.size() || rows.size() != ws.size()) return to_ffi_error(5);
  if (resident && isa == kAuto) return to_ffi_error(3);  // panels are laid out for one concrete ISA
  int64_t c = 0;
  for (size_t s = 0; s < ws.size(); ++s) {
    auto w = ws.get<ffi::Buffer<ffi::U8>>(s);
    if (!w.has_value()) return w.error();
    if (bits[s] < 1 || bits[s] > 8) return to_ffi_error(1);
    const int64_t n = rows[s];
    const bool fits = resident ? static_cast<int64_t>(w->element_count()) ==
                                     panel_bytes_for(n, layer.K, static_cast<int>(bits[s]), static_cast<int>(isa))
                               : w->dimensions().size() == 2 && w->dimensions()[0] == n &&
                                     w->dimensions()[1] == (layer.K * bits[s] + 7) / 8;
    if (!fits || n < 0 || c + n > R) return to_ffi_error(5);
    Gemm g = layer;
    g.w = resident ? nullptr : w->typed_data();
    g.panels = resident ? w->typed_data() : nullptr;
    g.N = n;
    g.bits = static_cast<int>(bits[s]);
    g.row_scale = layer.row_scale + c;
    g.bias = layer.bias != nullptr ? layer.bias + c : nullptr;
    place(g, c);
    segs->push_back(g);
    c += n;
  }
  return c == R ? ffi::Error::Success() : to_ffi_error(5);
}

// While alive, this thread's parallel_for runs on XLA's intra-op pool (when XLA lends one with threads).
class XlaPoolScope {
 public:
  explicit XlaPoolScope(ffi::ThreadPool& tp) : tp_(tp), prev_(tl_executor) {
    if (use_xla_pool() && tp_.num_threads() > 0) {
      ex_ = {&tp_, [](void* ctx, std::function<void()> task) {
               static_cast<ffi::ThreadPool*>(ctx)->Schedule(std::move(task));
             }};
      tl_executor = &ex_;
    }
  }
  ~XlaPoolScope() { tl_executor = prev_; }
  XlaPoolScope(const XlaPoolScope&) = delete;
  XlaPoolScope& operator=(const XlaPoolScope&) = delete;

 private:
  ffi::ThreadPool& tp_;
  const Executor* prev_;
  Executor ex_{};
};

static ffi::Error run_layer(const std::vector<Gemm>& segs, int64_t isa) {
  try {
    return to_ffi_error(run_segments(segs.data(), static_cast<int>(segs.size()), static_cast<int>(isa)));
  } catch (const std::bad_alloc&) {
    return to_ffi_error(6);
  }
}

// A whole layer: x [M, K], sx [M], row_scale and bias ([R] or [0]) of all its kept rows, then one packed
// buffer per segment (uint8 [R_s, ceil(K*bits[s]/8)]); out [M, R], the segments' outputs side by side.
static ffi::Error IntLinearSegmentsImpl(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::F32> sx,
                                        ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::F32> bias,
                                        ffi::RemainingArgs ws, ffi::ResultBuffer<ffi::F32> out,
                                        ffi::Span<const int64_t> bits, ffi::Span<const int64_t> rows,
                                        int64_t isa, int64_t resident, ffi::ThreadPool tp) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return to_ffi_error(5);
  const int64_t M = xd[0], K = xd[1];
  const int64_t R = static_cast<int64_t>(row_scale.element_count());
  if (sx.element_count() != static_cast<size_t>(M) || out->element_count() != static_cast<size_t>(M * R) ||
      (bias.element_count() != 0 && bias.element_count() != static_cast<size_t>(R)))
    return to_ffi_error(5);
  const Gemm layer{x.typed_data(), nullptr, M, 0, K, 0, nullptr, out->typed_data(), sx.typed_data(),
                   row_scale.typed_data(), bias.element_count() == 0 ? nullptr : bias.typed_data(), R};
  std::vector<Gemm> segs;
  const ffi::Error err = layer_segments(ws, bits, rows, isa, resident, R, layer,
                                        [&](Gemm& g, int64_t c) { g.out_f32 = out->typed_data() + c; }, &segs);
  if (err.failure()) return err;
  XlaPoolScope scope(tp);
  return run_layer(segs, isa);
}

// A whole linear (NasqLinearF32): fp32 x [M, K]; row_scale, bias ([R] or [0]) and out_cols (int32 [R]: the
// output column of each kept row) in segment order; then one buffer per segment, resident panels or packed
// rows as `resident` says. out [M, F]: every kept row's outputs in its column, 0 in the F - R columns of
// pruned rows.
static ffi::Error LinearF32Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> row_scale,
                                ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> out_cols, ffi::RemainingArgs ws,
                                ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> bits,
                                ffi::Span<const int64_t> rows, int64_t isa, int64_t resident, ffi::ThreadPool tp) {
  const auto xd = x.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2) return to_ffi_error(5);
  const int64_t M = xd[0], K = xd[1], F = od[1];
  const int64_t R = static_cast<int64_t>(row_scale.element_count());
  if (od[0] != M || R > F || out_cols.element_count() != static_cast<size_t>(R) ||
      (bias.element_count() != 0 && bias.element_count() != static_cast<size_t>(R)))
    return to_ffi_error(5);
  const int32_t* cols = out_cols.typed_data();
  for (int64_t r = 0; r < R; ++r)
    if (cols[r] < 0 || cols[r] >= F) return to_ffi_error(5);
  Gemm layer{nullptr, nullptr, M, 0, K, 0, nullptr, out->typed_data(), nullptr, row_scale.typed_data(),
             bias.element_count() == 0 ? nullptr : bias.typed_data(), F};
  layer.xf = x.typed_data();
  std::vector<Gemm> segs;
  const ffi::Error err = layer_segments(ws, bits, rows, isa, resident, R, layer,
                                        [&](Gemm& g, int64_t c) { g.out_cols = cols + c; }, &segs);
  if (err.failure()) return err;
  if (R < F) std::memset(out->typed_data(), 0, sizeof(float) * static_cast<size_t>(M * F));  // pruned rows
  XlaPoolScope scope(tp);
  return run_layer(segs, isa);
}

// The attention core of a layer (run_attention): q, k, v [B, S, H, D], kb [B, S] -> out [B, S, H, D].
static ffi::Error AttentionF32Impl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                   ffi::Buffer<ffi::F32> kb, ffi::ResultBuffer<ffi::F32> out, int64_t isa,
                                   ffi::ThreadPool tp) {
  const auto qd = q.dimensions();
  if (qd.size() != 4 || k.dimensions().size() != 4 || v.dimensions().size() != 4 || kb.dimensions().size() != 2 ||
      out->dimensions().size() != 4)
    return to_ffi_error(5);
  for (int a = 0; a < 4; ++a)
    if (k.dimensions()[a] != qd[a] || v.dimensions()[a] != qd[a] || out->dimensions()[a] != qd[a])
      return to_ffi_error(5);
  if (kb.dimensions()[0] != qd[0] || kb.dimensions()[1] != qd[1]) return to_ffi_error(5);
  XlaPoolScope scope(tp);
  try {
    return to_ffi_error(run_attention(q.typed_data(), k.typed_data(), v.typed_data(), kb.typed_data(), qd[0], qd[1],
                                      qd[2], qd[3], out->typed_data(), static_cast<int>(isa)));
  } catch (const std::bad_alloc&) {
    return to_ffi_error(6);
  }
}

}  // namespace nasq

// int32 acc [M, N] = x int8 [M, K] . codes(w uint8 [N, ceil(K*bits/8)])^T; attributes bits, isa (int64).
XLA_FFI_DEFINE_HANDLER_SYMBOL(NasqIntGemmS32, nasq::IntGemmS32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("isa"));

// fp32 y [M, N] = acc * sx[m] * row_scale[n] (+ bias[n]; pass a [0] bias for none).
XLA_FFI_DEFINE_HANDLER_SYMBOL(NasqIntGemmF32, nasq::IntGemmF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("isa"));

// fp32 y [M, R]: every segment of a layer in one call (IntLinearSegmentsImpl); attributes bits and rows (int64
// arrays, one per segment buffer), isa, resident (1: the buffers are resident panels for that isa).
XLA_FFI_DEFINE_HANDLER_SYMBOL(NasqIntLinearSegmentsF32, nasq::IntLinearSegmentsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("bits")
                                  .Attr<ffi::Span<const int64_t>>("rows")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("resident")
                                  .Ctx<ffi::ThreadPool>());
// fp32 y [M, F] = a whole linear of fp32 x (LinearF32Impl): x, row_scale, bias, out_cols, then the segment
// buffers; attributes as NasqIntLinearSegmentsF32.
XLA_FFI_DEFINE_HANDLER_SYMBOL(NasqLinearF32, nasq::LinearF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("bits")
                                  .Attr<ffi::Span<const int64_t>>("rows")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("resident")
                                  .Ctx<ffi::ThreadPool>());
// fp32 out [B, S, H, D]: the attention core (AttentionF32Impl): q, k, v, kb; attribute isa.
XLA_FFI_DEFINE_HANDLER_SYMBOL(NasqAttentionF32, nasq::AttentionF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Ctx<ffi::ThreadPool>());
#endif  // NASQ_NO_FFI
