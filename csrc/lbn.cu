// CUDA kernels of Layer-Batch Normalization (SPEC.md section 3) and of postsynaptic-potential
// normalization (PSP, section 4: the same passes without a mean, see lbn.cuh). The partitions,
// walks and math are in lbn.cuh; run_forward and run_backward below order the passes once, for the kernels and for
// their host twins alike (DeviceExec launches, HostExec runs the same blocks in serial loops).
//
// Forward, training: stats (one Welford partial per block, or per column and row tile), then a
//   finalize with a warp (a block, when groups are few) per group that merges its partials in a
//   fixed order and writes mean, rstd and the new running statistics, then the apply pass. x is
//   read twice (the second time mostly from L2 when it fits), y written once.
// Forward, eval: the finalize reads the running statistics; x read once, y written once.
// Backward: per-channel partials of sum dy and sum dy x_hat, a finalize per channel (parameter
//   gradients, w-weighted terms) and, for groups of several channels, one per group (the two
//   group means), then dx. dy and x are read twice, dx written once; in eval without
//   parameter gradients only the dx pass runs.
// Every reduction merges in an order fixed by the partition alone: no atomics, so results repeat
// bit for bit from run to run on a GPU with the same SM count.
#include <algorithm>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "launchers.h"
#include "lbn.cuh"

namespace maqd {
namespace {

using namespace lbn;

// Resident 256-thread blocks per SM at full occupancy: the grid aims at this many per SM, so that
// each block's tile is as large as the machine allows and the per-block merge is amortized.
constexpr int kBlocksPerSm = 8;
// The least work per block, in elements: below it a block's setup and merge outweigh its loads.
constexpr int64_t kMinTileElements = 2048;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

int64_t next_power_of_two(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// x seen as (n, c, s), channels in `groups` groups.
struct Shape {
  int64_t n, c, s, groups;

  int64_t per_group() const { return c / groups; }
  int64_t group_run() const { return per_group() * s; }
  int64_t numel() const { return n * c * s; }
  Channels channels() const { return {s, per_group()}; }
};

// Splits rows x width (units of `run` columns) over about kBlocksPerSm blocks per SM; see Partition.
Partition plan(int64_t rows, int64_t width, int64_t run, int elem_bytes, int sm_count) {
  const int wide = 16 / elem_bytes;
  const int64_t target_blocks = static_cast<int64_t>(std::max(sm_count, 1)) * kBlocksPerSm;
  Partition p{};
  p.rows = rows;
  p.width = width;
  p.run = run;
  p.columns = run < kMinRun;
  if (p.columns) {
    // Clamped before rounding up, so that rows wider than 2^32 elements cannot overflow the power of two.
    p.threads_x = static_cast<int>(next_power_of_two(std::min<int64_t>(ceil_div(width, wide), kWarpSize)));
    p.tile_cols = static_cast<int64_t>(p.threads_x) * wide;
    p.col_tiles = ceil_div(width, p.tile_cols);
    const int64_t min_rows = std::max<int64_t>(kThreads / p.threads_x, ceil_div(kMinTileElements, p.tile_cols));
    p.tile_rows = std::max(min_rows, ceil_div(rows, std::max<int64_t>(1, target_blocks / p.col_tiles)));
  } else {
    p.threads_x = kThreads;
    const int64_t per_block = std::max(kMinTileElements, ceil_div(rows * width, target_blocks));
    if (run >= per_block) {
      // Long runs: tiles are pieces of one row, 16-byte aligned where the run is.
      p.tile_cols = round_up(ceil_div(run, ceil_div(run, per_block)), wide);
      p.col_tiles = ceil_div(run, p.tile_cols);
      p.tile_rows = 1;
    } else {
      p.tile_cols = run;
      p.col_tiles = 1;
      p.tile_rows = std::max<int64_t>(1, per_block / run);
    }
  }
  p.row_tiles = ceil_div(rows, p.tile_rows);
  p.tile_rows = ceil_div(rows, p.row_tiles);  // the same rows in fewer, evenly filled tiles
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  if (p.blocks() > kInt32Max || p.tile_rows > kInt32Max || p.tile_cols > kInt32Max) {
    throw std::invalid_argument("layer_batch_norm: x is too large for one grid");
  }
  return p;
}

// The forward statistics reduce over groups; everything else over channels.
Partition stats_partition(const Shape& s, int elem_bytes, int sm_count) {
  return plan(s.n, s.c * s.s, s.group_run(), elem_bytes, sm_count);
}

Partition channel_partition(const Shape& s, int elem_bytes, int sm_count) {
  return plan(s.n, s.c * s.s, s.s, elem_bytes, sm_count);
}

// The widest pack (16 or 8 bytes, else one element) that divides the span a pack may not cross
// (the unit's run, or the row in the column partition) and to which every pointer is aligned.
int pack_elements(int elem_bytes, const Partition& p, std::initializer_list<uintptr_t> pointers) {
  const int64_t span = p.columns ? p.width : p.run;
  for (const int v : {16 / elem_bytes, 8 / elem_bytes}) {
    bool fits = span % v == 0;
    for (const uintptr_t ptr : pointers) fits = fits && ptr % (static_cast<uintptr_t>(v) * elem_bytes) == 0;
    if (fits) return v;
  }
  return 1;
}

// Calls fn with std::integral_constant<int, V> for the pack width `v` of T.
template <typename T, typename Fn>
void dispatch_pack(int v, Fn&& fn) {
  constexpr int kWide = kWideVector<T>;
  constexpr int kHalf = kWide / 2;
  if (v == kWide) {
    fn(std::integral_constant<int, kWide>{});
  } else if (v == kHalf) {
    fn(std::integral_constant<int, kHalf>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// ---------------------------------------------------------------------------------------- kernels

__device__ __forceinline__ Welford shfl_down(const Welford& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.n, offset), __shfl_down_sync(kFullMask, s.mean, offset),
          __shfl_down_sync(kFullMask, s.m2, offset)};
}

__device__ __forceinline__ GradSums shfl_down(const GradSums& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.dy, offset), __shfl_down_sync(kFullMask, s.dy_xhat, offset)};
}

// Lane 0 ends with lane 0 merged with 16, then with 8, ... (warp_merge_host, the same order).
template <typename S>
__device__ __forceinline__ S warp_merge(S s) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) s = combine(s, shfl_down(s, offset));
  return s;
}

