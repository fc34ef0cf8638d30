"""Native CPU integer GEMM behind ``nasq.kernels.int_linear.packed_linear_apply`` (C++ called through the XLA FFI).

One call computes, for one segment of a packed linear layer (all rows at one bit width ``b``)::

    acc[m, n] = sum_k xq[m, k] * code[n, k]                     int8 x (b-bit codes) -> int32, exact
    y[m, n]   = float(acc[m, n]) * sx[m] * row_scale[n] + bias[n]                     (fused fp32 epilogue)

reading the weights in their packed layout (``nasq.quant.packing``: each row a little-endian bitstream of
``b``-bit two's complement codes, binary ``+1 -> 1, -1 -> 0``) and unpacking small tiles in the kernel; the
int8 weight matrix is never materialised. A mixed-width layer (several segments) runs in one call,
``int_linear_segments``: the activations are copied once and one thread split covers every segment.
:func:`linear` is what the models run: a whole linear in one call, fp32 in (quantized per token inside) and
fp32 out in the layer's row order (zeros at pruned rows), from packed rows or from resident panels:
``prepack_segments`` keeps a layer's weights unpacked once in the kernel's own panel layout (``unpack="panels"``
of ``nasq.kernels.int_bert``). :func:`attention` is the integer model's fp32 attention core (scores, softmax,
context) with the (batch, head) pairs spread over the threads: XLA CPU runs the batched dots of attention on one
thread. The C++ source (``nasq_kernels.cc``, next to this file)
documents the layout, the offset trick that makes the weights unsigned (``u = code + o``, ``acc = x.u - o * sum(x)``), the
blocking and the four instruction-set paths: ``avx512-vnni``, ``avx-vnni`` (AVX2-class cores with the VEX
``vpdpbusd``), ``avx2`` and ``scalar``, chosen at run time.
The int32 accumulators equal XLA's int8 ``dot_general`` (and numpy's int64 product) exactly; the fp32 epilogue
rounds like XLA's (``int_linear``).

Choosing the kernel (one mechanism): ``packed_linear_apply(..., kernel=...)`` with ``kernel`` one of
``"auto"`` (native when :func:`available`, else XLA), ``"native"`` (error if unavailable), ``"xla"``; the
default ``None`` reads the environment variable ``NASQ_KERNEL`` (same values, default ``"auto"``). The choice
is made when a function is traced, so a jitted function keeps the kernel it was compiled with.
``NASQ_NATIVE_ISA`` (``auto``/``avx512-vnni``/``avx-vnni``/``avx2``/``scalar``) forces an instruction set, and
``NASQ_NUM_THREADS`` (or :func:`set_num_threads`) the thread count (default: the CPUs this process may use).
Inside a jitted computation a call's tasks run on XLA's own intra-op thread pool (the FFI's ``ThreadPool``
context), so the kernel does not compete with XLA's threads for the cores; ``NASQ_XLA_POOL=0`` (or
:func:`set_xla_pool`) uses the kernel's own threads there too. Outside XLA (the ctypes C ABI) the kernel's
own pool runs.

Building: ``pip install -e .`` compiles the library (``setup.py``, an optional extension: without a compiler
the install still succeeds and everything runs on XLA). :func:`describe` says which path runs and why.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nasq.errors import NasqError
from nasq.quant.packing import packed_row_bytes

__all__ = [
    "ISAS",
    "KERNELS",
    "Library",
    "attention",
    "available",
    "describe",
    "int_gemm",
    "int_linear",
    "int_linear_segments",
    "library",
    "linear",
    "num_threads",
    "prepack_segments",
    "resolve_kernel",
    "resolved_isa",
    "set_num_threads",
    "set_xla_pool",
    "xla_pool",
]

KERNELS = ("auto", "native", "xla")
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512-vnni": 3, "avx-vnni": 4}  # codes of the C++ `Isa` enum
_ISA_NAMES = {code: name for name, code in ISAS.items()}
_SIMD_ISAS = ("avx2", "avx512-vnni", "avx-vnni")  # "auto" uses native only with one of these (scalar is slower than XLA)
ABI_VERSION = 6  # nasq::kAbiVersion
LIBRARY_STEM = "_nasq_kernels"  # setup.py builds nasq/kernels/native/_nasq_kernels*.so
_TARGET_S32 = "nasq_int_gemm_s32"
_TARGET_F32 = "nasq_int_gemm_f32"
_TARGET_SEGMENTS = "nasq_int_linear_segments_f32"
_TARGET_LINEAR = "nasq_linear_f32"
_TARGET_ATTENTION = "nasq_attention_f32"


def _ptr(a):
    """Address of a C-contiguous numpy array (or NULL for None) for a ``void*`` argument."""
    return None if a is None else ctypes.c_void_p(a.ctypes.data)


def _check_packed(shape, k: int, bits: int) -> None:
    """``shape`` must be ``[rows, packed_row_bytes(k, bits)]`` (packed b-bit weight rows)."""
    if len(shape) != 2 or shape[1] != packed_row_bytes(k, bits):
        raise NasqError(f"packed weights {tuple(shape)} do not hold {k} {bits}-bit codes per row")


def _epilogue_args(sx, row_scale, bias, m: int, n: int):
    """fp32 C-contiguous ``(sx [m], row_scale [n], bias [n] or None)`` for the fused output (``sx`` given), or
    the inputs as given (None) for the int32 output; shapes checked."""
    def f32(a):
        return None if a is None else np.ascontiguousarray(a, np.float32).reshape(-1)

    sx, row_scale, bias = f32(sx), f32(row_scale), f32(bias)
    if sx is not None and (sx.shape != (m,) or row_scale is None or row_scale.shape != (n,)
                           or bias is not None and bias.shape != (n,)):
        raise NasqError(f"sx must be [{m}], row_scale and bias [{n}]")
    return sx, row_scale, bias


def _check_attention_shapes(q, k, v, key_bias) -> None:
    if len(q) != 4 or k != q or v != q or tuple(key_bias) != tuple(q[:2]):
        raise NasqError(f"attention wants q, k, v [B, S, H, D] of one shape and key_bias [B, S]; got q {q}, k {k}, "
                        f"v {v}, key_bias {key_bias}")


class Library:
    """ctypes view of one built ``nasq_kernels`` shared library (the FFI handlers and the C ABI)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.cdll = ctypes.cdll.LoadLibrary(str(self.path))
        c = self.cdll
        c.nasq_abi_version.restype = ctypes.c_int
        version = c.nasq_abi_version()
        if version != ABI_VERSION:
            raise OSError(f"{self.path.name} has ABI version {version}, nasq expects {ABI_VERSION}: rebuild it")
        for name in ("nasq_best_isa", "nasq_num_threads"):
            getattr(c, name).restype = ctypes.c_int
        c.nasq_isa_supported.argtypes = [ctypes.c_int]
        c.nasq_isa_supported.restype = ctypes.c_int
        c.nasq_set_num_threads.argtypes = [ctypes.c_int]
        c.nasq_set_num_threads.restype = None
        c.nasq_xla_pool.restype = ctypes.c_int
        c.nasq_set_xla_pool.argtypes = [ctypes.c_int]
        c.nasq_set_xla_pool.restype = None
        c.nasq_error_message.argtypes = [ctypes.c_int]
        c.nasq_error_message.restype = ctypes.c_char_p
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        c.nasq_int_gemm.argtypes = [p, p, i64, i64, i64, ctypes.c_int, ctypes.c_int, p, p, p, p, p]
        c.nasq_int_gemm.restype = ctypes.c_int
        c.nasq_int_gemm_segments.argtypes = [p, i64, i64, ctypes.c_int, p, p, p, ctypes.c_int, ctypes.c_int, p, p,
                                             p, p, p]
        c.nasq_int_gemm_segments.restype = ctypes.c_int
        c.nasq_panel_bytes.argtypes = [i64, i64, ctypes.c_int, ctypes.c_int]
        c.nasq_panel_bytes.restype = i64
        c.nasq_prepack.argtypes = [p, i64, i64, ctypes.c_int, ctypes.c_int, p]
        c.nasq_prepack.restype = ctypes.c_int
        c.nasq_attention_f32.argtypes = [p, p, p, p, i64, i64, i64, i64, p, ctypes.c_int]
        c.nasq_attention_f32.restype = ctypes.c_int
        self.has_ffi = hasattr(c, "NasqIntGemmS32")  # a -DNASQ_NO_FFI test build has only the C ABI

    def best_isa(self) -> str:
        return _ISA_NAMES[self.cdll.nasq_best_isa()]

    def isa_supported(self, isa: str) -> bool:
        return isa == "auto" or bool(self.cdll.nasq_isa_supported(_isa_code(isa)))

    def num_threads(self) -> int:
        return int(self.cdll.nasq_num_threads())

    def set_num_threads(self, n: int) -> None:
        self.cdll.nasq_set_num_threads(int(n))

    def xla_pool(self) -> bool:
        return bool(self.cdll.nasq_xla_pool())

    def set_xla_pool(self, on: bool) -> None:
        self.cdll.nasq_set_xla_pool(int(bool(on)))

    def gemm(self, xq, w, bits: int, *, isa: str = "auto", sx=None, row_scale=None, bias=None) -> np.ndarray:
        """The kernel on numpy arrays (no JAX): int32 ``[M, N]``, or the fused fp32 output when ``sx`` and
        ``row_scale`` are given. For tests and for libraries built without the FFI."""
        x = np.ascontiguousarray(xq, np.int8)
        w = np.ascontiguousarray(w, np.uint8)
        m, k = x.shape
        n = w.shape[0]
        _check_packed(w.shape, k, bits)
        fused = sx is not None
        out = np.empty((m, n), np.float32 if fused else np.int32)
        sx, row_scale, bias = _epilogue_args(sx, row_scale, bias, m, n)
        code = self.cdll.nasq_int_gemm(_ptr(x), _ptr(w), m, n, k, int(bits), _isa_code(isa),
                                       None if fused else _ptr(out), _ptr(out) if fused else None,
                                       _ptr(sx), _ptr(row_scale), _ptr(bias))
        if code:
            raise NasqError(f"native int GEMM failed: {self.cdll.nasq_error_message(code).decode()}")
        return out


    def attention(self, q, k, v, key_bias, *, isa: str = "auto") -> np.ndarray:
        """The attention core on numpy arrays (no JAX): fp32 ``q, k, v [B, S, H, D]``, ``key_bias [B, S]`` ->
        ``[B, S, H, D]`` (:func:`attention`)."""
        q, k, v = (np.ascontiguousarray(a, np.float32) for a in (q, k, v))
        kb = np.ascontiguousarray(key_bias, np.float32)
        _check_attention_shapes(q.shape, k.shape, v.shape, kb.shape)
        out = np.empty(q.shape, np.float32)
        code = self.cdll.nasq_attention_f32(_ptr(q), _ptr(k), _ptr(v), _ptr(kb), *q.shape, _ptr(out),
                                            _isa_code(isa))
        if code:
            raise NasqError(f"native attention failed: {self.cdll.nasq_error_message(code).decode()}")
        return out

    def prepack(self, w, bits: int, k: int, *, isa: str = "auto") -> np.ndarray:
        """Resident panels of packed weights ``uint8 [N, ceil(k*bits/8)]`` for one ISA: the weights unpacked once
        into the layout the kernel reads (flat uint8; C++ ``prepack``)."""
        w = np.ascontiguousarray(w, np.uint8)
        _check_packed(w.shape, k, bits)
        size = self.panel_bytes(w.shape[0], k, bits, isa=isa)
        out = np.empty(size, np.uint8)
        code = self.cdll.nasq_prepack(_ptr(w), w.shape[0], k, int(bits), _isa_code(isa), _ptr(out))
        if code:
            raise NasqError(f"native prepack failed: {self.cdll.nasq_error_message(code).decode()}")
        return out

    def panel_bytes(self, n: int, k: int, bits: int, *, isa: str = "auto") -> int:
        size = int(self.cdll.nasq_panel_bytes(int(n), int(k), int(bits), _isa_code(isa)))
        if size < 0:
            raise NasqError(f"no resident panels for {bits}-bit weights on ISA {isa!r} (invalid or unsupported)")
        return size

    def check_panels(self, size: int, rows: int, k: int, bits: int, isa: str) -> None:
        """A resident-panels buffer of ``size`` bytes must hold exactly ``rows`` rows of ``k`` ``bits``-bit codes."""
        if size != self.panel_bytes(rows, k, bits, isa=isa):
            raise NasqError(f"resident panels of {size} bytes do not hold {rows} rows of {k} {bits}-bit codes")

    def gemm_segments(self, xq, segments, *, isa: str = "auto", sx=None, row_scale=None, bias=None,
                      rows=None) -> np.ndarray:
        """A whole layer in one call: ``segments`` ``((bits, packed uint8 [R_s, bytes]), ...)``; the outputs of
        all segments side by side, int32 ``[M, sum R_s]``, or fused fp32 when ``sx`` and ``row_scale`` are given
        (as :meth:`gemm`). With ``rows`` (``R_s`` per segment) the buffers are resident panels (:meth:`prepack`,
        same ``isa``)."""
        x = np.ascontiguousarray(xq, np.int8)
        m, k = x.shape
        ws = [np.ascontiguousarray(w, np.uint8) for _, w in segments]
        bits = [int(b) for b, _ in segments]
        resident = rows is not None
        if resident:
            rows = [int(r) for r in rows]
            for b, w, r in zip(bits, ws, rows, strict=True):
                self.check_panels(w.size, r, k, b, isa)
        else:
            for b, w in zip(bits, ws, strict=True):
                _check_packed(w.shape, k, b)
            rows = [w.shape[0] for w in ws]
        width = sum(rows)
        fused = sx is not None
        out = np.empty((m, width), np.float32 if fused else np.int32)
        sx, row_scale, bias = _epilogue_args(sx, row_scale, bias, m, width)
        ptrs = (ctypes.c_void_p * max(len(ws), 1))(*[w.ctypes.data for w in ws])
        rows_arr = np.array(rows or [0], np.int64)
        bits_arr = (ctypes.c_int * max(len(bits), 1))(*bits)
        code = self.cdll.nasq_int_gemm_segments(
            _ptr(x), m, k, len(ws), ptrs, _ptr(rows_arr), bits_arr, _isa_code(isa), int(resident),
            None if fused else _ptr(out), _ptr(out) if fused else None, _ptr(sx), _ptr(row_scale), _ptr(bias))
        if code:
            raise NasqError(f"native int GEMM failed: {self.cdll.nasq_error_message(code).decode()}")
        return out


