"""Build of the optional native kernel library (everything else is in pyproject.toml).

``pip install -e .`` (and ``pip wheel .``) compile ``nasq/kernels/native/nasq_kernels.cc`` into
``nasq/kernels/native/_nasq_kernels*.so``, a plain shared library that ``nasq.kernels.native`` loads with ctypes
(it is not a Python extension module: it has no ``PyInit`` and is never imported). It needs only a C++17
compiler: the XLA FFI headers are vendored under ``nasq/kernels/native/include``. The extension is optional: if
the compiler is missing or fails, the install still succeeds (with a warning) and nasq runs its XLA kernels.
Rebuild in place after editing the C++: ``python setup.py build_ext --inplace``.
"""

import sys

from setuptools import Extension, setup

NATIVE = "nasq/kernels/native"

INCLUDE = f"{NATIVE}/include"  # the vendored XLA FFI headers

if sys.platform == "win32":  # MSVC
    compile_args, link_args = ["/std:c++17", "/O2", "/fp:precise", f"/I{INCLUDE}"], []
else:
    # -ffp-contract=off: the epilogue rounds exactly as written (its one FMA is explicit, like XLA's);
    # -pthread: the kernel's thread pool; -isystem: no warnings from the vendored headers.
    compile_args = ["-std=c++17", "-O3", "-ffp-contract=off", "-pthread", "-isystem", INCLUDE]
    link_args = ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "nasq.kernels.native._nasq_kernels",
            sources=[f"{NATIVE}/nasq_kernels.cc"],
            depends=[f"{INCLUDE}/xla/ffi/api/{h}" for h in ("api.h", "c_api.h", "ffi.h")],
            language="c++",
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)
