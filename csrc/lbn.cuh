// Layer-Batch Normalization (SPEC.md section 3) and postsynaptic-potential normalization (PSP,
// section 4): how lbn.cu's kernels split x among blocks and threads, and the math of every element,
// thread and group. PSP is LBN with mean 0 and variance := E[x^2], the raw second moment: it runs
// the same kernels with no mean vector (a null `mean`, read as 0 by mean_at) and the `centered`
// flag off, which changes only the per-group finalizes (the statistic, its running update, and
// the backward's group means, where the mean_g(w dy) term of a mean that is not subtracted drops).
// Everything is __host__ __device__ so that the host twins run the same partitions, walks and
// merges as the kernels, in serial loops.
//
// x (N, C, S) is seen as N rows of W = C * S contiguous elements. A unit (a group of C / G channels
// for the forward statistics, a channel for everything else) owns the `run` contiguous columns
// [u run, (u + 1) run) of every row: run = (C / G) S for a group, S for a channel.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.cuh"

namespace maqd {
namespace lbn {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned int kFullMask = 0xffffffffu;
// 16-byte vector loads in the packs a thread visits; a thread in the column partition owns this
// many consecutive columns of T.
template <typename T>
constexpr int kWideVector = 16 / static_cast<int>(sizeof(T));
// Loads a thread issues before it uses any of them, counted in 16 bytes: one load in flight per
// thread cannot cover HBM latency (H200: ~36 bytes/ns per SM against 32 KiB from 2048 threads).
constexpr int kLoadsInFlight = 4;

// The split of x among one kernel's blocks (see the file comment for rows, width and run).
//
// Segment partition (run >= kMinRun): a block takes a tile inside one unit, tile_rows rows by
// tile_cols columns, tiles numbered unit by unit; its threads visit the tile's packs in row-major
// order, thread t the packs t, t + kThreads, ..., and the block yields one partial.
//
// Column partition (shorter runs, where a warp along a row would touch a new row every few
// lanes): a block takes tile_rows rows of tile_cols = threads_x * kWideVector<T> columns across
// all units; thread t owns the kWideVector<T> columns of slot t % threads_x and walks rows
// t / threads_x, + kThreads / threads_x, ..., keeping one accumulator per column. The block
// yields one partial per column: partial (row tile, column) sits at row_tile * width + column.
struct Partition {
  int64_t rows, width, run;
  bool columns;
  int threads_x;
  int64_t tile_rows, tile_cols, row_tiles, col_tiles;

  MAQD_HD int64_t units() const { return width / run; }
  MAQD_HD int64_t blocks() const { return columns ? row_tiles * col_tiles : units() * row_tiles * col_tiles; }
  MAQD_HD int64_t partials() const { return columns ? row_tiles * width : blocks(); }
};

// Units whose run is shorter go to the column partition: a warp along a row of 32 bf16 elements
// already reads whole 64-byte lines.
constexpr int64_t kMinRun = 32;

// One block's share of x. col0 is an absolute column; `unit` is meaningful in the segment partition.
struct Tile {
  int64_t unit, row_tile, row0, col0, rows, cols;
};

MAQD_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

MAQD_HD Tile tile_of(const Partition& p, int64_t block) {
  Tile t{};
  int64_t col_tile;
  if (p.columns) {
    t.row_tile = block / p.col_tiles;
    col_tile = block % p.col_tiles;
    t.col0 = col_tile * p.tile_cols;
    t.cols = min64(p.tile_cols, p.width - t.col0);
  } else {
    const int64_t per_unit = p.row_tiles * p.col_tiles;
    t.unit = block / per_unit;
    const int64_t inside = block % per_unit;
    t.row_tile = inside / p.col_tiles;
    col_tile = inside % p.col_tiles;
    t.col0 = t.unit * p.run + col_tile * p.tile_cols;
    t.cols = min64(p.tile_cols, p.run - col_tile * p.tile_cols);
  }
  t.row0 = t.row_tile * p.tile_rows;
  t.rows = min64(p.tile_rows, p.rows - t.row0);
  return t;
}

// The partials of unit u (a group or a channel whose run is `unit_run`) in the layout `p`'s kernel
// wrote them, in a fixed order: index(k) for k < count().
struct PartialSet {
  int64_t base, outer, outer_stride, inner;