def library_path() -> Path | None:
    """The built library in this package's directory, or None."""
    here = Path(__file__).resolve().parent
    found = sorted(p for p in here.glob(f"{LIBRARY_STEM}*") if p.suffix in (".so", ".pyd", ".dylib"))
    return found[0] if found else None


def xla_pool() -> bool:
    """Whether the native calls inside a jitted computation run their tasks on XLA's intra-op thread pool (the
    default) rather than on the kernel's own threads, which then compete with XLA's for the cores."""
    return library().xla_pool()


def set_xla_pool(on: bool) -> None:
    """Run the native calls' tasks on XLA's thread pool (``True``, the default; ``NASQ_XLA_POOL=0`` starts with
    ``False``) or on the kernel's own pool (process wide; the next call)."""
    library().set_xla_pool(on)


@functools.cache
def _load() -> tuple[Library | None, str]:
    path = library_path()
    if path is None:
        return None, (f"native library not built: no {LIBRARY_STEM}*.so in {Path(__file__).parent}; "
                      "reinstall with a C++17 compiler (pip install -e .)")
    try:
        return Library(path), ""
    except (OSError, AttributeError) as e:
        return None, f"native library {path.name} failed to load: {e}"


def library() -> Library:
    """The loaded library, else ``NasqError`` saying why not."""
    lib, why = _load()
    if lib is None:
        raise NasqError(why)
    return lib


