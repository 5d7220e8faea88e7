// The integer path of lowbit_linear (SPEC.md section 2) on int8 tensor cores:
//   acc[i][o] = sum_k x[i][k] * q[o][k]   exactly, in int32
//   out[i][o] = store_epilogue(epilogue_value(acc rounded to float32, o))          (quant.cuh)
// x is (m, lda) uint8 or int8 activation codes, row-major, zero in columns k .. lda - 1; the weight
// is reference.pack_codes' (n, words) int32 words of signed codes, `codes_per_word` codes a word.
//
// Device kernel (sm_80 and later; runs unchanged on sm_90a):
//   * block tile kBlockM x kBlockN = 128 x 128 outputs, K walked in tiles of kBlockK = 64 codes
//     (64 bytes of x); 256 threads = 8 warps as 2 (M) x 4 (N), each warp a 64 x 32 sub-tile of
//     4 x 4 mma.sync.m16n8k32 tiles with int32 accumulators in registers (64 per thread).
//   * per K tile, cp.async brings the x tile (128 rows x 64 bytes, 16-byte copies) and the packed
//     weight tile (128 rows x 64 / codes_per_word words, 4-byte copies) into shared memory, two
//     stages deep, so tile t + 1 is in flight while tile t is multiplied. Rows past m / n and
//     columns past lda / words are zero-filled (cp.async with src-size 0) without a global read.
//   * the packed tile is decoded once per block into an int8 tile (128 rows x 64 codes) with
//     decode_four_codes, four codes per 32-bit shared store; then every warp reads its A and B
//     fragments with 32-bit shared loads. Rows of both int8 tiles are padded from 64 to 80 bytes
//     (20 banks): the 8 rows g = lane / 4 of one fragment load start at banks 20 g mod 32 =
//     {0, 20, 8, 28, 16, 4, 24, 12}, so with t = lane % 4 added the 32 lanes hit 32 distinct banks.
//   * the epilogue runs straight from the accumulator fragments, bounds-checked on i < m, o < n.
//   Out-of-range K needs no masking: x is zero in columns k .. lda - 1 and zero-filled past lda,
//   so whatever codes the weight holds there (pack padding, the binary grid's -1, zero-filled
//   words) multiply zeros.
//
// Fragment layouts relied on, from the PTX ISA, section "Matrix Fragments for mma.m16n8k32"
// (.s8 / .u8 multiplicands, .s32 accumulators); groupID g = laneid >> 2, threadID_in_group t =
// laneid % 4, elements of a .b32 register low byte first:
//   A (16 x 32, row): a[0] = A[g][4t .. 4t+3],      a[1] = A[g+8][4t .. 4t+3],
//                     a[2] = A[g][16+4t .. 16+4t+3], a[3] = A[g+8][16+4t .. 16+4t+3]
//   B (32 x 8, col):  b[0] = B[4t .. 4t+3][g],       b[1] = B[16+4t .. 16+4t+3][g]
//                     i.e. 4 consecutive K codes of weight row g: one 32-bit load of the int8 tile
//   C (16 x 8):       c[0], c[1] = C[g][2t], C[g][2t+1];  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// Since the int8 tiles are row-major in K with K contiguous, each register is one little-endian
// 32-bit shared load at (row, k) and needs no shuffling.
//
// int32 accumulation is exact while |acc| < 2^31, i.e. always for k <= 65793 (255 * 128 * k);
// beyond that a sum can wrap where the host twin's int64 would not.
//
// Next step on Hopper: wgmma with TMA-fed, swizzled shared tiles (sm_90a) and ldmatrix fragment
// loads on sm_80; this mma.sync kernel is the portable baseline.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "launchers.h"
#include "quant.cuh"

