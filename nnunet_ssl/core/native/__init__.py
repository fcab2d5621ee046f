"""Optional C kernels for Spade's selection on CPU, compiled on first use with the system's C compiler.

The torch matching (``correspondence.match_voxels``: candidate sampling, the window search, the choice of matches)
is ~90 small operations on tensors of a few thousand entries; on CPU their dispatch is most of its cost (about 40 %
of Spade's selection + loss in a CPU-budget step). ``match_voxels`` here does the same in one call, with the same
pairs from the same random scores (up to exact ties of the scores); ``dense_selection`` adds the dense loss's rows
and mask of negatives (``far_pairs``) in the same call, ``contrastive_masks`` the crop-level masks in one. Without
a C compiler (or with ``NNUNET_SSL_NATIVE=0``) they return None and the torch path runs: the same result, more
slowly.

The library is built once per source version, compiler and CPU into ``$NNUNET_SSL_CACHE`` (default
``~/.cache/nnunet_ssl``), written under a temporary name and renamed, so parallel processes (DDP ranks, test
workers) never load a half-written file."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("nearest.c")
# -O3: the far-pair loop vectorised; -ffp-contract=off: no fused multiply-adds, so the squared distances are torch's
# to the bit; -march=native where the compiler takes it (the library is built on, and cached per, the CPU that runs
# it: ~2x on the far-pair mask with AVX2 or AVX-512), else the portable build. NNUNET_SSL_MARCH names another
# target (e.g. haswell: an AVX2 build on an AVX-512 machine, for timings of CPUs without AVX-512)
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-std=c99")


def _arch_flags() -> Tuple[str, ...]:
    return (f"-march={os.environ.get('NNUNET_SSL_MARCH') or 'native'}",)


def cache_dir() -> Path:
    root = os.environ.get("NNUNET_SSL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nnunet_ssl")
    return Path(root)


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


# the lines of /proc/cpuinfo that say what -march=native compiles for (x86: model and flags; ARM: implementer, part,
# variant and features); the first processor's, as every core of a machine reports the same
_CPU_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")


def _cpu_signature() -> str:
    """What -march=native compiles for, so that a shared cache directory never hands one CPU another CPU's build:
    the CPU's identity and instruction-set lines (Linux), else the platform's processor string."""
    try:
        seen = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in _CPU_KEYS and key not in seen:
                    seen[key] = line.strip()
        if seen:
            return "\n".join(seen[k] for k in sorted(seen))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str, target: Path) -> None:
    """Compile SOURCE into ``target`` (written under a temporary name, then renamed): -march=native first, the
    portable flags if the compiler refuses it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own (other processes, hosts sharing the cache): os.replace publishes only a finished file
    fd, name = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        for arch in (_arch_flags(), ()):
            result = subprocess.run([cc, *FLAGS, *arch, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True,
                                    timeout=120)
            if result.returncode == 0:
                os.replace(tmp, target)
                return
        raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)
    finally:
        tmp.unlink(missing_ok=True)


