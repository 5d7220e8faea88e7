"""Triton kernels of Layer-Batch Normalization and their launchers (SPEC.md section 3), and of
postsynaptic-potential normalization (PSP, section 4).

Each launcher has the signature of its twin in ``reference``. They run on CUDA tensors, and on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before Triton is imported). Every
kernel is launched with ``enable_fp_fusion=False``, so that each operation rounds as in the
reference.

x (N, C, *) is read as a row-major matrix of N rows and W = C*S columns, S the product of the
trailing dims. Group g is then the columns [g L, (g+1) L) of every row, L = (C/G) S, and channel c
the columns [c S, (c+1) S): the forward's group moments and the backward's per-channel sums both
reduce "units" of L contiguous columns over every row, and share one partition of that work
(``_reduction_partition``):

- segment-wise (L >= 32): a program reduces a band of rows times a chunk of one unit's columns to
  one partial; long units are cut into many chunks and bands, so that a single group (groups=1)
  still fills the GPU.
- column-wise (L < 32, such as Linear outputs, S = 1): a program reduces a band of rows of BLOCK_C
  adjacent columns, spanning several units, to one partial per column, so that the loads stay
  coalesced along the channel axis.

A finalize kernel merges each unit's partials in a fixed order: no float atomics, so results are
deterministic. A forward partial is (count, shift, mean - shift, M2): each program shifts its
values by the mean of its first tile, which keeps its sums of squares free of cancellation far from
zero, and the finalize merges the partials with Chan's formula.

PSP is LBN with mean 0 and variance := E[x^2], the raw second moment, and runs the same kernels with
CENTERED off: the finalize turns each group's merged moments into E[x^2] = var + mean^2 (two
non-negative terms: no cancellation) and updates the running moment without n / (n - 1); the
normalize and sums passes read no mean; the dx pass drops the mean_g(w dy) term, as a mean that is
not subtracted is not differentiated.

Traffic over x: the training forward reads it twice and writes y once (moments, then normalize);
eval reads once and writes once. The training backward reads x and dy twice and writes dx once
(per-channel sums, then dx); in eval the sums pass writes dx itself.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._library import contiguous_or_none
from .._triton_helpers import to_storage
from . import reference

Tensor = torch.Tensor

# Elements per tile of the streaming kernels: 16 per thread at 8 warps, several 16-byte loads in
# flight per thread on the GPU, and few wide programs in the interpreter.
_TILE = 4096
_NUM_WARPS = 8
# Units shorter than this are reduced column-wise: a segment-wise tile would waste most lanes.
_COLUMNWISE_BELOW = 32
# Columns of a column-wise tile: a whole 128-byte line of bf16 per row, while a Linear output of
# 512 columns still splits into 8 programs across.
_COLUMNWISE_BLOCK = 64
# Rows a column-wise program reduces at least, so that its partials (16 bytes per column) stay a
# small fraction of what it reads.
_MIN_COLUMNWISE_ROWS = 64
# Programs the streaming kernels aim for per SM: several waves of short programs keep every SM busy
# to the end, and the partials stay few enough for one finalize pass.
_PROGRAMS_PER_SM = 8
# The interpreter runs programs one after another: a few, so that groups still split over several
# programs (and the merge of their partials is tested), and the tests stay fast.
_INTERPRETER_PROGRAMS = 4
# Partials times units that one finalize program holds at a time.
_FINALIZE_TILE = 2048
# Units per finalize program: enough programs across for groups=C.
_FINALIZE_UNITS = 128


def _f32(value: float) -> float:
    return reference.round_to(torch.float32, value)


class _Partition(NamedTuple):
    """How a reduction over `units` of `segment` contiguous columns is cut into programs, each of
    rows_per_program rows times cols_per_program columns, walked in BLOCK_R x BLOCK_C tiles."""

    columnwise: bool
    units: int
    block_rows: int
    block_cols: int
    rows_per_program: int
    cols_per_program: int
    # Segment-wise: chunks per unit; column-wise: column blocks across the whole row.
    col_chunks: int
    bands: int
    partials_per_unit: int

    @property
    def grid(self) -> tuple[int]:
        return (self.bands * self.col_chunks * (1 if self.columnwise else self.units),)


def _column_block(length: int) -> int:
    """Power-of-two columns per tile for rows of `length`: the widest, up to 1024, that pads the rows
    by at most an eighth, since masked lanes still take issue slots."""
    if length <= 128:
        return triton.next_power_of_2(length)
    for block in (1024, 512, 256):
        if triton.cdiv(length, block) * block * 8 <= length * 9:
            return block
    return 128


def _row_bands(rows: int, block_rows: int, wanted: int, min_rows: int = 1) -> tuple[int, int]:
    """(rows per program, bands) for about `wanted` bands of whole row blocks, each at least
    `min_rows` rows where there are that many."""
    bands = max(1, min(wanted, triton.cdiv(rows, max(block_rows, min_rows))))
    rows_per_program = triton.cdiv(triton.cdiv(rows, bands), block_rows) * block_rows
    return rows_per_program, triton.cdiv(rows, rows_per_program)


def _reduction_partition(rows: int, width: int, segment: int, programs: int) -> _Partition:
    """About `programs` programs over the units of `segment` contiguous columns of a (rows, width)
    matrix (see the module docstring). Segment-wise, each unit is cut into bands of rows first,
    which keeps a program's columns long, then into column chunks until the programs are there."""
    units = width // segment
    if segment < _COLUMNWISE_BELOW:
        block_cols = min(triton.next_power_of_2(width), _COLUMNWISE_BLOCK)
        block_rows = min(triton.next_power_of_2(rows), max(1, _TILE // block_cols))
        col_chunks = triton.cdiv(width, block_cols)
        rows_per_program, bands = _row_bands(rows, block_rows, triton.cdiv(programs, col_chunks), _MIN_COLUMNWISE_ROWS)
        return _Partition(
            columnwise=True,
            units=units,
            block_rows=block_rows,
            block_cols=block_cols,
            rows_per_program=rows_per_program,
            cols_per_program=block_cols,
            col_chunks=col_chunks,
            bands=bands,
            partials_per_unit=bands * segment,
        )
    block_cols = _column_block(segment)
    block_rows = min(triton.next_power_of_2(rows), max(1, _TILE // block_cols))
    per_unit = triton.cdiv(programs, units)
    rows_per_program, bands = _row_bands(rows, block_rows, per_unit)
    col_blocks = triton.cdiv(segment, block_cols)
    splits = min(col_blocks, triton.cdiv(per_unit, bands))
    cols_per_program = triton.cdiv(col_blocks, splits) * block_cols
    col_chunks = triton.cdiv(segment, cols_per_program)
    return _Partition(
        columnwise=False,
        units=units,
        block_rows=block_rows,
        block_cols=block_cols,
        rows_per_program=rows_per_program,
        cols_per_program=cols_per_program,
        col_chunks=col_chunks,
        bands=bands,
        partials_per_unit=bands * col_chunks,
    )


class _Elementwise(NamedTuple):
    """The normalize pass: programs of rows_per_program rows times BLOCK_C columns."""

    block_rows: int
    block_cols: int
    rows_per_program: int
    col_blocks: int
    bands: int

    @property
    def grid(self) -> tuple[int]:
        return (self.bands * self.col_blocks,)


def _elementwise_partition(rows: int, width: int, programs: int) -> _Elementwise:
    # Each program gathers its columns' statistics and parameters once, then walks its rows.
    block_cols = _column_block(width)
    block_rows = min(triton.next_power_of_2(rows), max(1, _TILE // block_cols))
    col_blocks = triton.cdiv(width, block_cols)
    rows_per_program, bands = _row_bands(rows, block_rows, triton.cdiv(programs, col_blocks))
    return _Elementwise(block_rows, block_cols, rows_per_program, col_blocks, bands)


def _finalize_blocks(units: int, partials_per_unit: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_U) of a finalize program."""
    block_units = min(triton.next_power_of_2(units), _FINALIZE_UNITS)
    block_partials = min(triton.next_power_of_2(max(partials_per_unit, 1)), max(1, _FINALIZE_TILE // block_units))
    return block_partials, block_units


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * _multiprocessors(device.index)
    return _INTERPRETER_PROGRAMS


# ----------------------------------------------------------------------------- shared program logic


@triton.jit
def _reduction_program(rows, segment, units, rows_per_program, cols_per_program, col_chunks, COLUMNWISE: tl.constexpr):
    """This program's (band, chunk, unit, row_start, row_end, col_start, col_end) in a _Partition.
    Programs of one band follow each other, so that neighbours read neighbouring memory."""
    pid = tl.program_id(0)
    chunk = pid % col_chunks
    if COLUMNWISE:
        band = pid // col_chunks
        unit = 0
        col_start = chunk * cols_per_program
        col_end = tl.minimum(col_start + cols_per_program, segment * units)
    else:
        band = pid // (col_chunks * units)
        unit = pid // col_chunks % units
        col_start = unit * segment + chunk * cols_per_program
        col_end = tl.minimum(col_start + cols_per_program, (unit + 1) * segment)
    row_start = band * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    return band, chunk, unit, row_start, row_end, col_start, col_end


@triton.jit
def _tile(t, col_blocks, row_start, row_end, col_start, col_end, width, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(offsets, mask) of tile t of a program's rows x columns, walked row block by row block."""
    rows = row_start + (t // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = col_start + (t % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < row_end)[:, None] & (cols < col_end)[None, :]
    return rows.to(tl.int64)[:, None] * width + cols[None, :], mask


@triton.jit
def _column_partial_index(band, col_start, col_end, segment, units, BLOCK_C: tl.constexpr):
    """(index, mask) of the per-column partials of a column-wise program in a (partials, units)
    array: column j is partial band * segment + j % segment of unit j // segment."""
    cols = col_start + tl.arange(0, BLOCK_C)
    return (band * segment + cols % segment) * units + cols // segment, cols < col_end


@triton.jit
def _group_mean(mean_ptr, group, CENTERED: tl.constexpr):
    """The group's mean from mean_ptr, or 0 for PSP, which subtracts none (and so has none to
    differentiate): x - 0 and dx_hat - 0 are exact, so both normalizations share every pass."""
    if CENTERED:
        mean = tl.load(mean_ptr + group)
    else:
        mean = tl.zeros_like(group).to(tl.float32)
    return mean  # one return: Triton's code generators before 3.9 reject statements after a return


# ----------------------------------------------------------------------------- forward


@triton.jit
def _group_moments_kernel(
    x_ptr,
    partials_ptr,
    rows,
    width,
    segment,
    units,
    rows_per_program,
    cols_per_program,
    col_chunks,
    partials_per_unit,
    COLUMNWISE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partials (count, shift, mean - shift, M2) of each unit (group) into a (4, partials, units)
    float32 array."""
    band, chunk, unit, row_start, row_end, col_start, col_end = _reduction_program(
        rows, segment, units, rows_per_program, cols_per_program, col_chunks, COLUMNWISE
    )
    col_blocks = tl.cdiv(col_end - col_start, BLOCK_C)
    tiles = tl.cdiv(row_end - row_start, BLOCK_R) * col_blocks
    band_rows = (row_end - row_start).to(tl.float32)
    first_rows = tl.minimum(row_end - row_start, BLOCK_R).to(tl.float32)
    offsets, mask = _tile(0, col_blocks, row_start, row_end, col_start, col_end, width, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if COLUMNWISE:
        column_shift = tl.math.div_rn(tl.sum(x, axis=0), first_rows)
        shift = column_shift[None, :]
    else:
        first_cols = tl.minimum(col_end - col_start, BLOCK_C).to(tl.float32)
        shift = tl.math.div_rn(tl.sum(tl.sum(x, axis=1), axis=0), first_rows * first_cols)
    centred = tl.where(mask, x - shift, 0.0)
    sum_centred = centred
    sum_squares = centred * centred
    for t in range(1, tiles):
        offsets, mask = _tile(t, col_blocks, row_start, row_end, col_start, col_end, width, BLOCK_R, BLOCK_C)
        centred = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        sum_centred += centred
        sum_squares += centred * centred
    field = partials_per_unit * units
    if COLUMNWISE:
        index, keep = _column_partial_index(band, col_start, col_end, segment, units, BLOCK_C)
        sum_centred = tl.sum(sum_centred, axis=0)
        mean_offset = tl.math.div_rn(sum_centred, band_rows)
        m2 = tl.maximum(tl.sum(sum_squares, axis=0) - sum_centred * mean_offset, 0.0)
        tl.store(partials_ptr + index, tl.full([BLOCK_C], 0.0, tl.float32) + band_rows, mask=keep)
        tl.store(partials_ptr + field + index, column_shift, mask=keep)
        tl.store(partials_ptr + 2 * field + index, mean_offset, mask=keep)
        tl.store(partials_ptr + 3 * field + index, m2, mask=keep)
    else:
        index = (band * col_chunks + chunk) * units + unit
        count = band_rows * (col_end - col_start).to(tl.float32)
        sum_centred = tl.sum(tl.sum(sum_centred, axis=1), axis=0)
        mean_offset = tl.math.div_rn(sum_centred, count)
        m2 = tl.maximum(tl.sum(tl.sum(sum_squares, axis=1), axis=0) - sum_centred * mean_offset, 0.0)
        tl.store(partials_ptr + index, count)
        tl.store(partials_ptr + field + index, shift)
        tl.store(partials_ptr + 2 * field + index, mean_offset)
        tl.store(partials_ptr + 3 * field + index, m2)


@triton.jit
def _group_statistics_kernel(
    partials_ptr,
    running_mean_ptr,
    running_var_ptr,
    mean_ptr,
    rstd_ptr,
    new_mean_ptr,
    new_var_ptr,
    units,
    partials_per_unit,
    group_size,
    eps,
    momentum,
    keep,
    unbias,
    TRAINING: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    CENTERED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_U: tl.constexpr,
):
    """mean, rstd (and in training the new running statistics) of BLOCK_U groups: from their
    partials, merged BLOCK_P at a time in partial order, or in eval from the running statistics.
    Not CENTERED (PSP): rstd of the raw second moment, which running_var / new_var hold; no mean."""
    unit = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    unit_ok = unit < units
    if TRAINING:
        field = partials_per_unit * units
        # Means are taken relative to the first partial's shift: the shifts are close to each
        # other, so their differences are exact and the sum of the small rest rounds little.
        origin = tl.load(partials_ptr + field + unit, mask=unit_ok, other=0.0)
        count = tl.zeros([BLOCK_U], tl.float32)
        mean = tl.zeros([BLOCK_U], tl.float32)
        m2 = tl.zeros([BLOCK_U], tl.float32)
        for p0 in range(0, partials_per_unit, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            index = p[:, None] * units + unit[None, :]
            ok = (p < partials_per_unit)[:, None] & unit_ok[None, :]
            part_count = tl.load(partials_ptr + index, mask=ok, other=0.0)
            part_mean = (tl.load(partials_ptr + field + index, mask=ok, other=0.0) - origin[None, :]) + tl.load(
                partials_ptr + 2 * field + index, mask=ok, other=0.0
            )
            part_m2 = tl.load(partials_ptr + 3 * field + index, mask=ok, other=0.0)
            block_count = tl.sum(part_count, axis=0)
            block_mean = tl.math.div_rn(tl.sum(part_count * part_mean, axis=0), tl.maximum(block_count, 1.0))
            deviation = part_mean - block_mean[None, :]
            block_m2 = tl.sum(part_m2 + part_count * deviation * deviation, axis=0)
            total = count + block_count
            delta = block_mean - mean
            block_share = tl.math.div_rn(block_count, tl.maximum(total, 1.0))
            mean += delta * block_share
            m2 += block_m2 + delta * delta * count * block_share
            count = total
        var = tl.math.div_rn(m2, group_size)
        mean = origin + mean
        if not CENTERED:
            var = var + mean * mean
        if HAS_RUNNING:
            running_var = tl.load(running_var_ptr + unit, mask=unit_ok, other=0.0).to(tl.float32)
            new_var = keep * running_var + momentum * var * unbias
            tl.store(new_var_ptr + unit, to_storage(new_var, new_var_ptr.dtype.element_ty), mask=unit_ok)
            if CENTERED:
                running_mean = tl.load(running_mean_ptr + unit, mask=unit_ok, other=0.0).to(tl.float32)
                new_mean = keep * running_mean + momentum * mean
                tl.store(new_mean_ptr + unit, to_storage(new_mean, new_mean_ptr.dtype.element_ty), mask=unit_ok)
    else:
        if CENTERED:
            mean = tl.load(running_mean_ptr + unit, mask=unit_ok, other=0.0).to(tl.float32)
        var = tl.load(running_var_ptr + unit, mask=unit_ok, other=1.0).to(tl.float32)
    if CENTERED:
        tl.store(mean_ptr + unit, mean, mask=unit_ok)
    tl.store(rstd_ptr + unit, tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps)), mask=unit_ok)


@triton.jit
def _normalize_kernel(
    x_ptr,
    grad_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    bias_ptr,
    grad_means_ptr,
    out_ptr,
    rows,
    width,
    plane,
    channels_per_group,
    groups,
    rows_per_program,
    col_blocks,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BACKWARD: tl.constexpr,
    CENTERED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = (x - mean) rstd w + b, or BACKWARD: dx = rstd (w dy - mean(w dy) - x_hat mean(w dy x_hat))
    with the two group means from grad_means (2, G). Not CENTERED (PSP): mean 0 and no mean(w dy)."""
    band = tl.program_id(0) // col_blocks
    cols = tl.program_id(0) % col_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    # Lanes past the row read the last channel's values, and store nothing.
    channel = tl.minimum(cols, width - 1) // plane
    group = channel // channels_per_group
    mean = _group_mean(mean_ptr, group, CENTERED)[None, :]
    rstd = tl.load(rstd_ptr + group)[None, :]
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + channel).to(tl.float32)[None, :]
    if BACKWARD:
        mean_dx_hat = _group_mean(grad_means_ptr, group, CENTERED)[None, :]
        mean_dx_hat_x_hat = tl.load(grad_means_ptr + groups + group)[None, :]
    elif HAS_BIAS:
        bias = tl.load(bias_ptr + channel).to(tl.float32)[None, :]
    row_start = band * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        row = r0 + tl.arange(0, BLOCK_R)
        mask = (row < row_end)[:, None] & col_ok[None, :]
        offsets = row.to(tl.int64)[:, None] * width + cols[None, :]
        x_hat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        if BACKWARD:
            dx_hat = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                dx_hat = dx_hat * weight
            out = rstd * ((dx_hat - mean_dx_hat) - x_hat * mean_dx_hat_x_hat)
        else:
            out = x_hat
            if HAS_WEIGHT:
                out = out * weight
            if HAS_BIAS:
                out = out + bias
        tl.store(out_ptr + offsets, to_storage(out, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _channel_gradient_sums_kernel(
    grad_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    grad_x_ptr,
    partials_ptr,
    rows,
    width,
    plane,
    channels_per_group,
    rows_per_program,
    cols_per_program,
    col_chunks,
    partials_per_unit,
    COLUMNWISE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD_X: tl.constexpr,
    CENTERED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partials of sum(dy) and sum(dy x_hat) per channel into a (2, partials, C) float32 array;
    WRITE_GRAD_X (eval, where dx needs no sums) also writes dx = w dy rstd on the way."""
    channels = width // plane
    band, chunk, channel, row_start, row_end, col_start, col_end = _reduction_program(
        rows, plane, channels, rows_per_program, cols_per_program, col_chunks, COLUMNWISE
    )
    if COLUMNWISE:
        # Lanes past the row read the last channel's values, and store nothing.
        channel = (tl.minimum(col_start + tl.arange(0, BLOCK_C), width - 1) // plane)[None, :]
    group = channel // channels_per_group
    mean = _group_mean(mean_ptr, group, CENTERED)
    rstd = tl.load(rstd_ptr + group)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + channel).to(tl.float32)
    col_blocks = tl.cdiv(col_end - col_start, BLOCK_C)
    tiles = tl.cdiv(row_end - row_start, BLOCK_R) * col_blocks
    sum_grad = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sum_grad_x_hat = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for t in range(tiles):
        offsets, mask = _tile(t, col_blocks, row_start, row_end, col_start, col_end, width, BLOCK_R, BLOCK_C)
        dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x_hat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        sum_grad += dy
        sum_grad_x_hat += dy * x_hat
        if WRITE_GRAD_X:
            dx_hat = dy
            if HAS_WEIGHT:
                dx_hat = dy * weight
            tl.store(grad_x_ptr + offsets, to_storage(dx_hat * rstd, grad_x_ptr.dtype.element_ty), mask=mask)
    field = partials_per_unit * channels
    if COLUMNWISE:
        index, keep = _column_partial_index(band, col_start, col_end, plane, channels, BLOCK_C)
        tl.store(partials_ptr + index, tl.sum(sum_grad, axis=0), mask=keep)
        tl.store(partials_ptr + field + index, tl.sum(sum_grad_x_hat, axis=0), mask=keep)
    else:
        index = (band * col_chunks + chunk) * channels + channel
        tl.store(partials_ptr + index, tl.sum(tl.sum(sum_grad, axis=1), axis=0))
        tl.store(partials_ptr + field + index, tl.sum(tl.sum(sum_grad_x_hat, axis=1), axis=0))


@triton.jit
def _channel_gradient_kernel(
    partials_ptr,
    weight_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    weighted_ptr,
    channels,
    partials_per_unit,
    group_size,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTED_SUMS: tl.constexpr,
    GROUP_IS_CHANNEL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_U: tl.constexpr,
):
    """grad_bias = sum(dy), grad_weight = sum(dy x_hat) of BLOCK_U channels, summed over their
    partials in order. WEIGHTED_SUMS (training) also writes w sum(dy) and w sum(dy x_hat) into
    weighted (2, C) for the group means of dx; GROUP_IS_CHANNEL writes those means themselves."""
    channel = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    channel_ok = channel < channels
    field = partials_per_unit * channels
    sum_grad = tl.zeros([BLOCK_P, BLOCK_U], tl.float32)
    sum_grad_x_hat = tl.zeros([BLOCK_P, BLOCK_U], tl.float32)
    for p0 in range(0, partials_per_unit, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        index = p[:, None] * channels + channel[None, :]
        ok = (p < partials_per_unit)[:, None] & channel_ok[None, :]
        sum_grad += tl.load(partials_ptr + index, mask=ok, other=0.0)
        sum_grad_x_hat += tl.load(partials_ptr + field + index, mask=ok, other=0.0)
    sum_grad = tl.sum(sum_grad, axis=0)
    sum_grad_x_hat = tl.sum(sum_grad_x_hat, axis=0)
    if HAS_BIAS:
        tl.store(grad_bias_ptr + channel, to_storage(sum_grad, grad_bias_ptr.dtype.element_ty), mask=channel_ok)
    if HAS_WEIGHT:
        tl.store(
            grad_weight_ptr + channel, to_storage(sum_grad_x_hat, grad_weight_ptr.dtype.element_ty), mask=channel_ok
        )
    if WEIGHTED_SUMS:
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)
            sum_grad = weight * sum_grad
            sum_grad_x_hat = weight * sum_grad_x_hat
        if GROUP_IS_CHANNEL:
            sum_grad = tl.math.div_rn(sum_grad, group_size)
            sum_grad_x_hat = tl.math.div_rn(sum_grad_x_hat, group_size)
        tl.store(weighted_ptr + channel, sum_grad, mask=channel_ok)
        tl.store(weighted_ptr + channels + channel, sum_grad_x_hat, mask=channel_ok)


@triton.jit
def _group_gradient_means_kernel(
    weighted_ptr, grad_means_ptr, channels, channels_per_group, groups, group_size, BLOCK: tl.constexpr
):
    """grad_means (2, G): the group means of w dy and w dy x_hat, one program per group."""
    group = tl.program_id(0)
    first = group * channels_per_group
    sum_grad = tl.zeros([BLOCK], tl.float32)
    sum_grad_x_hat = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, channels_per_group, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < channels_per_group
        sum_grad += tl.load(weighted_ptr + first + c, mask=ok, other=0.0)
        sum_grad_x_hat += tl.load(weighted_ptr + channels + first + c, mask=ok, other=0.0)
    tl.store(grad_means_ptr + group, tl.math.div_rn(tl.sum(sum_grad, axis=0), group_size))
    tl.store(grad_means_ptr + groups + group, tl.math.div_rn(tl.sum(sum_grad_x_hat, axis=0), group_size))


# ----------------------------------------------------------------------------- launchers


def _matrix_shape(x: Tensor) -> tuple[int, int, int]:
    """(N, C, S) of x (N, C, *), S = 1 for 2-D x."""
    return x.shape[0], x.shape[1], x.shape[2:].numel()


def _normalize(
    x: Tensor,
    grad: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    grad_means: Tensor | None,
    out: Tensor,
    groups: int,
) -> None:
    """The normalize (grad None) or dx pass; mean None for PSP."""
    rows, channels, plane = _matrix_shape(x)
    part = _elementwise_partition(rows, channels * plane, _programs(x.device))
    _normalize_kernel[part.grid](
        x,
        grad if grad is not None else x,
        mean if mean is not None else rstd,
        rstd,
        weight if weight is not None else rstd,
        bias if bias is not None else rstd,
        grad_means if grad_means is not None else rstd,
        out,
        rows,
        channels * plane,
        plane,
        channels // groups,
        groups,
        part.rows_per_program,
        part.col_blocks,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BACKWARD=grad is not None,
        CENTERED=mean is not None,
        BLOCK_R=part.block_rows,
        BLOCK_C=part.block_cols,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )


def _group_moments(x: Tensor, groups: int) -> tuple[Tensor, int]:
    """(partials (4, P, G) float32, P): the per-program moments of each group of contiguous x."""
    rows, channels, plane = _matrix_shape(x)
    segment = channels // groups * plane
    part = _reduction_partition(rows, channels * plane, segment, _programs(x.device))
    partials = x.new_empty((4, part.partials_per_unit, groups), dtype=torch.float32)
    _group_moments_kernel[part.grid](
        x,
        partials,
        rows,
        channels * plane,
        segment,
        groups,
        part.rows_per_program,
        part.cols_per_program,
        part.col_chunks,
        part.partials_per_unit,
        COLUMNWISE=part.columnwise,
        BLOCK_R=part.block_rows,
        BLOCK_C=part.block_cols,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return partials, part.partials_per_unit


def _forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
    centered: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, new_running_mean, new_running_var) of LBN (centered), or of PSP: mean None,
    running_mean None and the running second moment in running_var / new_running_var."""
    xc = x.contiguous()
    weight, bias = contiguous_or_none(weight), contiguous_or_none(bias)
    running_mean, running_var = contiguous_or_none(running_mean), contiguous_or_none(running_var)
    rows, channels, plane = _matrix_shape(xc)
    y = torch.empty_like(xc)
    rstd = xc.new_empty(groups, dtype=torch.float32)
    mean = torch.empty_like(rstd) if centered else None
    updates = training and running_var is not None
    # Two empty tensors, never one: a custom op's outputs may not alias each other.
    new_mean = torch.empty_like(running_mean) if updates and centered else xc.new_empty(0, dtype=torch.float32)
    new_var = torch.empty_like(running_var) if updates else xc.new_empty(0, dtype=torch.float32)
    group_size = reference.group_size(xc.shape, groups)
    if training and group_size == 0:
        # The moments of nothing, as in the reference; an empty batch leaves the running ones as they were.
        rstd.fill_(float("nan"))
        if centered:
            mean.fill_(float("nan"))
            new_mean = running_mean.clone() if updates else new_mean
        new_var = running_var.clone() if updates else new_var
        return y, mean, rstd, new_mean, new_var

    partials, partials_per_unit = _group_moments(xc, groups) if training else (rstd, 0)
    block_partials, block_units = _finalize_blocks(groups, partials_per_unit)
    # A raw moment has no bias to correct; a variance of one value has an infinite one.
    unbias = (group_size / (group_size - 1) if group_size > 1 else float("inf")) if centered else 1.0
    _group_statistics_kernel[(triton.cdiv(groups, block_units),)](
        partials,
        running_mean if running_mean is not None else rstd,
        running_var if running_var is not None else rstd,
        mean if mean is not None else rstd,
        rstd,
        new_mean if updates and centered else rstd,
        new_var if updates else rstd,
        groups,
        partials_per_unit,
        _f32(group_size),
        _f32(eps),
        _f32(momentum),
        _f32(1 - momentum),
        _f32(unbias),
        TRAINING=training,
        HAS_RUNNING=updates,
        CENTERED=centered,
        BLOCK_P=block_partials,
        BLOCK_U=block_units,
        enable_fp_fusion=False,
    )
    if xc.numel():
        _normalize(xc, None, mean, rstd, weight, bias, None, y, groups)
    return y, mean, rstd, new_mean, new_var


def layer_batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, new_running_mean, new_running_var), as ``reference.layer_batch_norm_forward``.

    x: (N, C, *) float32, bfloat16 or float16. weight, bias: (C,) or None; running_mean,
    running_var: (G,) or None (required in eval); each in any of those dtypes. y: x's shape and
    dtype, contiguous. mean, rstd: (G,) float32. The new running statistics: (G,) in their dtype
    in training, else empty float32."""
    return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, groups, centered=True)


def psp_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_moment: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, rstd, new_running_moment), as ``reference.psp_norm_forward``: the LBN passes with mean 0
    and the raw second moment E[x^2] in place of the variance.

    x: (N, C, *) float32, bfloat16 or float16. weight, bias: (C,) or None; running_moment: (G,) or
    None (required in eval); each in any of those dtypes. y: x's shape and dtype, contiguous. rstd:
    (G,) float32. The new running moment: (G,) in its dtype in training, else empty float32."""
    y, _, rstd, _, new_moment = _forward(
        x, weight, bias, None, running_moment, training, momentum, eps, groups, centered=False
    )
    return y, rstd, new_moment


def _backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(grad_x, grad_weight, grad_bias) of LBN, or of PSP with mean None."""
    xc, dy = x.contiguous(), grad.contiguous()
    weight, bias = contiguous_or_none(weight), contiguous_or_none(bias)
    mean, rstd = contiguous_or_none(mean), rstd.contiguous()
    rows, channels, plane = _matrix_shape(xc)
    grad_x = torch.empty_like(xc)
    grad_weight = None if weight is None else torch.zeros_like(weight)
    grad_bias = None if bias is None else torch.zeros_like(bias)
    if xc.numel() == 0:
        return grad_x, grad_weight, grad_bias

    part = _reduction_partition(rows, channels * plane, plane, _programs(xc.device))
    partials = xc.new_empty((2, part.partials_per_unit, channels), dtype=torch.float32)
    _channel_gradient_sums_kernel[part.grid](
        dy,
        xc,
        mean if mean is not None else rstd,
        rstd,
        weight if weight is not None else rstd,
        grad_x,
        partials,
        rows,
        channels * plane,
        plane,
        channels // groups,
        part.rows_per_program,
        part.cols_per_program,
        part.col_chunks,
        part.partials_per_unit,
        COLUMNWISE=part.columnwise,
        HAS_WEIGHT=weight is not None,
        WRITE_GRAD_X=not training,
        CENTERED=mean is not None,
        BLOCK_R=part.block_rows,
        BLOCK_C=part.block_cols,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    if not (training or weight is not None or bias is not None):
        return grad_x, grad_weight, grad_bias

    group_size = _f32(reference.group_size(xc.shape, groups))
    group_is_channel = groups == channels
    weighted = xc.new_empty((2, channels), dtype=torch.float32) if training else rstd
    block_partials, block_units = _finalize_blocks(channels, part.partials_per_unit)
    _channel_gradient_kernel[(triton.cdiv(channels, block_units),)](
        partials,
        weight if weight is not None else rstd,
        grad_weight if grad_weight is not None else rstd,
        grad_bias if grad_bias is not None else rstd,
        weighted,
        channels,
        part.partials_per_unit,
        group_size,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        WEIGHTED_SUMS=training,
        GROUP_IS_CHANNEL=group_is_channel,
        BLOCK_P=block_partials,
        BLOCK_U=block_units,
        enable_fp_fusion=False,
    )
    if training:
        grad_means = weighted
        if not group_is_channel:
            grad_means = xc.new_empty((2, groups), dtype=torch.float32)
            per_group = channels // groups
            _group_gradient_means_kernel[(groups,)](
                weighted,
                grad_means,
                channels,
                per_group,
                groups,
                group_size,
                BLOCK=min(triton.next_power_of_2(per_group), 1024),
                enable_fp_fusion=False,
            )
        _normalize(xc, dy, mean, rstd, weight, None, grad_means, grad_x, groups)
    return grad_x, grad_weight, grad_bias


def layer_batch_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(grad_x, grad_weight, grad_bias), as ``reference.layer_batch_norm_backward``.

    grad, x: (N, C, *) in x's dtype (float32, bfloat16 or float16). weight, bias: (C,) or None,
    any of those dtypes. mean, rstd: (G,) float32 from the forward. grad_x: x's shape and dtype,
    contiguous; grad_weight / grad_bias: (C,) in weight's / bias's dtype, None where those are."""
    return _backward(grad, x, weight, bias, mean, rstd, training, groups)


def psp_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(grad_x, grad_weight, grad_bias), as ``reference.psp_norm_backward``: LBN's passes with mean 0
    and without the mean_g(w dy) term. Shapes and dtypes as ``layer_batch_norm_backward``'s."""
    return _backward(grad, x, weight, bias, None, rstd, training, groups)