namespace maqd {
namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MAQD_LOWBIT_SM80 1
#else
#define MAQD_LOWBIT_SM80 0
#endif

// `#pragma unroll` in the __host__ __device__ phases, silent in the host compiler.
#ifdef __CUDA_ARCH__
#define MAQD_UNROLL _Pragma("unroll")
#else
#define MAQD_UNROLL
#endif

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 64;  // codes of K per tile = bytes of an x row
constexpr int kThreads = 256;
constexpr int kWarpsN = 4;                    // warps are 2 (M) x 4 (N)
constexpr int kWarpM = 64;                    // rows of M per warp
constexpr int kWarpN = 32;                    // columns of N per warp
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 32;
constexpr int kFragsM = kWarpM / kMmaM;       // 4 mma tiles along M per warp
constexpr int kFragsN = kWarpN / kMmaN;       // 4 along N
constexpr int kRowBytes = kBlockK + 16;       // padded row of the int8 tiles (see the header)
constexpr int kStages = 2;                    // cp.async pipeline depth (static shared memory caps it)
constexpr int kMaxWordsPerRow = kBlockK / 4;  // packed words of one weight row per tile, 8-bit storage
constexpr int kLanesPerRow = kBlockK / 4;     // 32-bit lanes of 4 codes per decoded row
static_assert((kBlockM / kWarpM) * (kBlockN / kWarpN) * 32 == kThreads, "8 warps tile the block");
static_assert(kBlockN / kWarpN == kWarpsN, "warp grid");
static_assert(kBlockK % kMmaK == 0 && kBlockK % 16 == 0, "K tile of whole mma steps and 16-byte chunks");
static_assert(kRowBytes % 16 == 0, "cp.async 16-byte destinations stay aligned");
static_assert((kBlockM * kBlockK / 16) % kThreads == 0, "x tile copies split evenly");
static_assert((kBlockN * kLanesPerRow) % kThreads == 0, "decode lanes split evenly");

struct SharedTiles {
  alignas(16) uint8_t a[kStages][kBlockM * kRowBytes];             // x codes, 2 x 10 KiB
  alignas(16) uint32_t packed[kStages][kBlockN * kMaxWordsPerRow];  // packed weight, 2 x 8 KiB
  alignas(16) uint8_t b[kBlockN * kRowBytes];                       // decoded int8 weight, 10 KiB
};
static_assert(sizeof(SharedTiles) <= 48 * 1024, "static shared memory limit");

// ---- PTX wrappers (sm_80+). Every asm that touches shared memory clobbers "memory" so that the
// compiler keeps shared loads and stores on their side of the copies and waits. The per-thread
// phases below are __host__ __device__ so that a CPU harness can run a whole block thread by
// thread with the same index code; on the host the copies are plain byte copies (and the harness
// supplies the mma from the PTX fragment formulas).

// 16 bytes global -> shared; src_bytes 0 writes 16 zeros and reads nothing.
MAQD_HD void cp_async_16(void* dst, const void* src, int src_bytes) {
#ifdef __CUDA_ARCH__
#if MAQD_LOWBIT_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
#endif
#else
  for (int i = 0; i < 16; ++i) static_cast<uint8_t*>(dst)[i] = i < src_bytes ? static_cast<const uint8_t*>(src)[i] : 0;
#endif
}

// 4 bytes global -> shared; src_bytes 0 writes zeros and reads nothing.
MAQD_HD void cp_async_4(void* dst, const void* src, int src_bytes) {
#ifdef __CUDA_ARCH__
#if MAQD_LOWBIT_SM80
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
#endif
#else
  for (int i = 0; i < 4; ++i) static_cast<uint8_t*>(dst)[i] = i < src_bytes ? static_cast<const uint8_t*>(src)[i] : 0;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if MAQD_LOWBIT_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `kPending` of this thread's most recent copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if MAQD_LOWBIT_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// c += a * b on one m16n8k32 tile: a 4 registers of x codes (u8 or s8), b 2 of weight codes (s8).
template <bool kSigned>
__device__ __forceinline__ void mma_16832(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if MAQD_LOWBIT_SM80
  if constexpr (kSigned) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

MAQD_HD uint32_t load_shared_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

MAQD_HD float int_to_float_rn(int32_t v) {
#ifdef __CUDA_ARCH__
  return __int2float_rn(v);
#else
  return static_cast<float>(v);
#endif
}

// Where a thread's warp sits in the block tile, and the thread in its warp.
struct ThreadPlace {
  int g;        // groupID = lane / 4
  int t;        // threadID_in_group = lane % 4
  int warp_m0;  // first block-tile row of the warp's 64 x 32 sub-tile
  int warp_n0;  // first block-tile column
};

MAQD_HD ThreadPlace thread_place(int tid) {
  const int lane = tid & 31;
  const int warp = tid >> 5;
  return ThreadPlace{lane >> 2, lane & 3, (warp / kWarpsN) * kWarpM, (warp % kWarpsN) * kWarpN};
}

// Issues the copies of K tile `k0` (in codes) into `stage`: x rows m0 .. m0 + 127, codes
// k0 .. k0 + 63 and weight rows n0 .. n0 + 127, words k0 / per_word .. (k0 + 64) / per_word - 1.
// kWidth is the storage width (1, 2, 4, 8); per_word = 32 / kWidth divides 64, so a tile holds
// whole words.
template <int kWidth>
MAQD_HD void load_tile(SharedTiles& s, int stage, const uint8_t* x, int64_t lda, const uint32_t* packed, int64_t words,
                       int64_t m, int64_t n, int64_t m0, int64_t n0, int64_t k0, int tid) {
  constexpr int kChunksPerRow = kBlockK / 16;
  MAQD_UNROLL
  for (int i = 0; i < kBlockM * kChunksPerRow / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const int64_t grow = m0 + row;
    const int64_t gcol = k0 + chunk * 16;
    // lda % 16 == 0, so a 16-byte chunk lies wholly inside or wholly outside a row.
    const bool valid = grow < m && gcol < lda;
    cp_async_16(&s.a[stage][row * kRowBytes + chunk * 16], valid ? x + grow * lda + gcol : x, valid ? 16 : 0);
  }
  constexpr int kPerWord = 32 / kWidth;
  constexpr int kWordsPerRow = kBlockK / kPerWord;  // 2, 4, 8 or 16
  static_assert(kBlockK % kPerWord == 0 && (kBlockN * kWordsPerRow) % kThreads == 0, "whole words per tile");
  const int64_t w0 = k0 / kPerWord;
  MAQD_UNROLL
  for (int i = 0; i < kBlockN * kWordsPerRow / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kWordsPerRow;
    const int word = c % kWordsPerRow;
    const int64_t grow = n0 + row;
    const int64_t gword = w0 + word;
    const bool valid = grow < n && gword < words;
    cp_async_4(&s.packed[stage][row * kWordsPerRow + word], valid ? packed + grow * words + gword : packed,
               valid ? 4 : 0);
  }
}

// Decodes the packed tile of `stage` into s.b: row r, bytes 4 j .. 4 j + 3 = codes 4 j .. 4 j + 3
// of weight row n0 + r (K tile-relative), one decode_four_codes lane per 32-bit store.
// decode_four_codes depends on `bits` only through storage_bits(bits) and bits == 1, so passing
// the storage width kWidth decodes exactly as the real bit width would (3 as 4, 5 .. 7 as 8).
template <int kWidth>
MAQD_HD void decode_tile(SharedTiles& s, int stage, int tid) {
  constexpr int kPerWord = 32 / kWidth;
  constexpr int kWordsPerRow = kBlockK / kPerWord;
  MAQD_UNROLL
  for (int i = 0; i < kBlockN * kLanesPerRow / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kLanesPerRow;
    const int code = (c % kLanesPerRow) * 4;
    // per_word is a multiple of 4, so codes code .. code + 3 share one word.
    const uint32_t word = s.packed[stage][row * kWordsPerRow + code / kPerWord];
    *reinterpret_cast<uint32_t*>(&s.b[row * kRowBytes + code]) = decode_four_codes(word, code % kPerWord, kWidth);
  }
}

// The A and B fragments of mma step `kk` (0 or 32 within the K tile) for one thread, as laid out
// in "Matrix Fragments for mma.m16n8k32" (see the header): af[mi] is the 16 x 32 tile of rows
// warp_m0 + 16 mi .., bf[ni] the 32 x 8 tile of weight rows warp_n0 + 8 ni ...
MAQD_HD void load_fragments(const SharedTiles& s, int stage, int kk, const ThreadPlace& p, uint32_t (&af)[kFragsM][4],
                            uint32_t (&bf)[kFragsN][2]) {
  MAQD_UNROLL
  for (int mi = 0; mi < kFragsM; ++mi) {
    const uint8_t* a = s.a[stage] + (p.warp_m0 + mi * kMmaM + p.g) * kRowBytes + kk + 4 * p.t;
    af[mi][0] = load_shared_u32(a);                       // row g,     k 4t .. 4t + 3
    af[mi][1] = load_shared_u32(a + 8 * kRowBytes);       // row g + 8, k 4t ..
    af[mi][2] = load_shared_u32(a + 16);                  // row g,     k 16 + 4t ..
    af[mi][3] = load_shared_u32(a + 8 * kRowBytes + 16);  // row g + 8, k 16 + 4t ..
  }
  MAQD_UNROLL
  for (int ni = 0; ni < kFragsN; ++ni) {
    const uint8_t* b = s.b + (p.warp_n0 + ni * kMmaN + p.g) * kRowBytes + kk + 4 * p.t;
    bf[ni][0] = load_shared_u32(b);       // column g, k 4t .. 4t + 3
    bf[ni][1] = load_shared_u32(b + 16);  // column g, k 16 + 4t ..
  }
}

// The epilogue of one thread's accumulators: c[r] of tile (mi, ni) is output (row g + 8 (r >= 2),
// column 2t + (r & 1)) of that 16 x 8 tile; rows >= m and columns >= n are dropped.
MAQD_HD void store_outputs(const int32_t (&acc)[kFragsM][kFragsN][4], const ThreadPlace& p, int64_t m0, int64_t n0,
                           int64_t m, int64_t n, const Epilogue& e, void* out, int out_dtype) {
  MAQD_UNROLL
  for (int ni = 0; ni < kFragsN; ++ni) {
    MAQD_UNROLL
    for (int mi = 0; mi < kFragsM; ++mi) {
      MAQD_UNROLL
      for (int r = 0; r < 4; ++r) {
        const int64_t row = m0 + p.warp_m0 + mi * kMmaM + p.g + (r >= 2 ? 8 : 0);
        const int64_t col = n0 + p.warp_n0 + ni * kMmaN + 2 * p.t + (r & 1);
        if (row < m && col < n) {
          store_epilogue(out, row * n + col, out_dtype, e, epilogue_value(e, int_to_float_rn(acc[mi][ni][r]), col));
        }
      }
    }
  }
}

// One block: output tiles (m0 .. m0 + 127, n0 .. n0 + 127) for m0 = 128 * (blockIdx.y + j gridDim.y).
// Template: storage width of the weight codes, and whether x holds int8 (else uint8) codes.
template <int kWidth, bool kSigned>
__global__ void __launch_bounds__(kThreads)
    lowbit_gemm_kernel(const uint8_t* __restrict__ x, int64_t lda, const uint32_t* __restrict__ packed, int64_t words,
                       int64_t m, int64_t n, int64_t k, Epilogue e, void* __restrict__ out, int out_dtype) {
#if MAQD_LOWBIT_SM80
  __shared__ SharedTiles s;
  const int tid = static_cast<int>(threadIdx.x);
  const ThreadPlace place = thread_place(tid);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t m_tiles = (m + kBlockM - 1) / kBlockM;
  const int64_t k_tiles = (k + kBlockK - 1) / kBlockK;

  for (int64_t mt = blockIdx.y; mt < m_tiles; mt += gridDim.y) {
    const int64_t m0 = mt * kBlockM;
    int32_t acc[kFragsM][kFragsN][4];
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0;

    // Pipeline: one commit group per K tile (empty past the last tile), tile kt in stage
    // kt % kStages. The prologue issues tiles 0 .. kStages - 2; step kt issues tile kt + kStages - 1,
    // so kt + kStages groups are committed and wait_group kStages - 1 leaves tiles 0 .. kt landed.
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < k_tiles) load_tile<kWidth>(s, st, x, lda, packed, words, m, n, m0, n0, int64_t{st} * kBlockK, tid);
      cp_async_commit();
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      const int stage = static_cast<int>(kt % kStages);
      // The stage refilled here was last read in step kt - 1, which ended with __syncthreads.
      const int64_t next = kt + kStages - 1;
      if (next < k_tiles) {
        load_tile<kWidth>(s, static_cast<int>(next % kStages), x, lda, packed, words, m, n, m0, n0, next * kBlockK,
                          tid);
      }
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      __syncthreads();  // tile kt, copied by all threads, is visible to all
      decode_tile<kWidth>(s, stage, tid);
      __syncthreads();  // the int8 weight tile is complete
#pragma unroll 1
      for (int kk = 0; kk < kBlockK; kk += kMmaK) {
        uint32_t af[kFragsM][4];
        uint32_t bf[kFragsN][2];
        load_fragments(s, stage, kk, place, af, bf);
#pragma unroll
        for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
          for (int ni = 0; ni < kFragsN; ++ni) mma_16832<kSigned>(acc[mi][ni], af[mi], bf[ni]);
      }
      __syncthreads();  // all reads of stage `stage` and of s.b are done before they are refilled
    }
    store_outputs(acc, place, m0, n0, m, n, e, out, out_dtype);
  }
#endif
}

// ---- argument checks shared by both entry points

void check_arguments(const char* op, uintptr_t x, int64_t lda, uintptr_t packed, int64_t m, int64_t n, int64_t k,
                     int bits, uintptr_t combined_scale, uintptr_t out_scale, uintptr_t out_shift, int out_bits,
                     uintptr_t out, int out_dtype) {
  const std::string name(op);
  if (m < 0 || n < 0 || k < 0) throw std::invalid_argument(name + ": negative size");
  if (bits < 1 || bits > 8) throw std::invalid_argument(name + ": bits must be in 1..8, got " + std::to_string(bits));
  if (lda < k || lda % 16 != 0) {
    throw std::invalid_argument(name + ": lda must be a multiple of 16 and >= k, got lda " + std::to_string(lda) +
                                " for k " + std::to_string(k));
  }
  if (out_dtype < 0 || out_dtype > kOutUint8) {
    throw std::invalid_argument(name + ": unsupported out_dtype code " + std::to_string(out_dtype));
  }
  if (out_dtype == kOutUint8 ? (out_bits < 1 || out_bits > 8) : out_bits != 0) {
    throw std::invalid_argument(name + ": out_bits must be in 1..8 for uint8 output and 0 for float output, got " +
                                std::to_string(out_bits));
  }
  if ((out_scale == 0) != (out_shift == 0)) {
    throw std::invalid_argument(name + ": out_scale and out_shift come together");
  }
  if (m > 0 && n > 0) {
    if (combined_scale == 0 || out == 0 || (k > 0 && (x == 0 || packed == 0))) {
      throw std::invalid_argument(name + ": null tensor pointer");
    }
  }
}

Epilogue make_epilogue(uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                       int out_bits, float out_act_scale) {
  return Epilogue{as_const<float>(combined_scale), as_const<float>(bias), as_const<float>(out_scale),
                  as_const<float>(out_shift), out_bits, out_act_scale};
}

template <bool kSigned>
void launch_for_width(int width, dim3 grid, cudaStream_t stream, const uint8_t* x, int64_t lda,
                      const uint32_t* packed, int64_t words, int64_t m, int64_t n, int64_t k, const Epilogue& e,
                      void* out, int out_dtype) {
  switch (width) {
    case 1:
      lowbit_gemm_kernel<1, kSigned><<<grid, kThreads, 0, stream>>>(x, lda, packed, words, m, n, k, e, out, out_dtype);
      return;
    case 2:
      lowbit_gemm_kernel<2, kSigned><<<grid, kThreads, 0, stream>>>(x, lda, packed, words, m, n, k, e, out, out_dtype);
      return;
    case 4:
      lowbit_gemm_kernel<4, kSigned><<<grid, kThreads, 0, stream>>>(x, lda, packed, words, m, n, k, e, out, out_dtype);
      return;
    default:
      lowbit_gemm_kernel<8, kSigned><<<grid, kThreads, 0, stream>>>(x, lda, packed, words, m, n, k, e, out, out_dtype);
  }
}

}  // namespace

