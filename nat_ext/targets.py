"""Noise-as-targets: fixed targets drawn uniformly on the unit sphere.

Every target row is a pure function of ``(seed, index)``, drawn by one of two generators
(a run records which, see ``--target-generator``):

* ``philox``: Philox4x32-10 (Salmon et al., SC'11; the counter-based generator of
  cuRAND and of torch's CUDA generator), written in torch integer ops so it runs on
  the tensor's device with no host round trip. Row ``i`` takes counters
  ``(j, i mod 2^32, i div 2^32, 0)`` for ``j = 0 .. ceil(d/4) - 1`` under the key
  ``(seed mod 2^32, seed div 2^32)``; each block of 4 words gives 4 normals by
  Box-Muller (in float64), and the row is L2-normalised in float64, then rounded to
  float32. The integer words are identical on every device (tested against
  Random123's published answers); the float32 rows are bit-identical on one device
  type and agree across devices (CPU, CUDA) to within a few float32 ulps, since
  ``log``/``cos`` and the row sum may round differently there.
* ``pcg64``: numpy's PCG64 seeded with ``SeedSequence([seed, i])`` per row, standard
  normals, L2-normalised in float64; computed on the CPU, one Python step per row, so
  bit-identical everywhere but slow for large batches. Every run before the
  ``philox`` generator existed used it; it stays for those checkpoints.

So a run can store just the seed and regenerate any row, or the whole ``n x d`` matrix.

Besides the paper's uniform noise (``sphere``), two other target sets (``--targets``), every
row still a pure function of ``(seed, index)`` and the set's parameters:

* ``onehot``: ``k`` prototypes, the basis vectors ``e_0 .. e_{k-1}`` of R^d; target ``i`` is
  ``e_{i mod k}``, so each prototype is held by ``n / k`` images and the exact assignment of a
  batch becomes a balanced clustering of its images.
* ``clustered``: ``k`` centres drawn uniformly on the sphere (the sphere rows ``2^62 + c`` of the
  same seed: rows no dataset reaches, so no target is a centre) and target ``i`` =
  ``normalize(c_{i mod k} + spread * u_i)`` with ``u_i`` the sphere row ``i``: the cosine to its
  centre is about ``1 / sqrt(1 + spread^2)`` in high dimension.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

__all__ = ["GENERATORS", "KINDS", "target_rows", "philox4x32", "Targets", "check_target_set", "CHUNK_ELEMS"]

GENERATORS = ("philox", "pcg64")
KINDS = ("sphere", "onehot", "clustered")
CHUNK_ELEMS = 1 << 22  # elements per chunk of the passes over every target (Targets.chunks)
_CENTRE_ROW = 1 << 62  # the clustered set's centre c is the sphere row 2^62 + c

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _check_sizes(seed: int, d: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"seed should be a non-negative int, got {seed!r}")
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d should be a positive int, got {d!r}")


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # m * x for a 32-bit constant m and int64 tensors x in [0, 2^32), as (high, low) 32-bit
    # words; x is split into 16-bit halves so no int64 product overflows.
    p_lo = m * (x & 0xFFFF)  # < 2^48
    p_hi = m * (x >> 16)     # < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(counter: list[torch.Tensor], key: tuple[int, int], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32 on tensors of counters: the 4 output words for each counter.

    Args:
        counter: four int64 tensors of one shape, each word in ``[0, 2^32)``.
        key: two ints in ``[0, 2^32)``.
        rounds: 10 for Philox4x32-10.

    Returns:
        four int64 tensors of that shape, words in ``[0, 2^32)``, on the counters' device.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def _philox_rows(seed: int, index: torch.Tensor, d: int) -> torch.Tensor:
    blocks = (d + 3) // 4
    i = index.reshape(-1, 1)
    j = torch.arange(blocks, device=index.device, dtype=torch.int64).reshape(1, -1)
    shape = (i.shape[0], blocks)
    counter = [j.expand(shape), (i & _MASK32).expand(shape), (i >> 32).expand(shape),
               torch.zeros(shape, dtype=torch.int64, device=index.device)]
    w = philox4x32(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    # Uniforms in (0, 1) from 32-bit words, then Box-Muller: words (0, 1) and (2, 3) make 2 normals each.
    u = [(x.double() + 0.5) * 2.0 ** -32 for x in w]
    r0, r1 = (-2.0 * u[0].log()).sqrt(), (-2.0 * u[2].log()).sqrt()
    a0, a1 = (2.0 * math.pi) * u[1], (2.0 * math.pi) * u[3]
    z = torch.stack([r0 * a0.cos(), r0 * a0.sin(), r1 * a1.cos(), r1 * a1.sin()], dim=-1)
    z = z.reshape(i.shape[0], blocks * 4)[:, :d]
    return (z / z.norm(dim=1, keepdim=True)).float()


def _pcg64_rows(seed: int, index: torch.Tensor, d: int) -> torch.Tensor:
    idx = index.cpu().reshape(-1).tolist()
    out = np.empty((len(idx), d), dtype=np.float64)
    for r, i in enumerate(idx):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i])))
        out[r] = rng.standard_normal(d)
    # Normalise in float64 so the float32 result does not depend on summation order.
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return torch.from_numpy(out.astype(np.float32)).to(index.device)


def target_rows(seed: int, index: torch.Tensor | list[int], d: int, generator: str = "pcg64") -> torch.Tensor:
    """Regenerate target rows from ``(seed, index)``.

    Args:
        seed: non-negative int identifying the target set.
        index: Tensor[k] (or list) of non-negative row indices; a CPU index is checked.
        d: target dimension.
        generator: ``philox`` or ``pcg64`` (see the module docstring).

    Returns:
        Tensor[k, d] float32 on the index's device, each row of unit L2 norm.
    """
    _check_sizes(seed, d)
    if generator not in GENERATORS:
        raise ValueError(f"generator should be one of {GENERATORS}, got {generator!r}")
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    if index.device.type == "cpu" and index.numel() and int(index.min()) < 0:
        raise ValueError(f"index should be non-negative, got {int(index.min())}")
    if generator == "philox":
        return _philox_rows(seed, index, d)
    return _pcg64_rows(seed, index, d)


def check_target_set(kind: str, n: int, d: int, k: int, spread: float) -> None:
    """Raise ValueError, naming the option, unless ``(kind, k, spread)`` defines a target set
    of ``n`` targets in ``d`` dimensions (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"targets should be one of {KINDS}, got {kind!r}")
    if kind == "onehot":
        if not 2 <= k <= d:
            raise ValueError(f"targets onehot: num_prototypes should lie in [2, dim = {d}] (one-hot vectors of "
                             f"R^dim), got {k}")
        if n % k:
            raise ValueError(f"targets onehot: num_prototypes should divide the {n} images (each prototype is "
                             f"held by n / k images), got {k}")
    if kind == "clustered":
        if not 1 <= k <= n:
            raise ValueError(f"targets clustered: num_prototypes should lie in [1, {n}], got {k}")
        if not (math.isfinite(spread) and spread >= 0):
            raise ValueError(f"targets clustered: target_spread should be finite and >= 0, got {spread}")