def _blocker(explicit: bool = False) -> str:
    """Why the native kernel cannot run here ('' if it can). ``explicit`` (``kernel="native"``) also accepts a
    CPU with only the scalar path; ``"auto"`` wants a SIMD path (the scalar one is slower than XLA)."""
    lib, why = _load()
    if lib is None:
        return why
    if not lib.has_ffi:
        return f"{lib.path.name} was built without the XLA FFI handlers"
    if jax.default_backend() != "cpu":
        return f"JAX's default backend is {jax.default_backend()}, the native kernel is CPU only"
    if not explicit and lib.best_isa() not in _SIMD_ISAS:
        return "this CPU has neither AVX2+BMI2+FMA nor AVX512-VNNI (the scalar path runs only on request)"
    return ""


def available() -> bool:
    """True when ``kernel="auto"`` uses the native kernel: library built and loadable, a SIMD path for this
    CPU, JAX on CPU."""
    return not _blocker()


def _kernel_name(kernel: str | None) -> str:
    name = os.environ.get("NASQ_KERNEL", "auto") if kernel is None else kernel
    if name not in KERNELS:
        raise NasqError(f"kernel {name!r} (argument or NASQ_KERNEL); use one of {', '.join(KERNELS)}")
    return name


def resolve_kernel(kernel: str | None = None) -> str:
    """``"native"`` or ``"xla"``: the path ``kernel`` (None: ``NASQ_KERNEL``, default ``"auto"``) takes here.
    ``"native"`` raises ``NasqError`` when the native kernel cannot run."""
    name = _kernel_name(kernel)
    if name == "auto":
        return "native" if available() else "xla"
    if name == "native" and (why := _blocker(explicit=True)):
        raise NasqError(f"kernel='native' but {why}")
    return name


