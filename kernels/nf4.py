"""Blockwise NF4 quantization, bit-for-bit as bitsandbytes does it, with a fused Triton dequantizer.

Format (QLoRA, Dettmers et al. 2023). A weight of ``n`` elements, read flat in row-major order, is
cut into blocks of ``blocksize`` elements (the last block may be partial). Per block b:

    absmax[b] = max_i |w_i|                      (fp32)
    code_i    = argmin_k |w_i / absmax[b] - NF4[k]|   over the 16 sorted NF4 values in [-1, 1]
    w_i      ~= NF4[code_i] * absmax[b]

Rounding is bitsandbytes' (its CPU/torch path): the scaled value is ``w * (1 / absmax)`` for full
blocks and ``w / absmax`` for the partial last one (two different fp32 roundings, reproduced), then
``bucketize`` against the fp32 midpoints of adjacent codes: the code is the number of midpoints
strictly below the value, so a value exactly on a midpoint takes the LOWER code. (That count is
computed by a lookup on the value's fp32 bits, `_code_table`, equal to bucketize for every fp32
and 10x faster on a CPU.) Two codes per byte, the first element in the HIGH nibble; an odd count
is padded with code 7 (the value 0.0).

Double quantization ("compress statistics"): ``offset = mean(absmax)``; ``absmax - offset`` is
quantized to 8 bits blockwise (blocksize 256) on bitsandbytes' signed dynamic map, keeping the
second-level scales ``nested_absmax`` (fp32) and ``offset``. Dequantized:

    absmax[b] = DYN[qabsmax[b]] * nested_absmax[b // 256] + offset

The 8-bit rounding follows bitsandbytes' CPU kernel: the scaled value in [-1, 1] is first put on
a 65536-point grid, ``floor((v + 1) / 2 * 65535 + 0.5)``, then mapped to the code whose midpoint
interval holds that grid point. This differs from exact nearest-code rounding only for values
within 1/65535 of a midpoint, i.e. by at most one code step of an absmax, and makes our statistics
byte-identical to bitsandbytes'.

Shapes: ``packed`` (ceil(n/2),) uint8; ``absmax`` (ceil(n/blocksize),) fp32, or uint8 codes with
``nested_absmax`` (ceil(n_blocks/256),) fp32. bitsandbytes stores ``packed`` as (n/2, 1); its
state-dict keys are read and written by `models.bnb_checkpoint`.

Layout of this file: reference (quantize and dequantize, plain torch) -> Triton dequant kernel ->
launcher -> public ops. Dequantization has no autograd
Function: its inputs are integer codes and frozen statistics, nothing to differentiate; the
gradient path through a frozen NF4 weight lives in `kernels/nf4_linear.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch
from kernels.rounding import cast_rne
from kernels.weight_codes import FLOAT_DTYPES, check_dequantize_args

# The 16 NF4 values (quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero), as fp32.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_LUT_SIZE = 65536  # grid of bitsandbytes' CPU 8-bit quantizer


def nf4_bytes(n: int, blocksize: int = 64) -> int:
    """The bytes of one weight of n elements in this file's double-quantised layout (what an
    `models.quantized.NF4Linear` holds): packed codes ⌈n/2⌉ uint8, absmax codes ⌈n/bs⌉ uint8,
    nested absmax ⌈⌈n/bs⌉/256⌉ fp32, offset 1 fp32, and the 16-entry NF4 and 256-entry dynamic
    code tables in fp32 (each module holds its own). ``blocksize``: `quantize_nf4`'s default."""
    blocks = -(-n // blocksize)
    return -(-n // 2) + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 + 4 * (len(NF4_VALUES) + 256)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table, (16,) fp32, sorted ascending."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, (256,) fp32 sorted, = create_dynamic_map(signed=True).

    For exponent i = 0..6 it holds +-10**(i-6) * (midpoints of linspace(0.1, 1, 2**i + 1)), plus
    0 and 1 (the remaining slot is a second 0). Built with the same fp32 steps so it matches bitwise.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes plus the block statistics needed to dequantize it.

    ``absmax`` is fp32 (one per block), or, with double quantization, uint8 codes into
    ``nested_code`` scaled by ``nested_absmax`` (one per ``nested_blocksize`` blocks) plus ``offset``.
    ``offset`` is a 0-d fp32 tensor (read by the kernel from memory, so no host sync).
    ``shape``/``dtype`` are those of the original weight.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code),
                       offset=move(self.offset))


