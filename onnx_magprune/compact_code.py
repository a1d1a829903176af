"""The ``compact`` code: a pruned tensor as its non-zero values plus packed
gap codes (pure numpy; no onnx imports).

The tensor is cut into *fibers*: in the ``planes`` layout the flattened tensor
in ``planes`` equal parts (described below); in the ``columns`` layout one
fiber per column along the first axis, entries stored [k, rest of the shape],
``planes`` symbols of adjacent columns per code word, scattered along axis 0
straight into the tensor's shape (no Reshape; filler mode only).

In the ``rows`` layout (position mode) each row along the last axis is a fiber
whose entries store their positions in the row directly (one byte for rows of
up to 256, two bytes up to 65,536) with their values, rows padded to the
longest with 0.0 written at distinct zero positions.  Decoding is a Cast of the positions
to int32 and one ScatterElements along axis 1 into zeros of shape [rows, row
length], which is the weight itself when it is 2-D: the fewest and smallest
intermediates, so the fastest session start, at two bytes per non-zero
instead of a few bits (``--optimize-for startup`` picks it; never above the
dense size).

In the planes layout the flattened tensor is cut into ``planes`` equal parts
(``planes`` divides its size).  Each plane is a stream of *entries*: the first sits at the
plane's position 0 and each entry's *symbol* says how far the next one is
(0: the same position).  Symbols are packed ``planes`` to a code word (one
or two bytes), plane r in digit r (base ``size``), so one lookup-table Gather
turns the k code words into the [planes, k] advances, and an exclusive
CumSum into positions.  Then one ScatterElements writes the entries into
zeros of shape [planes, n / planes], and a Reshape gives the tensor.

Two modes:

* ``filler``: every entry writes a stored value; a run of zeros longer than
  the largest advance is bridged by entries that store 0.0.  The stored
  values are the scatter's updates directly: the fewest decode steps.
* ``skip``: symbols are (advance, kind) pairs; skip entries write 0.0
  without storing it (their value index is 0, found by a CumSum of the
  is-value flags), so long runs cost one symbol and no value bytes.  The
  smallest files, at the price of a few more decode steps.

Planes whose entries run out early are padded with entries of advance 0
that repeat the plane's last write (their value is stored again).  Entries
whose bits are not all zero (``-0.0``, NaN) are values, so decoding is
bit-exact.  :meth:`CompactTensor.decode` is the reference the ONNX decoder is
tested against.

A tensor larger than :data:`BLOCK_BYTES` (decoded) is coded in *blocks*: slices
along one axis (:func:`blocking`), each coded on its own with the same
alphabet and rebuilt by its own small decoder, the blocks joined by one
Concat (:class:`BlockedTensor`).  Page faults dominate ONNX Runtime's session
creation, and (by our fault counts) its constant folding keeps every folded
output until it ends, and a folded node's full-size inputs cost fresh memory
again: a decoder for the whole tensor pays for its full-size zeros twice, a
blocked one only for its outputs.

The information bound for a tensor of n elements, z of them zero, is the
value bytes plus n·H(z/n)/8 bytes of positions (H the binary entropy).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np


class Mode(str, enum.Enum):
    FILLER = "filler"
    SKIP = "skip"
    POSITION = "position"  # each entry stores its position in its fiber (rows layout): no CumSum to decode


class Layout(str, enum.Enum):
    PLANES = "planes"    # fibers: equal contiguous parts of the flattened tensor; scatter, then a Reshape
    COLUMNS = "columns"  # fibers: along the first axis (one per column); scatter straight into the shape
    ROWS = "rows"        # fibers: along the last axis (one per row); position mode; no Reshape for 2-D weights


class Objective(str, enum.Enum):
    SIZE = "size"          # the smallest file
    STARTUP = "startup"    # the fewest decode steps (fastest session start)
    BALANCED = "balanced"  # the fastest start among the candidates near the smallest size


@dataclass(frozen=True)
class Alphabet:
    """``planes`` symbols of base ``size`` per code word of ``word_bytes`` bytes.
    Symbols: value entries with advance 0..``advance_max``, then (skip mode)
    one skip symbol per length in ``skips``."""

    word_bytes: int
    planes: int           # symbols per code word (planes layout: also the number of fibers)
    mode: Mode
    advance_max: int
    skips: tuple[int, ...] = ()
    layout: Layout = Layout.PLANES

    @property
    def size(self) -> int:
        return self.advance_max + 1 + len(self.skips)

    @cached_property
    def table(self) -> np.ndarray:
        """[size, 2] int64: the advance and is-value flag of each symbol."""
        rows = [(a, 1) for a in range(self.advance_max + 1)] + [(s, 0) for s in self.skips]
        return np.array(rows, dtype=np.int64)

    def valid(self) -> bool:
        if (self.mode is Mode.POSITION) != (self.layout is Layout.ROWS):
            return False
        return (self.size ** self.planes <= 256 ** self.word_bytes and self.advance_max >= 1
                and (self.mode is Mode.SKIP) == bool(self.skips)
                and (self.layout is not Layout.COLUMNS or self.mode is Mode.FILLER)
                and (self.mode is not Mode.POSITION or self.planes == 1))

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.word_bytes == 1 else "<u2")

    @property
    def identity(self) -> bool:
        """Code word = advance: the decoder needs no lookup table."""
        return self.planes == 1 and self.mode is Mode.FILLER and self.size == 256 ** self.word_bytes

    def fibers(self, shape: tuple[int, ...]) -> int:
        """How many entry streams a tensor of ``shape`` is cut into."""
        n = math.prod(shape)
        if self.layout is Layout.ROWS:
            return n // shape[-1]
        return n // shape[0] if self.layout is Layout.COLUMNS else self.planes

    def fits(self, shape: tuple[int, ...]) -> bool:
        n = math.prod(shape)
        if self.layout is Layout.ROWS:  # every position of a row must fit a code word
            return len(shape) >= 1 and shape[-1] >= 1 and shape[-1] <= self.size
        if self.layout is Layout.COLUMNS:
            return len(shape) >= 2 and shape[0] >= 2 and (n // shape[0]) % self.planes == 0
        return n % self.planes == 0


def alphabets() -> list[Alphabet]:
    """The candidates: (word bytes, planes, symbols per plane) with size**planes <= 256**word_bytes."""
    shapes = [(1, 1, 256), (1, 2, 16), (1, 4, 4), (1, 3, 6), (2, 3, 40), (2, 5, 9), (2, 6, 6)]
    out = []
    for word, planes, size in shapes:
        out.append(Alphabet(word, planes, Mode.FILLER, size - 1))
        for n_skips in (1, 2, 3):
            advance_max = size - 1 - n_skips
            if advance_max < 2:
                continue
            skips = tuple(advance_max * 4 ** i for i in range(n_skips - 1, -1, -1))
            out.append(Alphabet(word, planes, Mode.SKIP, advance_max, skips))
    for per_word, size in ((1, 256), (2, 16), (4, 4)):  # columns: filler codes, one byte per word
        out.append(Alphabet(1, per_word, Mode.FILLER, size - 1, (), Layout.COLUMNS))
    for word in (1, 2):  # rows: positions, rows of up to 256 or 65,536
        out.append(Alphabet(word, 1, Mode.POSITION, 256 ** word - 1, (), Layout.ROWS))
    return [a for a in out if a.valid()]


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def bound_bytes(n: int, nonzero: int, itemsize: int) -> float:
    """The information bound: value bytes plus n·H(zeros/n)/8 bytes of positions."""
    if n == 0:
        return 0.0
    return nonzero * itemsize + n * binary_entropy((n - nonzero) / n) / 8


def nonzero_mask(array: np.ndarray) -> np.ndarray:
    """Flat; True where the bits are not all zero (-0.0 and NaN count as values)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(np.dtype(f"u{flat.dtype.itemsize}")) != 0