_BUILD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (switched off, no compiler, or the build failed: one warning says which)."""
    with _BUILD_LOCK:  # threads of one process: one build, one load
        return _load()


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get("NNUNET_SSL_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("nnunet_ssl: no C compiler found (cc, gcc, clang or $CC): Spade's voxel matching uses the "
                      "slower torch search on CPU (same pairs); install one, or set NNUNET_SSL_NATIVE=0 to silence "
                      "this")
        return None
    signature = "\0".join((cc, *FLAGS, *_arch_flags(), platform.system(), platform.machine(), _cpu_signature()))
    key = hashlib.sha256(SOURCE.read_bytes() + signature.encode()).hexdigest()
    target = cache_dir() / f"nearest_{key[:16]}.so"
    try:
        if not target.exists():
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"nnunet_ssl: building the C kernel with {cc} failed ({type(e).__name__}: "
                      f"{detail.decode(errors='replace').strip().splitlines()[-1:] or e}): Spade's voxel matching "
                      f"uses the slower torch search on CPU (same pairs); NNUNET_SSL_NATIVE=0 silences this")
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nearest_within.restype = lib.match_voxels.restype = ctypes.c_int
    lib.nearest_within.argtypes = [ptr, i64, i64, ptr, ptr, i64, ctypes.c_double, ptr, ptr]
    lib.match_voxels.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_double, ptr, ptr, ptr, ptr]
    lib.far_pairs.restype = i64
    lib.far_pairs.argtypes = [ptr, ptr, i64, i64, ctypes.c_double, ptr]
    lib.dense_selection.restype = i64
    lib.dense_selection.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_double,
                                    ctypes.c_double, ptr, ptr, ptr]
    lib.contrastive_masks.restype = None
    lib.contrastive_masks.argtypes = [ptr, ptr, i64, i64, ctypes.c_double, ctypes.c_double, ptr, ptr]
    return lib


def nearest_within(query: Tensor, points: Tensor, ok: Tensor, tolerance: float) -> Optional[Tuple[Tensor, Tensor]]:
    """For query (B, M, 3) and points (B, V, 3) on the CPU, with ok (B, V) marking the points that count: the
    index (B, M) int64 of each query's nearest ok point and the squared distance (B, M) float32, exact whenever that
    point lies within ``tolerance``; index 0 and +inf where no ok point lies within about ``tolerance`` (farther
    results are the nearest of the cells searched). Ties: the lowest index. None where the kernel is unavailable
    (not on CPU, no compiler). The grid search of ``match_voxels`` on its own, for its exactness tests."""
    if query.device.type != "cpu" or points.device.type != "cpu" or not (tolerance >= 0 and tolerance < float("inf")):
        return None
    lib = library()
    if lib is None:
        return None
    bsz, m = query.shape[:2]
    n = points.shape[1]
    q = query.detach().to(torch.float32).contiguous()
    p = points.detach().to(torch.float32).contiguous()
    v = ok.detach().to(torch.bool).contiguous()
    idx = torch.empty((bsz, m), dtype=torch.int64)
    d2 = torch.empty((bsz, m), dtype=torch.float32)
    if bsz * m == 0:
        return idx, d2
    if lib.nearest_within(q.data_ptr(), bsz, m, p.data_ptr(), v.data_ptr(), n, float(tolerance), idx.data_ptr(),
                          d2.data_ptr()) != 0:
        raise MemoryError(f"nnunet_ssl: the C voxel matching could not allocate memory for {n} points")
    return idx, d2


def match_voxels(pa: Tensor, va: Tensor, pb: Tensor, vb: Tensor, scores: Tensor, num_candidates: int,
                 num_samples: int, tolerance: float) -> Optional[Dict[str, Tensor]]:
    """``correspondence.match_voxels`` on the CPU from its random scores (B, V) (one per voxel of view a, in [0, 1)):
    positions pa, pb (B, V, 3), validity va, vb (B, V); the ``num_candidates`` eligible voxels of view a with the
    highest scores are searched, and the ``num_samples`` matches with the highest scores fill the slots, in
    descending score order. Returns its dict ('index_a', 'index_b', 'mask', 'distance'), or None where the kernel
    is unavailable (not on CPU, no compiler)."""
    if any(t.device.type != "cpu" for t in (pa, va, pb, vb, scores)) or not 0 <= tolerance < float("inf"):
        return None
    lib = library()
    if lib is None:
        return None
    bsz, n = pa.shape[:2]
    k = int(num_samples)
    f32 = [t.detach().to(torch.float32).contiguous() for t in (pa, pb, scores)]
    flags = [t.detach().to(torch.bool).contiguous() for t in (va, vb)]
    out = {"index_a": torch.empty((bsz, k), dtype=torch.int64), "index_b": torch.empty((bsz, k), dtype=torch.int64),
           "mask": torch.empty((bsz, k), dtype=torch.bool), "distance": torch.empty((bsz, k), dtype=torch.float32)}
    if bsz * k == 0:
        return out
    if lib.match_voxels(f32[0].data_ptr(), flags[0].data_ptr(), f32[1].data_ptr(), flags[1].data_ptr(),
                        f32[2].data_ptr(), bsz, n, int(num_candidates), k, float(tolerance),
                        *(out[key].data_ptr() for key in ("index_a", "index_b", "mask", "distance"))) != 0:
        raise MemoryError(f"nnunet_ssl: the C voxel matching could not allocate memory for {n} voxels")
    return out


def far_pairs(x: Tensor, ok: Tensor, radius: float, partner: Optional[int] = None) -> Optional[Tuple[Tensor, int]]:
    """The mask of negatives ``dense_selection`` builds, on its own (for its exactness tests): keep (n, n) float32,
    1.0 where rows i and j of x (n, 3) are both ``ok`` and farther apart than ``radius`` (squared distance >
    max(radius^2, 1e-12): points within 1e-6 are coincident), else 0.0; with ``partner`` P, entry (i, (i + P) mod n)
    of every row is then set to 1.0 (the positive). Returns (keep, number of far pairs off those entries), or None
    where the kernel is unavailable."""
    if x.device.type != "cpu" or ok.device.type != "cpu" or not 0 <= radius < float("inf"):
        return None
    lib = library()
    if lib is None:
        return None
    n = x.shape[0]
    xs = x.detach().to(torch.float32).contiguous()
    flags = ok.detach().to(torch.bool).contiguous()
    keep = torch.empty((n, n), dtype=torch.float32)
    count = lib.far_pairs(xs.data_ptr(), flags.data_ptr(), n, -1 if partner is None else int(partner),
                          max(float(radius) ** 2, 1e-12), keep.data_ptr())
    if count < 0:
        raise MemoryError(f"nnunet_ssl: the C far-pair mask could not allocate memory for {n} points")
    return keep, int(count)


def contrastive_masks(coords: Tensor, group_ids: Tensor, r_pos: float, r_neg: float) -> Optional[Tuple[Tensor, Tensor]]:
    """``selection.contrastive_masks`` (without ``valid``) on the CPU in one call: (pos, neg) bool (N, N), the same
    masks (float32 distances as torch's direct cdist). None where the kernel is unavailable."""
    if coords.device.type != "cpu" or group_ids.device.type != "cpu":
        return None
    lib = library()
    if lib is None:
        return None
    c = coords.detach().to(torch.float32).contiguous()
    g = group_ids.detach().to(torch.int64).contiguous()
    n = c.shape[0]
    pos = torch.empty((n, n), dtype=torch.bool)
    neg = torch.empty((n, n), dtype=torch.bool)
    lib.contrastive_masks(c.data_ptr(), g.data_ptr(), n, c.shape[1], float(r_pos), float(r_neg), pos.data_ptr(),
                          neg.data_ptr())
    return pos, neg


def dense_selection(pos: Tensor, ok: Tensor, a: Tensor, b: Tensor, scores: Tensor, canonical_scale: Tensor,
                    canonical_offset: Tensor, num_candidates: int, num_samples: int, tolerance: float,
                    radius: float) -> Optional[Tuple[Tensor, Tensor, Tensor, int]]:
    """Everything the dense loss selects, on the CPU in one call (None off the CPU or without the kernel): the
    matching of views a[i] and b[i] of pos (N, V, 3) / ok (N, V) from scores (B, V) (``match_voxels``), and for
    its 2P rows (P = B * num_samples; the a slots, then the b slots): flat (2P,) int64 indices view * V + voxel,
    slot_ok (2P,) bool, keep (2P, 2P) float32 (``far_pairs`` of the rows' canonical positions, position * scale +
    offset, with partner P) and the number of negatives."""
    lib = library()
    if lib is None or any(t.device.type != "cpu" for t in (pos, ok, a, b, scores, canonical_scale, canonical_offset)):
        return None
    n = pos.shape[1]
    bsz, k = len(a), int(num_samples)
    f32 = [t.detach().to(torch.float32).contiguous() for t in (pos, scores, canonical_scale, canonical_offset)]
    flags = ok.detach().to(torch.bool).contiguous()
    va, vb = (t.detach().to(torch.int64).contiguous() for t in (a, b))
    flat = torch.empty(2 * bsz * k, dtype=torch.int64)
    slot_ok = torch.empty(2 * bsz * k, dtype=torch.bool)
    keep = torch.empty((2 * bsz * k, 2 * bsz * k), dtype=torch.float32)
    count = lib.dense_selection(f32[0].data_ptr(), flags.data_ptr(), n, va.data_ptr(), vb.data_ptr(), bsz,
                                f32[1].data_ptr(), f32[2].data_ptr(), f32[3].data_ptr(), int(num_candidates), k,
                                float(tolerance), max(float(radius) ** 2, 1e-12), flat.data_ptr(), slot_ok.data_ptr(),
                                keep.data_ptr())
    if count < 0:
        raise MemoryError(f"nnunet_ssl: the C dense selection could not allocate memory for {n} voxels per view")
    return flat, slot_ok, keep, int(count)