# ----------------------------------------------------------------------------------------------
# 1. Reference: quantization and dequantization in plain torch
# ----------------------------------------------------------------------------------------------

def check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r}: expected one of {VALID_BLOCKSIZES}")


_RANK_BITS = 19  # an fp32's low 19 bits: its rank inside its cell of 2**19 neighbouring floats
_CELLS = 1 << (32 - _RANK_BITS)  # 8192 cells, named by the top 13 bits (sign, exponent, 4 mantissa bits)
_NAN = len(NF4_VALUES) - 1  # bucketize's answer for NaN: every midpoint counted


def _ordered_bits(bits: np.ndarray) -> np.ndarray:
    """fp32 bit patterns (int32) -> int32 keys in the floats' order: ``o(a) < o(b)`` iff ``a < b``
    (a negative float's magnitude bits are flipped); an involution, so it is its own inverse."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@functools.lru_cache(maxsize=None)
def _code_table(device: torch.device) -> torch.Tensor:
    """(8192,) int32 ``T`` with ``bucketize(v, midpoints) = (T[c] + r) >> 19`` for every fp32 v,
    where ``o = _ordered_bits(v)``, ``c = (o >> 19) + 4096`` its cell and ``r = o & (2**19 - 1)``
    its rank in the cell; built once per device, never written.

    A cell holds 2**19 consecutive floats [lo, hi], at most 1/32 wide inside [-1, 1]: narrower
    than the gap between two NF4 midpoints (>= 0.08), so it holds at most one midpoint, of rank
    R. With ``base = #{midpoints < lo}``, ``T[c] = base * 2**19 + (2**19 - 1 - R)`` makes the
    shift give ``base + [r > R]``: the number of midpoints strictly below v, a value equal to a
    midpoint taking the lower code; a cell without a midpoint has ``T[c] = base * 2**19``.
    Cells of exponent 255 (inf, NaN) give bucketize's answer for NaN, 15.
    """
    cells = np.arange(_CELLS, dtype=np.int64) - _CELLS // 2
    first = _ordered_bits((cells << _RANK_BITS).astype(np.int32))
    lo = first.view(np.float32)  # the smallest float of each cell (its ordered key is cells << 19)
    special = ((first >> 23) & 0xFF) == 0xFF
    code = np.asarray(NF4_VALUES, dtype=np.float32)
    mids = (code[:-1] + code[1:]) / np.float32(2)  # in fp32, as the midpoints of `nf4_code`
    ordered = _ordered_bits(mids.view(np.int32)).astype(np.int64)
    cell_of_mid = (ordered >> _RANK_BITS) + _CELLS // 2
    if len(set(cell_of_mid.tolist())) < len(mids):
        raise AssertionError("an NF4 code cell holds two midpoints")  # impossible for the NF4 table
    base = (mids[None, :] < np.where(special, 0, lo)[:, None]).sum(axis=1)
    table = base << _RANK_BITS
    table[cell_of_mid] += (1 << _RANK_BITS) - 1 - (ordered & ((1 << _RANK_BITS) - 1))
    table[special] = _NAN << _RANK_BITS
    return torch.from_numpy(table.astype(np.int32)).to(device)


def _nf4_codes(scaled: torch.Tensor, out: torch.Tensor, work: _Work) -> None:
    """``out[i] = bucketize(scaled[i], midpoints)`` (uint8) by the table of `_code_table`: eight
    elementwise integer ops and one gather from an 8192-entry table, in ``work``'s buffers."""
    n = scaled.numel()
    bits, cell, rank = scaled.view(torch.int32), work.cell[:n], work.rank[:n]
    torch.bitwise_right_shift(bits, 31, out=cell)  # _ordered_bits, in torch
    cell.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)
    torch.bitwise_and(cell, (1 << _RANK_BITS) - 1, out=rank)
    cell.bitwise_right_shift_(_RANK_BITS).add_(_CELLS // 2)
    torch.index_select(_code_table(scaled.device), 0, cell, out=work.entry[:n])
    torch.bitwise_right_shift(work.entry[:n].add_(rank), _RANK_BITS, out=out)


def _pack_nibbles(codes: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """(2m,) uint8 codes in 0..15 -> ``out`` (m,) uint8, element 2j in the high nibble of byte j;
    ``scratch``: >= 2m int16 of workspace.

    Read as little-endian int16, a pair is ``p = c[2j] + 256 c[2j+1]``, and the low byte of
    ``(p << 4) | (p >> 8)`` is ``c[2j] << 4 | c[2j+1]``: contiguous ops, 4x faster on a CPU than
    shifting the strided ``c[0::2]``, which is the fallback on big-endian machines.
    """
    m = out.numel()
    if sys.byteorder != "little":
        torch.bitwise_left_shift(codes[0::2], 4, out=out)
        out.bitwise_or_(codes[1::2])
        return
    pairs, high, low = codes.view(torch.int16), scratch[:m], scratch[m:2 * m]
    torch.bitwise_left_shift(pairs, 4, out=high)
    torch.bitwise_right_shift(pairs, 8, out=low)
    torch.bitwise_or(high, low, out=out)  # int16 -> uint8 keeps the low byte


@dataclass
class _Work:
    """Reused per-chunk buffers of `quantize_nf4` (one chunk of ``n`` elements at a time)."""

    values: torch.Tensor  # (n,) fp32: the chunk in fp32, then |chunk|, then scaled into [-1, 1]
    cell: torch.Tensor  # (n,) int32: the cell of each scaled value (`_code_table`)
    rank: torch.Tensor  # (n,) int32: its rank in the cell
    entry: torch.Tensor  # (n,) int32: the table entry of the cell, then (entry + rank)
    codes: torch.Tensor  # (n,) uint8

    @classmethod
    def of(cls, n: int, device: torch.device) -> _Work:
        empty = functools.partial(torch.empty, n, device=device)
        return cls(empty(dtype=torch.float32), empty(dtype=torch.int32), empty(dtype=torch.int32),
                   empty(dtype=torch.int32), empty(dtype=torch.uint8))


# Elements per chunk: on a CPU the buffers (17 bytes per element, 4.5 MB) stay in cache; on a GPU the
# chunk only bounds them (4M elements: 70 MB), a 7B model's largest weight taking 11 chunks.
_CHUNK = {"cpu": 1 << 18}
_CHUNK_DEFAULT = 1 << 22


def _quantize_full_blocks(flat: torch.Tensor, blocksize: int, absmax: torch.Tensor, packed: torch.Tensor,
                          work: _Work) -> None:
    """Codes and absmax of whole blocks: ``flat`` (n,), n a multiple of ``blocksize`` (even), into
    ``absmax`` (n / blocksize,) and ``packed`` (n / 2,). bitsandbytes' rounding: ``w * (1 / absmax)``."""
    n = flat.numel()
    values = work.values[:n]
    blocks = values.view(-1, blocksize)
    values.copy_(flat).abs_()  # in fp32, exact
    torch.amax(blocks, dim=1, out=absmax)
    torch.mul(flat.view(-1, blocksize), (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), out=blocks)  # fp32
    values.clamp_(-1, 1)
    _nf4_codes(values, work.codes[:n], work)
    _pack_nibbles(work.codes[:n], packed, work.cell.view(torch.int16))  # cell is free again


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2),) uint8 -> (n,) int64 codes; inverse of `_pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n].long()


@functools.lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) int64: the dynamic-map code of each point -1 + 2g / 65535 of bitsandbytes' grid, the
    number of the map's midpoints strictly below it; built once per device, never written."""
    code = dynamic_map(device)
    grid_values = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / (_LUT_SIZE - 1)
    return torch.bucketize(grid_values, 0.5 * (code[:-1] + code[1:]))


def _quantize_dynamic_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU blockwise 8-bit quantizer on its dynamic map: (uint8 codes (n,), absmax
    (n_blocks,) fp32).

    v = clamp(x * (1 / absmax), -1, 1) is put on the grid g = floor((v + 1) * 0.5 * 65535 + 0.5);
    the code is the one whose midpoint interval holds -1 + 2g / 65535. An all-zero block gets code 0.
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # all-zero blocks: no NaN
    v = torch.clamp(blocks * inverse.view(-1, 1), -1, 1)
    grid = torch.floor((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).long()
    q = _dynamic_lut(x.device)[grid].to(torch.uint8)
    q[absmax == 0] = 0
    return q.view(-1)[:n], absmax


@torch.no_grad()  # codes and statistics are not differentiable; the buffers are written with out=
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a contiguous fp32/bf16/fp16 tensor of any shape to NF4 (see the module docstring).

    The whole blocks go chunk by chunk through reused buffers (`_quantize_full_blocks`), so the
    work stays in cache on a CPU and a weight never has a full-size fp32 copy; the partial last
    block, if any, is quantized apart (divided by its absmax, as bitsandbytes does).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight: dtype {weight.dtype} not supported, expected float32, bfloat16 or float16")
    if not weight.is_contiguous():
        raise ValueError(f"weight: must be contiguous (got strides {weight.stride()} for shape {tuple(weight.shape)})")
    if weight.numel() == 0:
        raise ValueError("weight: is empty")
    check_blocksize(blocksize)
    flat, device = weight.reshape(-1), weight.device
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    chunk = _CHUNK.get(device.type, _CHUNK_DEFAULT)  # a multiple of every blocksize
    work = _Work.of(min(chunk, n + 1), device)
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        _quantize_full_blocks(flat[start:stop], blocksize, absmax[start // blocksize:stop // blocksize],
                              packed[start // 2:stop // 2], work)
    if full < n:
        tail = flat[full:].float()
        absmax[-1] = tail.abs().max().clamp(min=1e-38)
        codes = work.codes[:n - full + (n - full) % 2]
        codes[-1] = NF4_VALUES.index(0.0)  # the pad of an odd count: code 7, the value 0.0
        _nf4_codes(torch.clamp(tail / absmax[-1], -1, 1), codes[:n - full], work)
        _pack_nibbles(codes, packed[full // 2:], work.cell.view(torch.int16))
    code = nf4_code(device)
    q = NF4Tensor(packed=packed, absmax=absmax, blocksize=blocksize, shape=weight.shape, dtype=weight.dtype,
                  code=code)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.nested_absmax = _quantize_dynamic_8bit(absmax - offset, NESTED_BLOCKSIZE)
        q.nested_code, q.offset = dynamic_map(device), offset
    return q


def _absmax_fp32(q: NF4Tensor) -> torch.Tensor:
    """The per-block scales (n_blocks,) fp32, undoing double quantization if any."""
    if not q.double_quant:
        return q.absmax.float()
    idx = torch.arange(q.absmax.numel(), device=q.device) // q.nested_blocksize
    return q.nested_code[q.absmax.long()] * q.nested_absmax[idx] + q.offset


def nf4_dequant_ref(q: NF4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference dequantization: ``code[c_i] * absmax[i // blocksize]`` in fp32, rounded once to ``dtype``."""
    n = q.numel
    block = torch.arange(n, device=q.device) // q.blocksize
    values = q.code[_unpack_nibbles(q.packed, n)] * _absmax_fp32(q)[block]
    return values.to(dtype).view(q.shape)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernel: one program writes BLOCK consecutive outputs
# ----------------------------------------------------------------------------------------------

@triton.jit
def _nf4_dequant_fwd_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
    offset_ptr, n_elements,
    QBLOCK: tl.constexpr, NESTED_QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    # Each byte is read by its two elements; the second read hits L1, and every access stays
    # coalesced, which beats interleaving two half-width vectors.
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - idx % 2) * 4)) & 0xF  # even element: high nibble
    block = idx // QBLOCK
    if DOUBLE_QUANT:
        qabsmax = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + qabsmax, mask=mask, other=0.0) \
            * tl.load(nested_absmax_ptr + block // NESTED_QBLOCK, mask=mask, other=0.0) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0) * scale
    tl.store(out_ptr + idx, cast_rne(value, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------

_DEQUANT_BLOCK, _DEQUANT_WARPS = 1024, 4  # outputs per program, warps per program


def _nf4_dequant_triton(q: NF4Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.device) if out is None else out
    n = q.numel
    block = _DEQUANT_BLOCK
    # Without double quantization the nested pointers are never read: pass any valid tensor.
    nested_absmax, nested_code, offset = (q.nested_absmax, q.nested_code, q.offset) if q.double_quant \
        else (q.code, q.code, q.code)
    # enable_fp_fusion=False: keep `code * nested_absmax + offset` as two roundings, like the reference.
    _nf4_dequant_fwd_kernel[(triton.cdiv(n, block),)](
        q.packed, q.absmax, q.code, nested_absmax, nested_code, out, offset, n,
        QBLOCK=q.blocksize, NESTED_QBLOCK=q.nested_blocksize, DOUBLE_QUANT=q.double_quant,
        ROUND_BF16=dtype == torch.bfloat16, BLOCK=block, num_warps=_DEQUANT_WARPS, enable_fp_fusion=False,
    )
    return out


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_nf4_dequant_triton` can launch (kernels/launch_cases.py): every output dtype,
    blocksize and double-quantization flag, for the largest weight (intermediate, hidden)."""
    f32, cases = torch.float32, []
    for dtype in shapes.dtypes:
        for double_quant in (False, True):
            for qblock in VALID_BLOCKSIZES:
                args = dict(packed_ptr=torch.uint8, absmax_ptr=torch.uint8 if double_quant else f32, code_ptr=f32,
                            nested_absmax_ptr=f32, nested_code_ptr=f32, out_ptr=dtype, offset_ptr=f32,
                            n_elements=shapes.intermediate * shapes.hidden)
                constexprs = dict(QBLOCK=qblock, NESTED_QBLOCK=NESTED_BLOCKSIZE, DOUBLE_QUANT=double_quant,
                                  ROUND_BF16=dtype == torch.bfloat16, BLOCK=_DEQUANT_BLOCK)
                cases.append(KernelCase(f"blocksize={qblock}{' double_quant' if double_quant else ''}",
                                        _nf4_dequant_fwd_kernel, dtype, args, constexprs,
                                        fixed_launch(_DEQUANT_WARPS), dict(enable_fp_fusion=False)))
    return cases


# ----------------------------------------------------------------------------------------------
# 4. Public op
# ----------------------------------------------------------------------------------------------

def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.bfloat16, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``dtype`` tensor of shape ``q.shape``: Triton on CUDA (or when forced), else the reference.

    ``out``: a contiguous ``dtype`` tensor of ``q.shape`` on q's device to write into (e.g. the rows
    of one weight inside the concatenated q/k/v weight, `kernels.lora_group`); returned."""
    check_dequantize_args(q, NF4Tensor, dtype, out)
    if use_triton(q.packed):
        return _nf4_dequant_triton(q, dtype, out)
    dense = nf4_dequant_ref(q, dtype)
    return dense if out is None else out.copy_(dense)