  MAQD_HD int64_t count() const { return outer * inner; }
  MAQD_HD int64_t index(int64_t k) const { return base + (k / inner) * outer_stride + k % inner; }
};

MAQD_HD PartialSet partials_of(const Partition& p, int64_t unit, int64_t unit_run) {
  if (p.columns) return {unit * unit_run, p.row_tiles, p.width, unit_run};
  const int64_t per_unit = p.row_tiles * p.col_tiles;
  return {unit * per_unit, 1, 0, per_unit};
}

// ------------------------------------------------------------------------------------ packs and walks

// The unsigned word of a pack's size. A pack lives in one, so that it is one 16-, 8-, 4- or 2-byte
// access: a struct of __half / __nv_bfloat16 members gets its stores split element by element.
template <int kBytes>
struct RawWord;
template <>
struct RawWord<16> {
  using type = uint4;
};
template <>
struct RawWord<8> {
  using type = uint2;
};
template <>
struct RawWord<4> {
  using type = uint32_t;
};
template <>
struct RawWord<2> {
  using type = uint16_t;
};

// V consecutive elements of T, read and written as float32.
template <typename T, int V>
struct Pack {
  typename RawWord<static_cast<int>(sizeof(T)) * V>::type raw;

  MAQD_HD float get(int i) const {
    T element;
    memcpy(&element, reinterpret_cast<const char*>(&raw) + i * sizeof(T), sizeof(T));
    return load_float(element);
  }
  MAQD_HD void set(int i, float v) {
    T element;
    store_float(&element, v);
    memcpy(reinterpret_cast<char*>(&raw) + i * sizeof(T), &element, sizeof(T));
  }
};

template <typename T, int V>
MAQD_HD Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// On the device, one streaming store: outputs are not read again, so they should not evict x from
// L2 before the pass that reads it a second time (and the intrinsic keeps the store one access).
template <typename T, int V>
MAQD_HD void store_pack(T* p, const Pack<T, V>& pack) {
  using Raw = decltype(pack.raw);
#ifdef __CUDA_ARCH__
  __stcs(reinterpret_cast<Raw*>(p), pack.raw);
#else
  *reinterpret_cast<Raw*>(p) = pack.raw;
#endif
}

// The packs of a segment tile that thread `thread` visits, as (row, pack column) and the element
// offset, advanced by kThreads packs per step with no division or 64-bit product after the first.
// A tile's rows and packs per row fit 32 bits (plan() keeps tiles near the per-block share).
template <int V>
struct SegmentWalk {
  int per_row, row, col, rows, step_rows, step_cols;
  int64_t offset, step_offset, wrap_offset;

  MAQD_HD SegmentWalk(const Partition& p, const Tile& t, int thread)
      : per_row(static_cast<int>(t.cols / V)),
        row(thread / per_row),
        col(thread % per_row),
        rows(static_cast<int>(t.rows)),
        step_rows(kThreads / per_row),
        step_cols(kThreads % per_row),
        offset((t.row0 + row) * p.width + t.col0 + static_cast<int64_t>(col) * V),
        step_offset(step_rows * p.width + static_cast<int64_t>(step_cols) * V),
        wrap_offset(p.width - static_cast<int64_t>(per_row) * V) {}