def describe(kernel: str | None = None) -> str:
    """One line: which path ``kernel`` (default: ``NASQ_KERNEL``) takes, e.g. ``"native avx2, 2 threads"`` or
    ``"xla (native library not built: ...)"``."""
    name = _kernel_name(kernel)
    if name == "xla":
        return "xla (chosen: kernel='xla' / NASQ_KERNEL=xla)"
    why = _blocker(explicit=name == "native")
    if why:
        return f"xla ({why})" if name == "auto" else f"native requested but unavailable: {why}"
    isa = _isa_name(None)
    return f"native {library().best_isa() if isa == 'auto' else isa}, {num_threads()} threads"


def _isa_code(isa: str) -> int:
    if isa not in ISAS:
        raise NasqError(f"ISA {isa!r} (argument or NASQ_NATIVE_ISA); use one of {', '.join(ISAS)}")
    return ISAS[isa]


def _isa_name(isa: str | None) -> str:
    return os.environ.get("NASQ_NATIVE_ISA", "auto") if isa is None else isa


def num_threads() -> int:
    """Threads the native kernel uses (``NASQ_NUM_THREADS`` or the CPUs this process may run on)."""
    return library().num_threads()


def set_num_threads(n: int) -> None:
    """Set the native kernel's thread count (process wide; takes effect on the next call)."""
    if int(n) < 1:
        raise NasqError(f"thread count must be >= 1, got {n}")
    library().set_num_threads(int(n))