class Targets:
    """The ``n`` targets of a run, materialised or regenerated on demand.

    Args:
        n: number of targets (one per training image).
        d: dimension.
        seed: seed of the target set.
        materialize: keep the Tensor[n, d] matrix (fast lookups) instead of
            regenerating the rows a batch needs from the seed (no memory).
        device: device for the materialised matrix and for ``rows`` results.
        generator: ``philox`` or ``pcg64``; both modes give the same rows.
        kind: ``sphere``, ``onehot`` or ``clustered`` (see the module docstring).
        num_prototypes: ``k`` of ``onehot`` and ``clustered``.
        spread: ``clustered``: spread of the targets around their centre.
    """

    def __init__(self, n: int, d: int, seed: int, materialize: bool = True,
                 device: torch.device | str = "cpu", generator: str = "pcg64", kind: str = "sphere",
                 num_prototypes: int = 0, spread: float = 0.0) -> None:
        _check_sizes(seed, d)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n should be a positive int, got {n!r}")
        if generator not in GENERATORS:
            raise ValueError(f"generator should be one of {GENERATORS}, got {generator!r}")
        check_target_set(kind, n, d, num_prototypes, spread)
        self.n, self.d, self.seed, self.generator = n, d, seed, generator
        self.kind, self.num_prototypes, self.spread = kind, num_prototypes, spread
        self.device = torch.device(device)
        where = self.device if generator == "philox" else "cpu"  # where the generator runs
        self.centres = None
        if kind == "clustered":
            self.centres = target_rows(seed, _CENTRE_ROW + torch.arange(num_prototypes, device=where),
                                       d, generator).to(self.device)
        self.matrix: torch.Tensor | None = None
        if materialize:
            self.matrix = self.full()

    def _generate(self, index: torch.Tensor) -> torch.Tensor:
        if self.kind == "onehot":
            return torch.nn.functional.one_hot(index % self.num_prototypes, self.d).float()
        rows = target_rows(self.seed, index, self.d, self.generator)
        if self.kind == "clustered":
            centre = self.centres.to(rows.device).index_select(0, index % self.num_prototypes)
            mixed = centre.double() + self.spread * rows.double()
            rows = (mixed / mixed.norm(dim=1, keepdim=True)).float()
        return rows

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Targets of the given rows, with no host sync when ``index`` is on ``self.device``
        (philox or materialised).

        Args:
            index: Tensor[k] int64 target indices in ``[0, n)`` (checked when on the CPU).

        Returns:
            Tensor[k, d] float32 on ``self.device``.
        """
        if index.device.type == "cpu" and index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n):
            raise ValueError(f"index should lie in [0, {self.n}), got range "
                             f"[{int(index.min())}, {int(index.max())}]")
        index = index.to(self.device)
        if self.matrix is not None:
            return self.matrix.index_select(0, index)
        return self._generate(index).to(self.device)

    def chunk_rows(self, chunk_elems: int = CHUNK_ELEMS) -> int:
        """Rows per chunk of :meth:`chunks`: ``chunk_elems // d`` (at least 1). The float64 work
        space of one chunk's generation is about 12 x 8 x ``chunk_elems`` bytes (400 MB at the default)."""
        return max(1, chunk_elems // self.d)

    def chunks(self, index: torch.Tensor | None = None, dtype: torch.dtype | None = None,
               chunk_elems: int = CHUNK_ELEMS) -> Iterator[tuple[int, torch.Tensor]]:
        """The rows of ``index`` (default: every target, ``0 .. n-1``), generated chunk by chunk.

        Each row is a pure function of ``(seed, index)``, so the chunks are bit for bit the rows
        :meth:`rows` gives and the materialised matrix holds (tested), whatever the chunk size;
        at no time does more than one chunk (and its generation work space) exist. This is how
        every pass over all ``n`` targets runs with ``--targets-from-seed``: no ``n x d`` table.

        Args:
            index: Tensor[k] int64 target indices, or None for all ``n`` in order.
            dtype: the chunks' dtype (default float32, the rows' own).
            chunk_elems: rows per chunk times ``d`` (see :meth:`chunk_rows`).

        Yields:
            (offset into ``index``, Tensor[c, d] on ``self.device``) for consecutive chunks.
        """
        step = self.chunk_rows(chunk_elems)
        total = self.n if index is None else index.numel()
        where = self.device if self.generator == "philox" else torch.device("cpu")
        for lo in range(0, total, step):
            hi = min(lo + step, total)
            idx = torch.arange(lo, hi, device=where) if index is None else index[lo:hi]
            if self.matrix is not None:
                rows = self.matrix.index_select(0, idx.to(self.device))
            else:
                rows = self._generate(idx.to(where)).to(self.device)
            yield lo, (rows if dtype is None else rows.to(dtype))

    def full(self, dtype: torch.dtype = torch.float32, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
        """Every target as one Tensor[n, d] of ``dtype`` on ``self.device``, filled chunk by chunk
        (peak: the table plus one chunk's work space). Only the dataset-wide solve needs it
        (``assign_full`` takes dense targets), on the solving rank only."""
        if self.matrix is not None and dtype == self.matrix.dtype:
            return self.matrix
        out = torch.empty(self.n, self.d, dtype=dtype, device=self.device)
        for lo, rows in self.chunks(dtype=dtype, chunk_elems=chunk_elems):
            out[lo:lo + rows.shape[0]] = rows
        return out

    def state_dict(self) -> dict:
        """Plain description (no matrix): the seed, generator and set regenerate everything."""
        return {"n": self.n, "d": self.d, "seed": self.seed, "generator": self.generator, "kind": self.kind,
                "num_prototypes": self.num_prototypes, "spread": self.spread}