@dataclass(frozen=True)
class CompactTensor:
    """One tensor in the compact code (a value object: ``decode`` and ``nbytes``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    alphabet: Alphabet
    entries: int          # entries per plane (k)
    codes: np.ndarray     # [k] code words
    values: np.ndarray    # filler: [planes, k] updates; skip: [1 + stored values], index 0 is 0.0
    plane_base: np.ndarray  # skip: [planes] values stored before each plane (for the value index)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.values.nbytes)

    @property
    def fibers(self) -> int:
        return self.alphabet.fibers(self.shape)

    @property
    def total_entries(self) -> int:
        return self.fibers * self.entries

    def symbols(self) -> np.ndarray:
        """[fibers, k] int64 (position mode: the positions)."""
        a = self.alphabet
        words = self.codes.astype(np.int64)
        if a.mode is Mode.POSITION:  # stored [fibers, k]
            return words.reshape(self.fibers, self.entries)
        if a.layout is Layout.COLUMNS:  # [k, fibers / per-word] words, per-word adjacent fibers in each
            digits = (words.reshape(self.entries, -1)[..., None] // (a.size ** np.arange(a.planes))) % a.size
            return digits.reshape(self.entries, self.fibers).T
        return (words[None, :] // (a.size ** np.arange(a.planes))[:, None]) % a.size

    def decode(self) -> np.ndarray:
        """The dense tensor, bit-exact."""
        a = self.alphabet
        sym = self.symbols()
        if a.mode is Mode.POSITION:
            positions = sym
        else:
            adv = a.table[sym, 0]
            positions = np.cumsum(adv, axis=1) - adv  # exclusive
        if a.mode in (Mode.FILLER, Mode.POSITION):
            updates = self.values.reshape(self.entries, self.fibers).T if a.layout is Layout.COLUMNS \
                else self.values.reshape(sym.shape)
        else:
            is_value = a.table[sym, 1]
            index = (np.cumsum(is_value, axis=1) + self.plane_base[:, None]) * is_value
            updates = self.values[index]
        out = np.zeros((self.fibers, self.numel // self.fibers), dtype=self.dtype)
        bits = out.view(np.dtype(f"u{out.dtype.itemsize}"))
        np.put_along_axis(bits, positions, np.ascontiguousarray(updates).view(bits.dtype), axis=1)
        if a.layout is Layout.COLUMNS:  # fiber f is column f: out is the transposed [first axis, rest] view
            return np.ascontiguousarray(out.T).reshape(self.shape)
        return out.reshape(self.shape)


def fiber_major(array: np.ndarray, layout: Layout) -> np.ndarray:
    """The flattened tensor with each fiber contiguous (columns: the transpose of [first axis, rest])."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if layout is Layout.COLUMNS:
        return np.ascontiguousarray(flat.reshape(array.shape[0], -1).T).reshape(-1)
    return flat