@functools.cache
def _register() -> None:
    lib = library()
    if not lib.has_ffi:
        raise NasqError(f"{lib.path.name} was built without the XLA FFI handlers")
    jax.ffi.register_ffi_target(_TARGET_S32, jax.ffi.pycapsule(lib.cdll.NasqIntGemmS32), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_F32, jax.ffi.pycapsule(lib.cdll.NasqIntGemmF32), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_SEGMENTS, jax.ffi.pycapsule(lib.cdll.NasqIntLinearSegmentsF32),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_LINEAR, jax.ffi.pycapsule(lib.cdll.NasqLinearF32), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_ATTENTION, jax.ffi.pycapsule(lib.cdll.NasqAttentionF32), platform="cpu")


def _supported_isa_code(isa: str | None) -> int:
    """The C++ code of ``isa`` (None: ``NASQ_NATIVE_ISA``); a clear error if this CPU lacks that path."""
    name = _isa_name(isa)
    if not library().isa_supported(name):
        raise NasqError(f"this CPU does not support the {name} path of the native kernel")
    return _isa_code(name)


def _packed_segments(segments, k: int) -> tuple[list, list[int], list[int]]:
    """``(buffers, bits, rows)`` of packed segments ``((bits, uint8 [R_s, ceil(k*bits/8)]), ...)``, each checked."""
    ws, bits = [], []
    for b, w in segments:
        w = jnp.asarray(w)
        if w.dtype != jnp.uint8 or w.ndim != 2 or w.shape[1] != packed_row_bytes(k, b):
            raise NasqError(f"segment of {b}-bit rows: want uint8 [R, {packed_row_bytes(k, b)}], got {w.dtype} "
                            f"{w.shape}")
        ws.append(w)
        bits.append(int(b))
    return ws, bits, [w.shape[0] for w in ws]


def _prepare(xq, w, bits: int, isa: str | None):
    """Checks, registration, the ISA code; returns ``(x2 [M, K], w, lead dims, isa code)``."""
    _register()
    code = _supported_isa_code(isa)
    xq = jnp.asarray(xq)
    w = jnp.asarray(w)
    if xq.dtype != jnp.int8 or w.dtype != jnp.uint8 or w.ndim != 2:
        raise NasqError(f"native int GEMM wants int8 [..., K] and uint8 [N, bytes]; got {xq.dtype} {xq.shape}, "
                        f"{w.dtype} {w.shape}")
    k = xq.shape[-1]
    if w.shape[1] != packed_row_bytes(k, bits):
        raise NasqError(f"packed rows have {w.shape[1]} bytes but {k} {bits}-bit codes need "
                        f"{packed_row_bytes(k, bits)}")
    return xq.reshape(-1, k), w, xq.shape[:-1], code