  MAQD_HD bool valid() const { return row < rows; }
  MAQD_HD void next() {
    col += step_cols;
    row += step_rows;
    offset += step_offset;
    if (col >= per_row) {
      col -= per_row;
      ++row;
      offset += wrap_offset;
    }
  }
};

// Calls op(offset, pack of a, pack of b) for each pack the thread visits in a segment tile, in
// visiting order, with several packs' loads issued before the first is used. b is read only when
// kPaired.
template <typename T, int V, bool kPaired, typename Op>
MAQD_HD void walk_segment(const Partition& p, const Tile& tile, int thread, const T* __restrict__ a,
                          const T* __restrict__ b, Op& op) {
  constexpr int kUnroll = kLoadsInFlight * kWideVector<T> / V > 16 ? 16 : kLoadsInFlight * kWideVector<T> / V;
  SegmentWalk<V> walk(p, tile, thread);
  while (walk.valid()) {
    int64_t offset[kUnroll];
    bool ok[kUnroll];
    Pack<T, V> pa[kUnroll];
    Pack<T, V> pb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = walk.valid();
      offset[u] = walk.offset;
      walk.next();
      if (ok[u]) {
        pa[u] = load_pack<T, V>(a + offset[u]);
        if (kPaired) pb[u] = load_pack<T, V>(b + offset[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (ok[u]) op(offset[u], pa[u], pb[u]);
    }
  }
}

// The first of the kWideVector<T> columns that thread `thread` owns in a column tile.
template <typename T>
MAQD_HD int64_t first_column(const Partition& p, const Tile& tile, int thread) {
  return tile.col0 + static_cast<int64_t>(thread % p.threads_x) * kWideVector<T>;
}

// Calls op(offset, k, pack of a, pack of b) for pack k of the thread's columns in each row it
// walks in a column tile, rows in order, several rows' loads in flight. b is read only when kPaired.
template <typename T, int V, bool kPaired, typename Op>
MAQD_HD void walk_columns(const Partition& p, const Tile& tile, int thread, const T* __restrict__ a,
                          const T* __restrict__ b, Op& op) {
  constexpr int kPacks = kWideVector<T> / V;
  constexpr int kRowsInFlight = kLoadsInFlight / kPacks > 0 ? kLoadsInFlight / kPacks : 1;
  const int row_step = kThreads / p.threads_x;
  const int64_t col = first_column<T>(p, tile, thread);
  bool pack_ok[kPacks];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) pack_ok[k] = col + k * V < tile.col0 + tile.cols;
  for (int64_t r = thread / p.threads_x; r < tile.rows; r += static_cast<int64_t>(row_step) * kRowsInFlight) {
    int64_t offset[kRowsInFlight];
    bool ok[kRowsInFlight];
    Pack<T, V> pa[kRowsInFlight][kPacks];
    Pack<T, V> pb[kRowsInFlight][kPacks];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int64_t row = r + static_cast<int64_t>(u) * row_step;
      ok[u] = row < tile.rows;
      offset[u] = (tile.row0 + row) * p.width + col;
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        if (ok[u] && pack_ok[k]) {
          pa[u][k] = load_pack<T, V>(a + offset[u] + k * V);
          if (kPaired) pb[u][k] = load_pack<T, V>(b + offset[u] + k * V);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        if (ok[u] && pack_ok[k]) op(offset[u] + k * V, k, pa[u][k], pb[u][k]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------ reductions

// Count, mean and sum of squared deviations of some elements of a group, the mean taken relative
// to the group's shift (its first element): merging never adds a large common offset to a small
// spread, which is what keeps 1e4 +- 1 data exact enough (Chan et al.'s pairwise update).
struct Welford {
  float n, mean, m2;
};

MAQD_HD Welford combine(const Welford& a, const Welford& b) {
  if (b.n == 0.0f) return a;
  if (a.n == 0.0f) return b;
  const float n = add_rn(a.n, b.n);
  const float delta = sub_rn(b.mean, a.mean);
  const float b_share = div_rn(b.n, n);
  return {n, add_rn(a.mean, mul_rn(delta, b_share)),
          add_rn(add_rn(a.m2, b.m2), mul_rn(mul_rn(delta, delta), mul_rn(a.n, b_share)))};
}

// A thread's elements d_i = x_i - shift, summed as sum d and sum d^2 (over few enough elements that
// the shift keeps both well conditioned), as a Welford state.
struct ShiftedSums {
  float sum = 0.0f, squares = 0.0f;
  int64_t count = 0;

  MAQD_HD void add(float d) {
    sum = add_rn(sum, d);
    squares = add_rn(squares, mul_rn(d, d));
    ++count;
  }
  MAQD_HD Welford welford() const {
    if (count == 0) return {0.0f, 0.0f, 0.0f};
    const float n = static_cast<float>(count);
    const float mean = div_rn(sum, n);
    const float m2 = sub_rn(squares, mul_rn(sum, mean));
    return {n, mean, m2 > 0.0f ? m2 : 0.0f};
  }
};

// The backward's two sums over a channel's elements: sum dy and sum dy x_hat.
struct GradSums {
  float dy, dy_xhat;
};

MAQD_HD GradSums combine(const GradSums& a, const GradSums& b) {
  return {add_rn(a.dy, b.dy), add_rn(a.dy_xhat, b.dy_xhat)};
}

// The state of column `column` of a column tile merged over the thread rows that hold it, in row
// order. `states` holds kWideVector<T> states per thread, thread by thread.
template <typename T, typename S>
MAQD_HD S merge_column(const S* states, int threads_x, int column) {
  constexpr int kCols = kWideVector<T>;
  const int slot = column / kCols;
  const int k = column % kCols;
  S total = states[slot * kCols + k];
  for (int row = 1; row < kThreads / threads_x; ++row) total = combine(total, states[(row * threads_x + slot) * kCols + k]);
  return total;
}

// ------------------------------------------------------------------------------------ small vectors

// Weights, biases and running statistics come in their own dtypes (a model cast to bf16 has bf16
// ones next to float32 ones in another), read and written through the dtype code.
MAQD_HD float load_as(const void* p, int dtype, int64_t i) {
  switch (static_cast<FloatDType>(dtype)) {
    case FloatDType::kFloat16: return load_float(static_cast<const __half*>(p)[i]);
    case FloatDType::kBFloat16: return load_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

MAQD_HD void store_as(void* p, int dtype, int64_t i, float v) {
  switch (static_cast<FloatDType>(dtype)) {
    case FloatDType::kFloat16: store_float(static_cast<__half*>(p) + i, v); return;
    case FloatDType::kBFloat16: store_float(static_cast<__nv_bfloat16*>(p) + i, v); return;
    default: static_cast<float*>(p)[i] = v; return;
  }
}

// The affine parameters, each (C,) in its dtype or null for the identity.
struct Affine {
  const void* weight;
  int weight_dtype;
  const void* bias;
  int bias_dtype;

  MAQD_HD float weight_at(int64_t c) const { return weight != nullptr ? load_as(weight, weight_dtype, c) : 1.0f; }
  MAQD_HD float bias_at(int64_t c) const { return bias != nullptr ? load_as(bias, bias_dtype, c) : 0.0f; }
};

// Columns past the width (a thread's slot hanging over the last tile's edge) are never loaded or
// stored; their coefficients are read from the last column so that no read leaves the vectors.
MAQD_HD int64_t clamped_column(int64_t col, int64_t width) { return col < width ? col : width - 1; }

// The channel layout: S elements per channel plane, C / G channels per group.
struct Channels {
  int64_t plane, per_group;

  MAQD_HD int64_t channel_of(int64_t column) const { return column / plane; }
  MAQD_HD int64_t group_of_channel(int64_t c) const { return c / per_group; }
};

// ------------------------------------------------------------------------------------ per-element math

// Group g's mean, or 0 for the raw-moment normalization (PSP), which passes no mean vector.
MAQD_HD float mean_at(const float* mean, int64_t g) { return mean != nullptr ? mean[g] : 0.0f; }

// The reference's order of operations, one rounding each: x_hat = (x - mean) rstd.
MAQD_HD float normalized(float x, float mean, float rstd) { return mul_rn(sub_rn(x, mean), rstd); }

// y = x_hat w + b.
struct ForwardCoefficients {
  float mean, rstd, weight, bias;

  MAQD_HD float apply(float x) const { return add_rn(mul_rn(normalized(x, mean, rstd), weight), bias); }
};

// Training: dx = rstd (w dy - mean(w dy) - x_hat mean(w dy x_hat)); eval: dx = w dy rstd.
struct BackwardCoefficients {
  float mean, rstd, weight, mean_dxhat, mean_dxhat_xhat;
  bool training;

  MAQD_HD float apply(float dy, float x) const {
    const float dxhat = mul_rn(dy, weight);
    if (!training) return mul_rn(dxhat, rstd);
    const float xhat = normalized(x, mean, rstd);
    return mul_rn(rstd, sub_rn(sub_rn(dxhat, mean_dxhat), mul_rn(xhat, mean_dxhat_xhat)));
  }
};

// ------------------------------------------------------------------------------------ per-thread work

// Forward statistics of a segment tile (one group): shifted sums of the thread's elements.
struct SegmentStats {
  float shift;
  ShiftedSums sums;

  template <typename T, int V>
  MAQD_HD void operator()(int64_t, const Pack<T, V>& a, const Pack<T, V>&) {
#pragma unroll
    for (int i = 0; i < V; ++i) sums.add(sub_rn(a.get(i), shift));
  }
};

// Forward statistics of the thread's columns in a column tile, each shifted by its group's first
// element.
template <typename T>
struct ColumnStats {
  static constexpr int kCols = kWideVector<T>;
  float shift[kCols];
  ShiftedSums sums[kCols];

  MAQD_HD ColumnStats(const T* x, int64_t first_col, int64_t width, int64_t group_run) {
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t col = first_col + k;
      shift[k] = load_float(x[clamped_column(col, width) / group_run * group_run]);
    }
  }

  template <int V>
  MAQD_HD void operator()(int64_t, int pack, const Pack<T, V>& a, const Pack<T, V>&) {
#pragma unroll
    for (int i = 0; i < V; ++i) sums[pack * V + i].add(sub_rn(a.get(i), shift[pack * V + i]));
  }
};

// y for a segment tile (one channel, so one set of coefficients).
template <typename T>
struct SegmentForward {
  ForwardCoefficients coefficients;
  T* y;

  template <int V>
  MAQD_HD void operator()(int64_t offset, const Pack<T, V>& a, const Pack<T, V>&) {
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.set(i, coefficients.apply(a.get(i)));
    store_pack(y + offset, out);
  }
};

// y for the thread's columns in a column tile.
template <typename T>
struct ColumnForward {
  static constexpr int kCols = kWideVector<T>;
  ForwardCoefficients coefficients[kCols];
  T* y;

  MAQD_HD ColumnForward(int64_t first_col, int64_t width, const Channels& ch, const Affine& affine,
                        const float* mean, const float* rstd, T* out)
      : y(out) {
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t c = ch.channel_of(clamped_column(first_col + k, width));
      const int64_t g = ch.group_of_channel(c);
      coefficients[k] = {mean_at(mean, g), rstd[g], affine.weight_at(c), affine.bias_at(c)};
    }
  }

  template <int V>
  MAQD_HD void operator()(int64_t offset, int pack, const Pack<T, V>& a, const Pack<T, V>&) {
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.set(i, coefficients[pack * V + i].apply(a.get(i)));
    store_pack(y + offset, out);
  }
};

// sum dy and sum dy x_hat of a segment tile (one channel); a is dy, b is x.
struct SegmentGradSums {
  float mean, rstd;
  GradSums sums{0.0f, 0.0f};

  template <typename T, int V>
  MAQD_HD void operator()(int64_t, const Pack<T, V>& dy, const Pack<T, V>& x) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float g = dy.get(i);
      sums = combine(sums, GradSums{g, mul_rn(g, normalized(x.get(i), mean, rstd))});
    }
  }
};

// The same sums for each of the thread's columns in a column tile.
template <typename T>
struct ColumnGradSums {
  static constexpr int kCols = kWideVector<T>;
  float mean[kCols], rstd[kCols];
  GradSums sums[kCols];

  MAQD_HD ColumnGradSums(int64_t first_col, int64_t width, const Channels& ch, const float* group_mean,
                         const float* group_rstd) {
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t g = ch.group_of_channel(ch.channel_of(clamped_column(first_col + k, width)));
      mean[k] = mean_at(group_mean, g);
      rstd[k] = group_rstd[g];
      sums[k] = {0.0f, 0.0f};
    }
  }

  template <int V>
  MAQD_HD void operator()(int64_t, int pack, const Pack<T, V>& dy, const Pack<T, V>& x) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int k = pack * V + i;
      const float g = dy.get(i);
      sums[k] = combine(sums[k], GradSums{g, mul_rn(g, normalized(x.get(i), mean[k], rstd[k]))});
    }
  }
};

// The group means of the backward, (mean_g(w dy), mean_g(w dy x_hat)) per group, float32 pairs.
struct GroupGradMeans {
  float dxhat, dxhat_xhat;
};

// A group's means from its sums over `count` elements. Without centering (PSP) no mean was
// subtracted, so none is differentiated: dx = rstd (w dy - x_hat mean(w dy x_hat)).
MAQD_HD GroupGradMeans group_grad_means(const GradSums& sums, float count, bool centered) {
  return {centered ? div_rn(sums.dy, count) : 0.0f, div_rn(sums.dy_xhat, count)};
}

MAQD_HD BackwardCoefficients backward_coefficients(int64_t c, const Channels& ch, const Affine& affine,
                                                   const float* mean, const float* rstd,
                                                   const GroupGradMeans* group_means, bool training) {
  const int64_t g = ch.group_of_channel(c);
  const GroupGradMeans m = training ? group_means[g] : GroupGradMeans{0.0f, 0.0f};
  return {mean_at(mean, g), rstd[g], affine.weight_at(c), m.dxhat, m.dxhat_xhat, training};
}

// dx of a segment tile (one channel); a is dy, b is x.
template <typename T>
struct SegmentBackward {
  BackwardCoefficients coefficients;
  T* dx;