# ------------------------------------------------------------------ blocks

#: Tensors whose decoded size exceeds this many bytes are coded and decoded in blocks of at
#: most this size (one slice along the blocked axis when a slice is larger).  Measured with
#: ONNX Runtime 1.32 on CPU (4 x 4096^2 float32 at 50%, rows code): blocks of 1-4 MiB cut the
#: page faults of session creation by a third against one decoder for the whole tensor;
#: blocks of 256 KiB or less start slower again (more nodes to fold).
BLOCK_BYTES = 1 << 20


def decoded_itemsize(dtype: np.dtype) -> int:
    """Bytes per element of the decoder's intermediates (bfloat16 decodes in float32)."""
    return 4 if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype).itemsize


@dataclass(frozen=True)
class Blocking:
    """Slices along ``axis``, of ``sizes`` elements each."""

    axis: int
    sizes: tuple[int, ...]

    def block_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The distinct shapes of the blocks."""
        return [shape[:self.axis] + (size,) + shape[self.axis + 1:] for size in sorted(set(self.sizes))]

    def split(self, array: np.ndarray) -> list[np.ndarray]:
        edges = np.cumsum(self.sizes)[:-1]
        return np.split(array, edges, axis=self.axis)


def blocking(shape: tuple[int, ...], itemsize: int, block_bytes: int | None = None) -> Blocking | None:
    """How a tensor of ``shape`` (decoded ``itemsize`` bytes per element) is cut into blocks of about
    ``block_bytes`` (default :data:`BLOCK_BYTES`), as evenly as possible, along its first axis whose
    slices are no larger than that (its longest axis when none is); None when it is small enough to
    decode whole (or has no axis to cut)."""
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    total = math.prod(shape) * itemsize
    if total <= block_bytes:
        return None
    axes = [i for i, d in enumerate(shape) if d > 1]
    if not axes:
        return None
    axis = next((i for i in axes if total // shape[i] <= block_bytes), max(axes, key=lambda i: shape[i]))
    length = shape[axis]
    count = min(length, -(-total // block_bytes))
    base, extra = divmod(length, count)
    return Blocking(axis, tuple(base + 1 if i < extra else base for i in range(count)))


@dataclass(frozen=True)
class BlockedTensor:
    """A tensor coded block by block (a value object like :class:`CompactTensor`)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    blocking: Blocking
    blocks: tuple[CompactTensor, ...]

    @property
    def alphabet(self) -> Alphabet:
        return self.blocks[0].alphabet

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def fibers(self) -> int:
        return sum(b.fibers for b in self.blocks)

    @property
    def total_entries(self) -> int:
        return sum(b.total_entries for b in self.blocks)

    def decode(self) -> np.ndarray:
        """The dense tensor, bit-exact."""
        return np.concatenate([b.decode() for b in self.blocks], axis=self.blocking.axis)