// Thread 0 ends with the warps' results merged in warp order (block_merge_host).
template <typename S>
__device__ __forceinline__ S block_merge(S s, S* scratch) {
  s = warp_merge(s);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = s;
  __syncthreads();
  S total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = combine(total, scratch[w]);
  return total;
}

// The finalize kernels give each unit (group or channel) kUnitThreads threads: a warp, or the whole
// block when there are too few units to fill the GPU and each has many partials (groups=1).
// Thread i of a unit merges its partials i, i + kUnitThreads, ... in order, then the unit's threads
// merge as warp_merge / block_merge do; the unit's first thread holds the result.
template <int kUnitThreads, typename S>
__device__ __forceinline__ S unit_merge(S s, S* scratch) {
  if constexpr (kUnitThreads == kWarpSize) {
    return warp_merge(s);
  } else {
    return block_merge(s, scratch);
  }
}

template <int kUnitThreads>
__device__ __forceinline__ int64_t unit_index() {
  return static_cast<int64_t>(blockIdx.x) * (kThreads / kUnitThreads) + threadIdx.x / kUnitThreads;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) segment_stats_kernel(const T* __restrict__ x, Welford* __restrict__ partials,
                                                                 Partition p) {
  __shared__ Welford scratch[kWarps];
  const Tile tile = tile_of(p, blockIdx.x);
  SegmentStats op{load_float(x[tile.unit * p.run]), {}};
  walk_segment<T, V, false>(p, tile, threadIdx.x, x, x, op);
  const Welford total = block_merge(op.sums.welford(), scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) column_stats_kernel(const T* __restrict__ x, Welford* __restrict__ partials,
                                                                Partition p, int64_t group_run) {
  constexpr int kCols = kWideVector<T>;
  __shared__ Welford states[kThreads * kCols];
  const Tile tile = tile_of(p, blockIdx.x);
  ColumnStats<T> op(x, first_column<T>(p, tile, threadIdx.x), p.width, group_run);
  walk_columns<T, V, false>(p, tile, threadIdx.x, x, x, op);
#pragma unroll
  for (int k = 0; k < kCols; ++k) states[threadIdx.x * kCols + k] = op.sums[k].welford();
  __syncthreads();
  for (int col = threadIdx.x; col < tile.cols; col += kThreads) {
    partials[tile.row_tile * p.width + tile.col0 + col] = merge_column<T>(states, p.threads_x, col);
  }
}

template <typename T, int kUnitThreads>
__global__ void __launch_bounds__(kThreads) finalize_stats_kernel(const T* __restrict__ x,
                                                                  const Welford* __restrict__ partials, Partition p,
                                                                  int64_t groups, int64_t group_run, float count,
                                                                  float eps, RunningStats running, bool training,
                                                                  float* __restrict__ mean, float* __restrict__ rstd) {
  __shared__ Welford scratch[kWarps];
  const int64_t g = unit_index<kUnitThreads>();
  const int lane = threadIdx.x % kUnitThreads;
  if (g >= groups) return;
  if (!training) {
    if (lane == 0) finish_eval_group(g, eps, running, mean, rstd);
    return;
  }
  const PartialSet set = partials_of(p, g, group_run);
  Welford state{0.0f, 0.0f, 0.0f};
  for (int64_t k = lane; k < set.count(); k += kUnitThreads) state = combine(state, partials[set.index(k)]);
  state = unit_merge<kUnitThreads>(state, scratch);
  if (lane == 0) finish_training_group(g, state, load_float(x[g * group_run]), count, eps, running, mean, rstd);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) segment_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                   Partition p, Channels ch, Affine affine,
                                                                   const float* __restrict__ mean,
                                                                   const float* __restrict__ rstd) {
  const Tile tile = tile_of(p, blockIdx.x);
  const int64_t g = ch.group_of_channel(tile.unit);
  SegmentForward<T> op{{mean_at(mean, g), rstd[g], affine.weight_at(tile.unit), affine.bias_at(tile.unit)}, y};
  walk_segment<T, V, false>(p, tile, threadIdx.x, x, x, op);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) column_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                  Partition p, Channels ch, Affine affine,
                                                                  const float* __restrict__ mean,
                                                                  const float* __restrict__ rstd) {
  const Tile tile = tile_of(p, blockIdx.x);
  ColumnForward<T> op(first_column<T>(p, tile, threadIdx.x), p.width, ch, affine, mean, rstd, y);
  walk_columns<T, V, false>(p, tile, threadIdx.x, x, x, op);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) segment_grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                     GradSums* __restrict__ partials, Partition p,
                                                                     Channels ch, const float* __restrict__ mean,
                                                                     const float* __restrict__ rstd) {
  __shared__ GradSums scratch[kWarps];
  const Tile tile = tile_of(p, blockIdx.x);
  const int64_t g = ch.group_of_channel(tile.unit);
  SegmentGradSums op{mean_at(mean, g), rstd[g]};
  walk_segment<T, V, true>(p, tile, threadIdx.x, dy, x, op);
  const GradSums total = block_merge(op.sums, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) column_grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                    GradSums* __restrict__ partials, Partition p,
                                                                    Channels ch, const float* __restrict__ mean,
                                                                    const float* __restrict__ rstd) {
  constexpr int kCols = kWideVector<T>;
  __shared__ GradSums states[kThreads * kCols];
  const Tile tile = tile_of(p, blockIdx.x);
  ColumnGradSums<T> op(first_column<T>(p, tile, threadIdx.x), p.width, ch, mean, rstd);
  walk_columns<T, V, true>(p, tile, threadIdx.x, dy, x, op);
#pragma unroll
  for (int k = 0; k < kCols; ++k) states[threadIdx.x * kCols + k] = op.sums[k];
  __syncthreads();
  for (int col = threadIdx.x; col < tile.cols; col += kThreads) {
    partials[tile.row_tile * p.width + tile.col0 + col] = merge_column<T>(states, p.threads_x, col);
  }
}