  template <int V>
  MAQD_HD void operator()(int64_t offset, const Pack<T, V>& dy, const Pack<T, V>& x) {
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.set(i, coefficients.apply(dy.get(i), x.get(i)));
    store_pack(dx + offset, out);
  }
};

// dx for the thread's columns in a column tile.
template <typename T>
struct ColumnBackward {
  static constexpr int kCols = kWideVector<T>;
  BackwardCoefficients coefficients[kCols];
  T* dx;

  MAQD_HD ColumnBackward(int64_t first_col, int64_t width, const Channels& ch, const Affine& affine,
                         const float* mean, const float* rstd, const GroupGradMeans* group_means, bool training,
                         T* out)
      : dx(out) {
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t c = ch.channel_of(clamped_column(first_col + k, width));
      coefficients[k] = backward_coefficients(c, ch, affine, mean, rstd, group_means, training);
    }
  }

  template <int V>
  MAQD_HD void operator()(int64_t offset, int pack, const Pack<T, V>& dy, const Pack<T, V>& x) {
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      out.set(i, coefficients[pack * V + i].apply(dy.get(i), x.get(i)));
    }
    store_pack(dx + offset, out);
  }
};

// ------------------------------------------------------------------------------------ per-group results

// The training forward's running-statistic update (reference.layer_batch_norm_forward and
// psp_norm_forward), or eval's source of the statistics. Pointers are (G,) in `dtype`; the new ones
// null when not updated. Centered (LBN): mean and variance. Not centered (PSP): `var` and
// `new_var` hold the running second moment E[x^2], and `mean` and `new_mean` are null.
struct RunningStats {
  const void* mean;
  const void* var;
  void* new_mean;
  void* new_var;
  int dtype;
  float momentum, keep;  // m and 1 - m, each rounded to float32 as torch rounds a Python scalar
  float correction;      // n / (n - 1), likewise, for the variance; 1 for the raw moment
  bool centered;
};