void lowbit_gemm_cuda(uintptr_t x, bool x_signed, int64_t lda, uintptr_t packed, int64_t m, int64_t n, int64_t k,
                      int bits, uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype, uintptr_t stream) {
  check_arguments("lowbit_gemm", x, lda, packed, m, n, k, bits, combined_scale, out_scale, out_shift, out_bits, out,
                  out_dtype);
  if (m == 0 || n == 0) return;
  if (k > 0 && x % 16 != 0) throw std::invalid_argument("lowbit_gemm: x must be 16-byte aligned (cp.async)");
  if (k > 0 && packed % 4 != 0) throw std::invalid_argument("lowbit_gemm: packed must be 4-byte aligned");

  int device = 0;
  int major = 0;
  int minor = 0;
  check_cuda(cudaGetDevice(&device), "lowbit_gemm: cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "lowbit_gemm: device query");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "lowbit_gemm: device query");
  if (major < 8) {
    throw std::runtime_error("lowbit_gemm: the int8 tensor-core kernel needs compute capability 8.0 or newer, device " +
                             std::to_string(device) + " is " + std::to_string(major) + "." + std::to_string(minor));
  }

  const int64_t n_tiles = (n + kBlockN - 1) / kBlockN;
  const int64_t m_tiles = (m + kBlockM - 1) / kBlockM;
  if (n_tiles > 0x7fffffff) throw std::invalid_argument("lowbit_gemm: n too large for one launch");
  // N tiles vary fastest, so the blocks resident at once share x tiles in L2; gridDim.y is capped
  // at 65535 and the kernel walks any further M tiles itself.
  const dim3 grid(static_cast<unsigned int>(n_tiles), static_cast<unsigned int>(std::min<int64_t>(m_tiles, 65535)));
  const Epilogue e = make_epilogue(combined_scale, bias, out_scale, out_shift, out_bits, out_act_scale);
  const int width = storage_bits(bits);
  const int64_t words = packed_words(k, bits);
  const auto* xp = as_const<uint8_t>(x);
  const auto* wp = as_const<uint32_t>(packed);
  void* op = reinterpret_cast<void*>(out);
  if (x_signed) {
    launch_for_width<true>(width, grid, as_stream(stream), xp, lda, wp, words, m, n, k, e, op, out_dtype);
  } else {
    launch_for_width<false>(width, grid, as_stream(stream), xp, lda, wp, words, m, n, k, e, op, out_dtype);
  }
  check_cuda(cudaGetLastError(), "lowbit_gemm");
}

// The same contract on CPU memory: the weight row is decoded through decode_four_codes, four
// codes at a time (the SWAR decode the device uses), accumulated exactly in int64, rounded to
// float32 once and sent through the same epilogue functions.
void lowbit_gemm_host(uintptr_t x, bool x_signed, int64_t lda, uintptr_t packed, int64_t m, int64_t n, int64_t k,
                      int bits, uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype) {
  check_arguments("lowbit_gemm_host", x, lda, packed, m, n, k, bits, combined_scale, out_scale, out_shift, out_bits,
                  out, out_dtype);
  if (m == 0 || n == 0) return;
  const Epilogue e = make_epilogue(combined_scale, bias, out_scale, out_shift, out_bits, out_act_scale);
  const int per_word = codes_per_word(bits);
  const int64_t words = packed_words(k, bits);
  const auto* weight = as_const<uint32_t>(packed);
  void* dst = reinterpret_cast<void*>(out);
  std::vector<int8_t> q(static_cast<size_t>((k + 3) / 4 * 4));
  for (int64_t o = 0; o < n; ++o) {
    const uint32_t* row = weight + o * words;
    // per_word is a multiple of 4, so codes c .. c + 3 lie in one word; codes past k are decoded
    // from the last word's padding and never used.
    for (int64_t c = 0; c < k; c += 4) {
      const uint32_t lanes = decode_four_codes(row[c / per_word], static_cast<int>(c % per_word), bits);
      for (int i = 0; i < 4; ++i) q[c + i] = static_cast<int8_t>(static_cast<uint8_t>(lanes >> (8 * i)));
    }
    for (int64_t i = 0; i < m; ++i) {
      int64_t acc = 0;
      if (x_signed) {
        const int8_t* xr = as_const<int8_t>(x) + i * lda;
        for (int64_t c = 0; c < k; ++c) acc += static_cast<int64_t>(xr[c]) * q[c];
      } else {
        const uint8_t* xr = as_const<uint8_t>(x) + i * lda;
        for (int64_t c = 0; c < k; ++c) acc += static_cast<int64_t>(xr[c]) * q[c];
      }
      const float y = epilogue_value(e, static_cast<float>(acc), o);
      store_epilogue(dst, i * n + o, out_dtype, e, y);
    }
  }
}

}  // namespace maqd