template <int kUnitThreads>
__global__ void __launch_bounds__(kThreads) finalize_channels_kernel(const GradSums* __restrict__ partials,
                                                                     Partition p, int64_t channels, int64_t plane,
                                                                     ChannelResults results) {
  __shared__ GradSums scratch[kWarps];
  const int64_t c = unit_index<kUnitThreads>();
  const int lane = threadIdx.x % kUnitThreads;
  if (c >= channels) return;
  const PartialSet set = partials_of(p, c, plane);
  GradSums sums{0.0f, 0.0f};
  for (int64_t k = lane; k < set.count(); k += kUnitThreads) sums = combine(sums, partials[set.index(k)]);
  sums = unit_merge<kUnitThreads>(sums, scratch);
  if (lane == 0) finish_channel(c, sums, results);
}

// The w-weighted sums of each group's channels, then the two means.
template <int kUnitThreads>
__global__ void __launch_bounds__(kThreads) finalize_groups_kernel(const GradSums* __restrict__ terms, int64_t groups,
                                                                   int64_t per_group, float count, bool centered,
                                                                   GroupGradMeans* __restrict__ group_means) {
  __shared__ GradSums scratch[kWarps];
  const int64_t g = unit_index<kUnitThreads>();
  const int lane = threadIdx.x % kUnitThreads;
  if (g >= groups) return;
  GradSums sums{0.0f, 0.0f};
  for (int64_t k = lane; k < per_group; k += kUnitThreads) sums = combine(sums, terms[g * per_group + k]);
  sums = unit_merge<kUnitThreads>(sums, scratch);
  if (lane == 0) group_means[g] = group_grad_means(sums, count, centered);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) segment_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                    T* __restrict__ dx, Partition p, Channels ch,
                                                                    Affine affine, const float* __restrict__ mean,
                                                                    const float* __restrict__ rstd,
                                                                    const GroupGradMeans* __restrict__ group_means,
                                                                    bool training) {
  const Tile tile = tile_of(p, blockIdx.x);
  SegmentBackward<T> op{backward_coefficients(tile.unit, ch, affine, mean, rstd, group_means, training), dx};
  walk_segment<T, V, true>(p, tile, threadIdx.x, dy, x, op);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) column_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                   T* __restrict__ dx, Partition p, Channels ch,
                                                                   Affine affine, const float* __restrict__ mean,
                                                                   const float* __restrict__ rstd,
                                                                   const GroupGradMeans* __restrict__ group_means,
                                                                   bool training) {
  const Tile tile = tile_of(p, blockIdx.x);
  ColumnBackward<T> op(first_column<T>(p, tile, threadIdx.x), p.width, ch, affine, mean, rstd, group_means,
                       training, dx);
  walk_columns<T, V, true>(p, tile, threadIdx.x, dy, x, op);
}