// Group g's rstd (and mean, when centered) from its merged state; in training with running
// statistics, their update. The raw moment is var + mean^2 of the same state: two non-negative
// terms, so it keeps the Welford merge's accuracy.
MAQD_HD void finish_training_group(int64_t g, const Welford& state, float shift, float count, float eps,
                                   const RunningStats& running, float* mean_out, float* rstd_out) {
  const float mean = add_rn(shift, state.mean);
  const float var = div_rn(state.m2, count);
  const float spread = running.centered ? var : add_rn(var, mul_rn(mean, mean));
  if (running.centered) mean_out[g] = mean;
  rstd_out[g] = div_rn(1.0f, sqrt_rn(add_rn(spread, eps)));
  if (running.new_var != nullptr) {
    const float rv = load_as(running.var, running.dtype, g);
    store_as(running.new_var, running.dtype, g,
             add_rn(mul_rn(running.keep, rv), mul_rn(mul_rn(running.momentum, spread), running.correction)));
  }
  if (running.new_mean != nullptr) {
    const float rm = load_as(running.mean, running.dtype, g);
    store_as(running.new_mean, running.dtype, g, add_rn(mul_rn(running.keep, rm), mul_rn(running.momentum, mean)));
  }
}

MAQD_HD void finish_eval_group(int64_t g, float eps, const RunningStats& running, float* mean_out,
                               float* rstd_out) {
  if (running.centered) mean_out[g] = load_as(running.mean, running.dtype, g);
  rstd_out[g] = div_rn(1.0f, sqrt_rn(add_rn(load_as(running.var, running.dtype, g), eps)));
}

// Channel c's total gradient sums: its parameter gradients, and its share of the group means.
// `terms` receives (w sum dy, w sum dy x_hat) when its group has several channels; with one, the
// group means go straight to `group_means`.
struct ChannelResults {
  Affine affine;
  void* grad_weight;  // in affine.weight_dtype, or null
  void* grad_bias;    // in affine.bias_dtype, or null
  GradSums* terms;
  GroupGradMeans* group_means;
  int64_t per_group;
  float group_count;
  bool training;
  bool centered;
};

MAQD_HD void finish_channel(int64_t c, const GradSums& sums, const ChannelResults& r) {
  if (r.grad_weight != nullptr) store_as(r.grad_weight, r.affine.weight_dtype, c, sums.dy_xhat);
  if (r.grad_bias != nullptr) store_as(r.grad_bias, r.affine.bias_dtype, c, sums.dy);
  if (!r.training) return;
  const float w = r.affine.weight_at(c);
  const GradSums term{mul_rn(w, sums.dy), mul_rn(w, sums.dy_xhat)};
  if (r.per_group == 1) {
    r.group_means[c] = group_grad_means(term, r.group_count, r.centered);
  } else {
    r.terms[c] = term;
  }
}

}  // namespace lbn
}  // namespace maqd
