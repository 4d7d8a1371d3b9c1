"""Only the compiled fast path of the data plane (issue 14); everything else is in pyproject.toml.

A setup.py because setuptools still calls ext-modules in pyproject.toml experimental.
``pip install -e .`` (``make setup``) builds it in place, next to its source, where imports find it;
hybridft_common/fastpath.py selects it or the pure-Python reference.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hybridft_common._speedups",
            sources=["hybridft_common/_speedups.c"],
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        )
    ]
)