// Threads per unit in the finalize kernels: a block while the units alone cannot fill the SMs.
int unit_threads(int64_t units, int sm_count) { return units < sm_count ? kThreads : kWarpSize; }

// Calls fn with std::integral_constant<int, kUnitThreads> for `units` units.
template <typename Fn>
void dispatch_unit_threads(int64_t units, int sm_count, Fn&& fn) {
  if (unit_threads(units, sm_count) == kThreads) {
    fn(std::integral_constant<int, kThreads>{});
  } else {
    fn(std::integral_constant<int, kWarpSize>{});
  }
}

unsigned int finalize_blocks(int64_t units, int unit_threads) {
  return static_cast<unsigned int>(ceil_div(units, kThreads / unit_threads));
}

struct DeviceExec {
  cudaStream_t stream;
  int sm_count;

  template <typename T, int V>
  void stats(const T* x, Welford* partials, const Partition& p, int64_t group_run) const {
    if (p.columns) {
      column_stats_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(x, partials, p, group_run);
    } else {
      segment_stats_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(x, partials, p);
    }
    check_cuda(cudaGetLastError(), "layer_batch_norm statistics kernel launch");
  }

  template <typename T>
  void finalize_stats(const T* x, const Welford* partials, const Partition& p, int64_t groups, int64_t group_run,
                      float count, float eps, const RunningStats& running, bool training, float* mean,
                      float* rstd) const {
    dispatch_unit_threads(groups, sm_count, [&](auto threads) {
      constexpr int kUnitThreads = decltype(threads)::value;
      finalize_stats_kernel<T, kUnitThreads><<<finalize_blocks(groups, kUnitThreads), kThreads, 0, stream>>>(
          x, partials, p, groups, group_run, count, eps, running, training, mean, rstd);
    });
    check_cuda(cudaGetLastError(), "layer_batch_norm finalize kernel launch");
  }

  template <typename T, int V>
  void forward(const T* x, T* y, const Partition& p, const Channels& ch, const Affine& affine, const float* mean,
               const float* rstd) const {
    if (p.columns) {
      column_forward_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(x, y, p, ch, affine, mean, rstd);
    } else {
      segment_forward_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(x, y, p, ch, affine, mean, rstd);
    }
    check_cuda(cudaGetLastError(), "layer_batch_norm forward kernel launch");
  }

  template <typename T, int V>
  void grad_sums(const T* dy, const T* x, GradSums* partials, const Partition& p, const Channels& ch,
                 const float* mean, const float* rstd) const {
    if (p.columns) {
      column_grad_sums_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(dy, x, partials, p, ch, mean, rstd);
    } else {
      segment_grad_sums_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(dy, x, partials, p, ch, mean, rstd);
    }
    check_cuda(cudaGetLastError(), "layer_batch_norm gradient sums kernel launch");
  }

  void finalize_channels(const GradSums* partials, const Partition& p, int64_t channels, int64_t plane,
                         const ChannelResults& results) const {
    dispatch_unit_threads(channels, sm_count, [&](auto threads) {
      constexpr int kUnitThreads = decltype(threads)::value;
      finalize_channels_kernel<kUnitThreads><<<finalize_blocks(channels, kUnitThreads), kThreads, 0, stream>>>(
          partials, p, channels, plane, results);
    });
    check_cuda(cudaGetLastError(), "layer_batch_norm channel finalize kernel launch");
  }

  void finalize_groups(const GradSums* terms, int64_t groups, int64_t per_group, float count, bool centered,
                       GroupGradMeans* group_means) const {
    dispatch_unit_threads(groups, sm_count, [&](auto threads) {
      constexpr int kUnitThreads = decltype(threads)::value;
      finalize_groups_kernel<kUnitThreads><<<finalize_blocks(groups, kUnitThreads), kThreads, 0, stream>>>(
          terms, groups, per_group, count, centered, group_means);
    });
    check_cuda(cudaGetLastError(), "layer_batch_norm group finalize kernel launch");
  }