def int_gemm(xq, w, bits: int, *, isa: str | None = None):
    """``int8 [..., K] x packed uint8 [N, ceil(K*bits/8)] -> int32 [..., N]`` (exact), under jit or not.

    ``isa``: ``"auto"``, ``"avx512-vnni"``, ``"avx-vnni"``, ``"avx2"`` or ``"scalar"``; None reads ``NASQ_NATIVE_ISA``."""
    x2, w, lead, code = _prepare(xq, w, bits, isa)
    out = jax.ffi.ffi_call(_TARGET_S32, jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), jnp.int32),
                           vmap_method="sequential")(x2, w, bits=np.int64(bits), isa=np.int64(code))
    return out.reshape(*lead, w.shape[0])


def int_linear(xq, sx, w, bits: int, row_scale, bias=None, *, isa: str | None = None):
    """Fused ``float(int_gemm(xq, w)) * sx * row_scale (+ bias)``: fp32 ``[..., N]``.

    ``sx``: fp32 ``[...]`` or ``[..., 1]`` (one scale per token, ``quantize_act_int8``); ``row_scale``,
    ``bias``: fp32 ``[N]``. Rounds like XLA's CPU code for the same expression: ``t = acc * sx``, then
    ``fma(t, row_scale, bias)`` (``t * row_scale`` without bias), so both paths agree bit for bit where XLA
    contracts the multiply-add as it does on x86-64 with FMA."""
    x2, w, lead, code = _prepare(xq, w, bits, isa)
    n = w.shape[0]
    sx = jnp.asarray(sx, jnp.float32).reshape(-1)
    bias = jnp.zeros((0,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    out = jax.ffi.ffi_call(_TARGET_F32, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                           vmap_method="sequential")(
        x2, sx, w, jnp.asarray(row_scale, jnp.float32), bias, bits=np.int64(bits), isa=np.int64(code))
    return out.reshape(*lead, n)


def int_linear_segments(xq, sx, segments, row_scale, bias=None, *, isa: str | None = None):
    """A whole mixed-width layer in one native call: ``int_linear`` of every segment, side by side.

    ``segments``: ``((bits, packed uint8 [R_s, ceil(K*bits/8)]), ...)`` (``PackedLinear.segments``);
    ``row_scale``, ``bias``: fp32 ``[sum R_s]`` in segment order. Returns fp32 ``[..., sum R_s]``, bit for bit
    the concatenation of ``int_linear`` per segment, but x is copied once and one thread split covers all
    segments (a per-segment loop cost 1.1-1.7x a single-width layer: experiments/results/profile_int_forward.md).
    """
    if not segments:
        raise NasqError("int_linear_segments needs at least one segment")
    x2, _, lead, code = _prepare(xq, segments[0][1], segments[0][0], isa)
    ws, bits, rows = _packed_segments(segments, x2.shape[1])
    width = sum(rows)
    sx = jnp.asarray(sx, jnp.float32).reshape(-1)
    bias = jnp.zeros((0,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    out = jax.ffi.ffi_call(_TARGET_SEGMENTS, jax.ShapeDtypeStruct((x2.shape[0], width), jnp.float32),
                           vmap_method="sequential")(
        x2, sx, jnp.asarray(row_scale, jnp.float32), bias, *ws, bits=np.asarray(bits, np.int64),
        rows=np.asarray(rows, np.int64), isa=np.int64(code), resident=np.int64(0))
    return out.reshape(*lead, width)


def resolved_isa(isa: str | None = None) -> str:
    """The concrete ISA a call with ``isa`` (None: ``NASQ_NATIVE_ISA``) runs: ``auto`` resolved to the best."""
    name = _isa_name(isa)
    return library().best_isa() if name == "auto" else name


def prepack_segments(segments, k: int, isa: str | None = None) -> tuple[str, tuple]:
    """``(isa, ((bits, rows, panels uint8 [bytes]), ...))``: a layer's segments unpacked once (numpy, at load
    time) into resident panels for ``isa`` (None: ``NASQ_NATIVE_ISA`` / the best this CPU has)."""
    name = resolved_isa(isa)
    _supported_isa_code(name)  # a clear error if this CPU lacks it
    lib = library()
    return name, tuple((int(b), int(np.shape(w)[0]), lib.prepack(np.asarray(w), int(b), k, isa=name))
                       for b, w in segments)


def linear(x, segments, row_scale, bias, out_index, out_features: int, *, panels_isa: str | None = None,
           isa: str | None = None):
    """A whole integer linear in one native call: fp32 ``x [..., K]`` -> fp32 ``[..., out_features]``.

    Bit for bit ``scatter_rows(int_linear_segments(*quantize_act_int8(x), segments, row_scale, bias),
    out_index, out_features)``, with no XLA operation around the call: the kernel quantizes each token
    (``scale = absmax * float32(1 / 127)``, codes ``clip(round(x / scale), -127, 127)``; finite inputs), runs every segment
    and writes each kept row's outputs to its column ``out_index`` (0 at pruned rows).

    ``segments``: packed ``((bits, uint8 [R_s, ceil(K*bits/8)]), ...)``; or, with ``panels_isa`` (a concrete
    ISA), resident panels ``((bits, rows, uint8 [bytes]), ...)`` from :func:`prepack_segments` for it.
    ``row_scale``, ``bias`` (or None), ``out_index`` (int ``[R]``): per kept row, in segment order.
    """
    if not segments:
        raise NasqError("native linear needs at least one segment (a layer with every row pruned is all zeros)")
    _register()
    x = jnp.asarray(x, jnp.float32)
    k = x.shape[-1]
    resident = panels_isa is not None
    if resident:
        if panels_isa == "auto":
            raise NasqError("resident panels are laid out for one ISA: pass the concrete ISA prepack_segments "
                            "returned")
        code = _isa_code(panels_isa)
        bits, rows, ws = [int(b) for b, _, _ in segments], [int(r) for _, r, _ in segments], []
        for b, r, (_, _, w) in zip(bits, rows, segments, strict=True):
            w = jnp.asarray(w)
            if w.dtype != jnp.uint8:
                raise NasqError(f"resident panels must be uint8, got {w.dtype}")
            library().check_panels(w.size, r, k, b, panels_isa)
            ws.append(w)
    else:
        code = _supported_isa_code(isa)
        ws, bits, rows = _packed_segments(segments, k)
    width = sum(rows)
    out_index = jnp.asarray(out_index, jnp.int32)
    if out_index.shape != (width,) or width > out_features:
        raise NasqError(f"out_index has shape {out_index.shape}; want ({width},) columns of {out_features}")
    bias = jnp.zeros((0,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    x2 = x.reshape(-1, k)
    out = jax.ffi.ffi_call(_TARGET_LINEAR, jax.ShapeDtypeStruct((x2.shape[0], out_features), jnp.float32),
                           vmap_method="sequential")(
        x2, jnp.asarray(row_scale, jnp.float32), bias, out_index, *ws, bits=np.asarray(bits, np.int64),
        rows=np.asarray(rows, np.int64), isa=np.int64(code), resident=np.int64(int(resident)))
    return out.reshape(*x.shape[:-1], out_features)


def attention(q, k, v, key_bias, *, isa: str | None = None):
    """The fp32 attention core in one native call: ``q, k, v [B, S, H, D]``, ``key_bias [B, S]`` (added to every
    query's scores: 0, or a large negative number at padded keys) -> ``[B, S, H, D]``::

        out[b, i, h] = sum_j p_ij v[b, j, h],   p_i = softmax_j(q[b, i, h] . k[b, j, h] / sqrt(D) + key_bias[b, j])

    ``jnp.einsum("bhqk,bkhd->bqhd", softmax(einsum("bqhd,bkhd->bhqk", q, k) / sqrt(D) + bias), v)`` up to fp32
    rounding (sums in another order, a polynomial ``exp``): not bit for bit. The (batch, head) pairs run on the
    threads (XLA's pool inside jit), where XLA CPU runs these batched dots on one thread.
    """
    _register()
    code = _supported_isa_code(isa)
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    key_bias = jnp.asarray(key_bias, jnp.float32)
    _check_attention_shapes(q.shape, k.shape, v.shape, key_bias.shape)
    return jax.ffi.ffi_call(_TARGET_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(
        q, k, v, key_bias, isa=np.int64(code))