# ----------------------------------------------------------------------------------------------
# 5. Keeping a dequantized weight for the backward (gradient checkpointing)
# ----------------------------------------------------------------------------------------------

_KEEP_DEQUANTIZED: contextvars.ContextVar[bool] = contextvars.ContextVar("keep_dequantized", default=False)


@contextlib.contextmanager
def keep_dequantized() -> Iterator[None]:
    """Within: the products through an NF4 weight (`kernels.lora`, `kernels.nf4_linear`) save the
    dense weight they dequantized for their backward, instead of dequantizing it again there.

    Meant for both phases of activation checkpointing (``checkpoint(..., context_fn=...)``, which
    requires the forward and the recompute to save the same tensors): what the forward saves is
    dropped by checkpointing at once, and the backward of the recomputed block follows at once and
    frees the copy, so a weight costs two dequantizations per step (forward, recompute) instead of
    three, for one block's dense weights held during that block's backward. Outside it (no
    checkpointing) nothing dense outlives a forward."""
    token = _KEEP_DEQUANTIZED.set(True)
    try:
        yield
    finally:
        _KEEP_DEQUANTIZED.reset(token)


def keeping_dequantized() -> bool:
    """Whether `keep_dequantized` is in force."""
    return _KEEP_DEQUANTIZED.get()