  template <typename T, int V>
  void backward(const T* dy, const T* x, T* dx, const Partition& p, const Channels& ch, const Affine& affine,
                const float* mean, const float* rstd, const GroupGradMeans* group_means, bool training) const {
    if (p.columns) {
      column_backward_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(dy, x, dx, p, ch, affine, mean, rstd,
                                                                         group_means, training);
    } else {
      segment_backward_kernel<T, V><<<p.blocks(), kThreads, 0, stream>>>(dy, x, dx, p, ch, affine, mean, rstd,
                                                                          group_means, training);
    }
    check_cuda(cudaGetLastError(), "layer_batch_norm backward kernel launch");
  }
};

// ------------------------------------------------------------------------------------ host twins

// warp_merge over 32 lane states, in place: lane 0 holds the result.
template <typename S>
S warp_merge_host(S* lanes) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    for (int lane = 0; lane < offset; ++lane) lanes[lane] = combine(lanes[lane], lanes[lane + offset]);
  }
  return lanes[0];
}

// block_merge over kThreads thread states, in place.
template <typename S>
S block_merge_host(S* threads) {
  S total = warp_merge_host(threads);
  for (int w = 1; w < kWarps; ++w) total = combine(total, warp_merge_host(threads + w * kWarpSize));
  return total;
}

// A finalize kernel's merge of one unit's `count` partials with `unit_threads` threads.
template <typename S, typename Get>
S unit_merge_host(int unit_threads, int64_t count, Get get) {
  S threads[kThreads];
  for (int t = 0; t < unit_threads; ++t) {
    threads[t] = S{};
    for (int64_t k = t; k < count; k += unit_threads) threads[t] = combine(threads[t], get(k));
  }
  return unit_threads == kWarpSize ? warp_merge_host(threads) : block_merge_host(threads);
}

// Runs a kernel's blocks one after another and, within each, its threads.
struct HostExec {
  int sm_count;

  template <typename T, int V>
  void stats(const T* x, Welford* partials, const Partition& p, int64_t group_run) const {
    constexpr int kCols = kWideVector<T>;
    std::vector<Welford> states(kThreads * kCols);
    for (int64_t b = 0; b < p.blocks(); ++b) {
      const Tile tile = tile_of(p, b);
      if (p.columns) {
        for (int t = 0; t < kThreads; ++t) {
          ColumnStats<T> op(x, first_column<T>(p, tile, t), p.width, group_run);
          walk_columns<T, V, false>(p, tile, t, x, x, op);
          for (int k = 0; k < kCols; ++k) states[t * kCols + k] = op.sums[k].welford();
        }
        for (int col = 0; col < tile.cols; ++col) {
          partials[tile.row_tile * p.width + tile.col0 + col] = merge_column<T>(states.data(), p.threads_x, col);
        }
      } else {
        for (int t = 0; t < kThreads; ++t) {
          SegmentStats op{load_float(x[tile.unit * p.run]), {}};
          walk_segment<T, V, false>(p, tile, t, x, x, op);
          states[t] = op.sums.welford();
        }
        partials[b] = block_merge_host(states.data());
      }
    }
  }

  template <typename T>
  void finalize_stats(const T* x, const Welford* partials, const Partition& p, int64_t groups, int64_t group_run,
                      float count, float eps, const RunningStats& running, bool training, float* mean,
                      float* rstd) const {
    for (int64_t g = 0; g < groups; ++g) {
      if (!training) {
        finish_eval_group(g, eps, running, mean, rstd);
        continue;
      }
      const PartialSet set = partials_of(p, g, group_run);
      const Welford state = unit_merge_host<Welford>(unit_threads(groups, sm_count), set.count(),
                                                     [&](int64_t k) { return partials[set.index(k)]; });
      finish_training_group(g, state, load_float(x[g * group_run]), count, eps, running, mean, rstd);
    }
  }

  template <typename T, int V>
  void forward(const T* x, T* y, const Partition& p, const Channels& ch, const Affine& affine, const float* mean,
               const float* rstd) const {
    for (int64_t b = 0; b < p.blocks(); ++b) {
      const Tile tile = tile_of(p, b);
      for (int t = 0; t < kThreads; ++t) {
        if (p.columns) {
          ColumnForward<T> op(first_column<T>(p, tile, t), p.width, ch, affine, mean, rstd, y);
          walk_columns<T, V, false>(p, tile, t, x, x, op);
        } else {
          const int64_t g = ch.group_of_channel(tile.unit);
          SegmentForward<T> op{{mean_at(mean, g), rstd[g], affine.weight_at(tile.unit), affine.bias_at(tile.unit)}, y};
          walk_segment<T, V, false>(p, tile, t, x, x, op);
        }
      }
    }
  }