def encode_blocked(array: np.ndarray, alphabet: Alphabet, plan: Blocking | None) -> CompactTensor | BlockedTensor:
    """``array`` coded whole (``plan`` None) or block by block, every block with ``alphabet``."""
    if plan is None:
        return encode(array, alphabet)
    blocks = tuple(encode(np.ascontiguousarray(b), alphabet) for b in plan.split(array))
    return BlockedTensor(tuple(array.shape), array.dtype, plan, blocks)


# ------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class _Gaps:
    """The non-zeros of each plane and the distances between them."""

    planes: int
    length: int
    plane: np.ndarray   # plane of each non-zero
    pos: np.ndarray     # position within its plane
    lead: np.ndarray    # per plane: position of its first non-zero (length if none)
    gaps: np.ndarray    # distance from each non-zero to the next one in its plane (0 for the last)


def _gaps(mask: np.ndarray, planes: int, flat_positions: np.ndarray | None = None) -> _Gaps:
    """``flat_positions``: ``np.flatnonzero(mask)`` when already known (it is the same for every plane count)."""
    length = mask.size // planes
    flat = np.flatnonzero(mask) if flat_positions is None else flat_positions
    plane = flat // length if planes > 1 else np.zeros(flat.size, dtype=np.int64)
    pos = flat - plane * length if planes > 1 else flat
    nnz = pos.size
    gaps = np.zeros(nnz, dtype=np.int64)
    lead = np.full(planes, length, dtype=np.int64)
    if nnz:
        gaps[:-1] = flat[1:] - flat[:-1]
        starts = np.ones(nnz, dtype=bool)
        starts[1:] = plane[1:] != plane[:-1]
        gaps[:-1][starts[1:]] = 0
        lead[plane[starts]] = pos[starts]
    return _Gaps(planes, length, plane, pos.astype(np.int64, copy=False), lead, gaps)


def _bridge_counts(need: np.ndarray, alphabet: Alphabet) -> list[np.ndarray]:
    """Bridging entries per bridge length (fillers of length advance_max, or skips,
    longest first) covering ``need`` positions beyond the entry's own advance."""
    lengths = alphabet.skips if alphabet.mode is Mode.SKIP else (alphabet.advance_max,)
    counts = []
    for i, s in enumerate(lengths):
        q = -(-need // s) if i == len(lengths) - 1 else need // s  # the smallest length rounds up
        need = need - q * s
        counts.append(q)
    return counts


def _bridges(distance: np.ndarray, alphabet: Alphabet) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split each distance into the entry's own advance (1..advance_max; 0 stays 0)
    and the counts of bridging entries after it.  Only long distances need work."""
    lengths = alphabet.skips if alphabet.mode is Mode.SKIP else (alphabet.advance_max,)
    long = np.flatnonzero(distance > alphabet.advance_max)
    counts_long = _bridge_counts(distance[long] - alphabet.advance_max, alphabet)
    own = distance.copy()
    counts = []
    for q_long, s in zip(counts_long, lengths):
        q = np.zeros(distance.size, dtype=np.int64)
        q[long] = q_long
        own[long] -= q_long * s
        counts.append(q)
    return own, counts


def _entries_per_plane(g: _Gaps, alphabet: Alphabet) -> np.ndarray:
    """Entries per plane: its non-zeros, a leading 0.0 where it does not start with a value,
    and the bridges of long distances (counted without building the items)."""
    per_plane = np.bincount(g.plane, minlength=g.planes).astype(np.int64)
    long = np.flatnonzero(g.gaps > alphabet.advance_max)
    if long.size:
        extra = sum(_bridge_counts(g.gaps[long] - alphabet.advance_max, alphabet))
        per_plane += np.bincount(g.plane[long], weights=extra, minlength=g.planes).astype(np.int64)
    leading = g.lead > 0
    lead_dist = np.where(leading & (g.lead < g.length), g.lead, 0)
    lead_long = lead_dist > alphabet.advance_max
    per_plane += leading
    if lead_long.any():
        per_plane[lead_long] += sum(_bridge_counts(lead_dist[lead_long] - alphabet.advance_max, alphabet))
    return per_plane


@dataclass(frozen=True)
class _Items:
    """The items of every plane in order: a leading 0.0 at position 0 when the
    plane does not start with a value, then its non-zeros; each item is one
    value entry advancing ``own`` plus the bridging entries after it."""

    plane: np.ndarray      # per item
    value_at: np.ndarray   # per item: flat index of its value, or -1 for a stored 0.0
    own: np.ndarray        # per item: its own advance (0 for a plane's last item)
    counts: list[np.ndarray]  # per item: bridging entries per bridge length
    per_plane: np.ndarray  # entries per plane
    k: int                 # entries per plane after padding


@dataclass(frozen=True)
class _Base:
    """The items of every plane, independent of the alphabet."""

    g: _Gaps
    plane: np.ndarray
    value_at: np.ndarray
    dist: np.ndarray     # distance from each item to the next one in its plane (0 for the last)


def _base(g: _Gaps) -> _Base:
    lead_planes = np.flatnonzero(g.lead > 0)  # empty planes too (lead == length): they hold one 0.0
    lead_dist = np.where(g.lead[lead_planes] < g.length, g.lead[lead_planes], 0)
    # non-zeros are sorted by plane; each plane's leading item goes right before its first non-zero
    at = np.searchsorted(g.plane, lead_planes, side="left")
    return _Base(g, np.insert(g.plane, at, lead_planes), np.insert(g.plane * g.length + g.pos, at, -1),
                 np.insert(g.gaps, at, lead_dist))


def _items(b: _Base, alphabet: Alphabet) -> _Items:
    own, counts = _bridges(b.dist, alphabet)
    per_item = 1 + sum(counts)
    per_plane = np.bincount(b.plane, weights=per_item, minlength=b.g.planes).astype(np.int64)
    k = max(int(per_plane.max()) if b.g.planes else 0, 1)
    return _Items(b.plane, b.value_at, own, counts, per_plane, k)


def encoded_nbytes(g: _Gaps, alphabet: Alphabet, itemsize: int) -> tuple[int, int]:
    """(bytes, entries per plane) of ``alphabet``'s encoding, without building it."""
    if alphabet.mode is Mode.POSITION:
        k = max(int(np.bincount(g.plane, minlength=g.planes).max()) if g.plane.size else 0, 1)
        return g.planes * k * (alphabet.word_bytes + itemsize), k
    per_plane = _entries_per_plane(g, alphabet)
    k = max(int(per_plane.max()) if per_plane.size else 0, 1)
    code = k * (g.planes // alphabet.planes) * alphabet.word_bytes
    if alphabet.mode is Mode.FILLER:
        return code + g.planes * k * itemsize, k
    pads = int((k - per_plane).sum())
    items = g.pos.size + int((g.lead > 0).sum())
    return code + (1 + items + pads) * itemsize, k


def encode(array: np.ndarray, alphabet: Alphabet) -> CompactTensor:
    """Encode ``array`` (any float dtype and shape; its size divisible by ``alphabet.planes``) exactly."""
    shape = tuple(array.shape)
    if array.size == 0:
        raise ValueError("an empty tensor has nothing to encode")
    if not alphabet.fits(shape):
        raise ValueError(f"a tensor of shape {shape} does not fit {alphabet}")
    flat = fiber_major(array, alphabet.layout)
    planes = alphabet.fibers(shape)
    if alphabet.mode is Mode.POSITION:
        return _encode_positions(shape, flat, planes, alphabet)
    it = _items(_base(_gaps(nonzero_mask(flat), planes)), alphabet)
    k, skip = it.k, alphabet.mode is Mode.SKIP
    lengths = alphabet.skips if skip else (alphabet.advance_max,)
    bridge_syms = ([alphabet.advance_max + 1 + i for i in range(len(lengths))] if skip else [alphabet.advance_max])
    per_item = 1 + sum(it.counts)
    n_entries = int(per_item.sum())
    owner = np.repeat(np.arange(per_item.size), per_item)
    rank = np.arange(n_entries) - np.repeat(np.cumsum(per_item) - per_item, per_item)
    first = rank == 0
    sym = np.where(first, it.own[owner], 0)
    done = np.ones(n_entries, dtype=np.int64)
    for q, s_sym in zip(it.counts, bridge_syms):  # bridges, longest first
        upto = done + q[owner]
        sym = np.where((rank >= done) & (rank < upto), s_sym, sym)
        done = upto
    zero = np.zeros(1, dtype=flat.dtype)
    item_value = np.where(it.value_at >= 0, flat[np.maximum(it.value_at, 0)], zero)
    entry_value = np.where(first, item_value[owner], zero)
    is_value = first | (not skip)
    is_value = np.broadcast_to(is_value, (n_entries,))
    entry_plane = it.plane[owner]
    col = np.arange(n_entries) - (np.cumsum(it.per_plane) - it.per_plane)[entry_plane]
    grid = np.zeros((planes, k), dtype=np.int64)  # pads: symbol 0, a value entry advancing 0
    grid[entry_plane, col] = sym
    values = np.zeros((planes, k), dtype=flat.dtype)
    values[entry_plane, col] = entry_value
    valued = np.ones((planes, k), dtype=bool)
    valued[entry_plane, col] = is_value
    # pads repeat the plane's last entry, which is always a value entry (its own advance is 0)
    last = np.maximum(it.per_plane - 1, 0)
    pad = np.arange(k)[None, :] >= it.per_plane[:, None]
    values = np.where(pad, values[np.arange(planes), last][:, None], values)
    if skip:
        counts = valued.sum(axis=1)
        plane_base = (np.cumsum(counts) - counts).astype(np.int64)
        values = np.concatenate([zero, values[valued]])
    else:
        plane_base = np.zeros(planes, dtype=np.int64)
    weights = alphabet.size ** np.arange(alphabet.planes)
    if alphabet.layout is Layout.COLUMNS:  # stored [k, fibers]: entry j of every fiber in row j
        words = (grid.T.reshape(k, planes // alphabet.planes, alphabet.planes) * weights).sum(axis=2)
        values = np.ascontiguousarray(values.T)
    else:
        words = (grid * weights[:, None]).sum(axis=0)
    return CompactTensor(shape, flat.dtype, alphabet, k, words.astype(alphabet.code_dtype), values, plane_base)


def _encode_positions(shape: tuple[int, ...], flat: np.ndarray, fibers: int, alphabet: Alphabet) -> CompactTensor:
    """Position mode: row f's non-zeros as (position, value) pairs, rows padded to the longest
    one with +0.0 written at the row's first zero positions (k <= the row length, so a row
    short of k entries has enough zeros): no index repeats, as ScatterElements requires."""
    mask = nonzero_mask(flat)
    g = _gaps(mask, fibers)
    per = np.bincount(g.plane, minlength=fibers).astype(np.int64)
    k = max(int(per.max()) if per.size else 0, 1)
    col = np.arange(g.pos.size) - (np.cumsum(per) - per)[g.plane]
    pos = np.zeros((fibers, k), dtype=np.int64)
    values = np.zeros((fibers, k), dtype=flat.dtype)  # pads keep +0.0
    pos[g.plane, col] = g.pos
    values[g.plane, col] = flat[g.plane * g.length + g.pos]
    need = k - per
    if need.any():
        zeros = np.flatnonzero(~mask)
        row = zeros // g.length
        zeros_per = np.bincount(row, minlength=fibers)
        rank = np.arange(zeros.size) - (np.cumsum(zeros_per) - zeros_per)[row]
        take = rank < need[row]
        pos[row[take], per[row[take]] + rank[take]] = zeros[take] - row[take] * g.length
    return CompactTensor(shape, flat.dtype, alphabet, k, pos.astype(alphabet.code_dtype), values,
                         np.zeros(fibers, dtype=np.int64))