  template <typename T, int V>
  void grad_sums(const T* dy, const T* x, GradSums* partials, const Partition& p, const Channels& ch,
                 const float* mean, const float* rstd) const {
    constexpr int kCols = kWideVector<T>;
    std::vector<GradSums> states(kThreads * kCols);
    for (int64_t b = 0; b < p.blocks(); ++b) {
      const Tile tile = tile_of(p, b);
      if (p.columns) {
        for (int t = 0; t < kThreads; ++t) {
          ColumnGradSums<T> op(first_column<T>(p, tile, t), p.width, ch, mean, rstd);
          walk_columns<T, V, true>(p, tile, t, dy, x, op);
          for (int k = 0; k < kCols; ++k) states[t * kCols + k] = op.sums[k];
        }
        for (int col = 0; col < tile.cols; ++col) {
          partials[tile.row_tile * p.width + tile.col0 + col] = merge_column<T>(states.data(), p.threads_x, col);
        }
      } else {
        const int64_t g = ch.group_of_channel(tile.unit);
        for (int t = 0; t < kThreads; ++t) {
          SegmentGradSums op{mean_at(mean, g), rstd[g]};
          walk_segment<T, V, true>(p, tile, t, dy, x, op);
          states[t] = op.sums;
        }
        partials[b] = block_merge_host(states.data());
      }
    }
  }

  void finalize_channels(const GradSums* partials, const Partition& p, int64_t channels, int64_t plane,
                         const ChannelResults& results) const {
    for (int64_t c = 0; c < channels; ++c) {
      const PartialSet set = partials_of(p, c, plane);
      finish_channel(c, unit_merge_host<GradSums>(unit_threads(channels, sm_count), set.count(),
                                                  [&](int64_t k) { return partials[set.index(k)]; }),
                     results);
    }
  }

  void finalize_groups(const GradSums* terms, int64_t groups, int64_t per_group, float count, bool centered,
                       GroupGradMeans* group_means) const {
    for (int64_t g = 0; g < groups; ++g) {
      const GradSums sums = unit_merge_host<GradSums>(unit_threads(groups, sm_count), per_group,
                                                      [&](int64_t k) { return terms[g * per_group + k]; });
      group_means[g] = group_grad_means(sums, count, centered);
    }
  }

  template <typename T, int V>
  void backward(const T* dy, const T* x, T* dx, const Partition& p, const Channels& ch, const Affine& affine,
                const float* mean, const float* rstd, const GroupGradMeans* group_means, bool training) const {
    for (int64_t b = 0; b < p.blocks(); ++b) {
      const Tile tile = tile_of(p, b);
      for (int t = 0; t < kThreads; ++t) {
        if (p.columns) {
          ColumnBackward<T> op(first_column<T>(p, tile, t), p.width, ch, affine, mean, rstd, group_means, training,
                               dx);
          walk_columns<T, V, true>(p, tile, t, dy, x, op);
        } else {
          SegmentBackward<T> op{backward_coefficients(tile.unit, ch, affine, mean, rstd, group_means, training), dx};
          walk_segment<T, V, true>(p, tile, t, dy, x, op);
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------ the passes

struct ForwardArgs {
  uintptr_t x, y, mean, rstd, workspace;
  Affine affine;
  RunningStats running;
  Shape shape;
  int dtype;
  bool training;
  float eps;
  int sm_count;
};

template <typename Exec>
void run_forward(const Exec& exec, const ForwardArgs& a) {
  const Shape& s = a.shape;
  dispatch_float_dtype(a.dtype, "layer_batch_norm_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* x = as_const<T>(a.x);
    float* mean = as_mutable<float>(a.mean);
    float* rstd = as_mutable<float>(a.rstd);
    Welford* partials = as_mutable<Welford>(a.workspace);
    const float count = static_cast<float>(s.n * s.group_run());
    Partition stats{};
    if (a.training) {
      if (s.numel() == 0) return;  // the launcher returns the reference's NaN statistics
      stats = stats_partition(s, sizeof(T), a.sm_count);
      dispatch_pack<T>(pack_elements(sizeof(T), stats, {a.x}), [&](auto v) {
        exec.template stats<T, decltype(v)::value>(x, partials, stats, s.group_run());
      });
    }
    exec.template finalize_stats<T>(x, partials, stats, s.groups, s.group_run(), count, a.eps, a.running, a.training,
                                    mean, rstd);
    if (s.numel() == 0) return;
    const Partition apply = channel_partition(s, sizeof(T), a.sm_count);
    dispatch_pack<T>(pack_elements(sizeof(T), apply, {a.x, a.y}), [&](auto v) {
      exec.template forward<T, decltype(v)::value>(x, as_mutable<T>(a.y), apply, s.channels(), a.affine, mean, rstd);
    });
  });
}

// `mean` is 0 (absent) exactly when not centered (PSP).
struct BackwardArgs {
  uintptr_t grad, x, grad_x, mean, rstd, grad_weight, grad_bias, workspace;
  Affine affine;
  Shape shape;
  int dtype;
  bool training;
  int sm_count;

  bool centered() const { return mean != 0; }
};

// Workspace of the backward, in floats: partials, then (C,) channel terms, then (G,) group means.
struct BackwardWorkspace {
  GradSums* partials;
  GradSums* terms;
  GroupGradMeans* group_means;
};

BackwardWorkspace backward_workspace(uintptr_t workspace, const Partition& p, const Shape& s) {
  GradSums* partials = as_mutable<GradSums>(workspace);
  GradSums* terms = partials + p.partials();
  return {partials, terms, reinterpret_cast<GroupGradMeans*>(terms + s.c)};
}

template <typename Exec>
void run_backward(const Exec& exec, const BackwardArgs& a) {
  const Shape& s = a.shape;
  if (s.numel() == 0) return;
  dispatch_float_dtype(a.dtype, "layer_batch_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* dy = as_const<T>(a.grad);
    const T* x = as_const<T>(a.x);
    const float* mean = as_const<float>(a.mean);
    const float* rstd = as_const<float>(a.rstd);
    const Partition p = channel_partition(s, sizeof(T), a.sm_count);
    const BackwardWorkspace ws = backward_workspace(a.workspace, p, s);
    const Channels ch = s.channels();
    if (a.training || a.grad_weight != 0 || a.grad_bias != 0) {
      dispatch_pack<T>(pack_elements(sizeof(T), p, {a.grad, a.x}), [&](auto v) {
        exec.template grad_sums<T, decltype(v)::value>(dy, x, ws.partials, p, ch, mean, rstd);
      });
      const float count = static_cast<float>(s.n * s.group_run());
      const ChannelResults results{a.affine,     as_mutable<void>(a.grad_weight), as_mutable<void>(a.grad_bias),
                                   ws.terms,     ws.group_means,                  s.per_group(),
                                   count,        a.training,                      a.centered()};
      exec.finalize_channels(ws.partials, p, s.c, s.s, results);
      if (a.training && s.per_group() > 1) {
        exec.finalize_groups(ws.terms, s.groups, s.per_group(), count, a.centered(), ws.group_means);
      }
    }
    dispatch_pack<T>(pack_elements(sizeof(T), p, {a.grad, a.x, a.grad_x}), [&](auto v) {
      exec.template backward<T, decltype(v)::value>(dy, x, as_mutable<T>(a.grad_x), p, ch, a.affine, mean, rstd,
                                                    ws.group_means, a.training);
    });
  });
}

int element_bytes(int dtype) { return static_cast<FloatDType>(dtype) == FloatDType::kFloat32 ? 4 : 2; }

// Centered (LBN) with a mean; not centered (PSP) with mean, running_mean and new_running_mean 0 and
// the running second moment in running_var / new_running_var.
ForwardArgs forward_args(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                         uintptr_t running_mean, uintptr_t running_var, int stats_dtype, uintptr_t y, uintptr_t mean,
                         uintptr_t rstd, uintptr_t new_running_mean, uintptr_t new_running_var, uintptr_t workspace,
                         int64_t n, int64_t c, int64_t s, int64_t groups, int dtype, bool training, double momentum,
                         float eps, int sm_count, bool centered) {
  const int64_t count = n * (c / groups) * s;
  const double correction = centered ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
  const RunningStats running{as_const<void>(running_mean),
                             as_const<void>(running_var),
                             as_mutable<void>(new_running_mean),
                             as_mutable<void>(new_running_var),
                             stats_dtype,
                             static_cast<float>(momentum),
                             static_cast<float>(1.0 - momentum),
                             static_cast<float>(correction),
                             centered};
  return {x,
          y,
          mean,
          rstd,
          workspace,
          Affine{as_const<void>(weight), weight_dtype, as_const<void>(bias), bias_dtype},
          running,
          Shape{n, c, s, groups},
          dtype,
          training,
          eps,
          sm_count};
}

}  // namespace

// ------------------------------------------------------------------------------------ entry points

int64_t layer_batch_norm_workspace(int64_t n, int64_t c, int64_t s, int64_t groups, int dtype, bool backward,
                                   bool training, int sm_count) {
  const Shape shape{n, c, s, groups};
  if (shape.numel() == 0) return 0;
  const int bytes = element_bytes(dtype);
  if (!backward) return training ? 3 * stats_partition(shape, bytes, sm_count).partials() : 0;
  const int64_t floats = 2 * channel_partition(shape, bytes, sm_count).partials();
  return training ? floats + 2 * (c + groups) : floats;
}

void layer_batch_norm_forward_cuda(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                                   uintptr_t running_mean, uintptr_t running_var, int stats_dtype, uintptr_t y,
                                   uintptr_t mean, uintptr_t rstd, uintptr_t new_running_mean,
                                   uintptr_t new_running_var, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                   int64_t groups, int dtype, bool training, double momentum, float eps, int sm_count,
                                   uintptr_t stream) {
  run_forward(DeviceExec{as_stream(stream), sm_count},
              forward_args(x, weight, weight_dtype, bias, bias_dtype, running_mean, running_var, stats_dtype, y, mean,
                           rstd, new_running_mean, new_running_var, workspace, n, c, s, groups, dtype, training,
                           momentum, eps, sm_count, true));
}

void layer_batch_norm_forward_host(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                                   uintptr_t running_mean, uintptr_t running_var, int stats_dtype, uintptr_t y,
                                   uintptr_t mean, uintptr_t rstd, uintptr_t new_running_mean,
                                   uintptr_t new_running_var, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                   int64_t groups, int dtype, bool training, double momentum, float eps,
                                   int sm_count) {
  run_forward(HostExec{sm_count}, forward_args(x, weight, weight_dtype, bias, bias_dtype, running_mean, running_var,
                                       stats_dtype, y, mean, rstd, new_running_mean, new_running_var, workspace, n, c,
                                       s, groups, dtype, training, momentum, eps, sm_count, true));
}

void layer_batch_norm_backward_cuda(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t mean,
                                    uintptr_t rstd, uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias,
                                    int bias_dtype, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                    int64_t groups, int dtype, bool training, int sm_count, uintptr_t stream) {
  run_backward(DeviceExec{as_stream(stream), sm_count},
               BackwardArgs{grad, x, grad_x, mean, rstd, grad_weight, grad_bias, workspace,
                            Affine{as_const<void>(weight), weight_dtype, nullptr, bias_dtype}, Shape{n, c, s, groups},
                            dtype, training, sm_count});
}

void layer_batch_norm_backward_host(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t mean,
                                    uintptr_t rstd, uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias,
                                    int bias_dtype, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                    int64_t groups, int dtype, bool training, int sm_count) {
  run_backward(HostExec{sm_count}, BackwardArgs{grad, x, grad_x, mean, rstd, grad_weight, grad_bias, workspace,
                                        Affine{as_const<void>(weight), weight_dtype, nullptr, bias_dtype},
                                        Shape{n, c, s, groups}, dtype, training, sm_count});
}

// PSP: the LBN passes with no mean (see lbn.cuh).
void psp_norm_forward_cuda(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                           uintptr_t running_moment, int stats_dtype, uintptr_t y, uintptr_t rstd,
                           uintptr_t new_running_moment, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                           int64_t groups, int dtype, bool training, double momentum, float eps, int sm_count,
                           uintptr_t stream) {
  run_forward(DeviceExec{as_stream(stream), sm_count},
              forward_args(x, weight, weight_dtype, bias, bias_dtype, 0, running_moment, stats_dtype, y, 0, rstd, 0,
                           new_running_moment, workspace, n, c, s, groups, dtype, training, momentum, eps, sm_count,
                           false));
}

void psp_norm_forward_host(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                           uintptr_t running_moment, int stats_dtype, uintptr_t y, uintptr_t rstd,
                           uintptr_t new_running_moment, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                           int64_t groups, int dtype, bool training, double momentum, float eps, int sm_count) {
  run_forward(HostExec{sm_count},
              forward_args(x, weight, weight_dtype, bias, bias_dtype, 0, running_moment, stats_dtype, y, 0, rstd, 0,
                           new_running_moment, workspace, n, c, s, groups, dtype, training, momentum, eps, sm_count,
                           false));
}

void psp_norm_backward_cuda(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t rstd,
                            uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias, int bias_dtype,
                            uintptr_t workspace, int64_t n, int64_t c, int64_t s, int64_t groups, int dtype,
                            bool training, int sm_count, uintptr_t stream) {
  layer_batch_norm_backward_cuda(grad, x, weight, weight_dtype, 0, rstd, grad_x, grad_weight, grad_bias, bias_dtype,
                                 workspace, n, c, s, groups, dtype, training, sm_count, stream);
}

void psp_norm_backward_host(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t rstd,
                            uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias, int bias_dtype,
                            uintptr_t workspace, int64_t n, int64_t c, int64_t s, int64_t groups, int dtype,
                            bool training, int sm_count) {
  layer_batch_norm_backward_host(grad, x, weight, weight_dtype, 0, rstd, grad_x, grad_weight, grad_bias, bias_dtype,
                                 workspace, n, c, s, groups, dtype, training, sm_count);
}

}  // namespace maqd
