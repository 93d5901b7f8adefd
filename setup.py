"""The one compiled part: loratools.ops._rows, merge's inner loop (loratools/ops/_rows.c). Optional: where it cannot
be built (no C compiler), the install goes on and merge runs the same arithmetic in torch."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "loratools.ops._rows",
            ["loratools/ops/_rows.c"],
            optional=True,
            extra_compile_args=["-O3", "-fno-math-errno", "-Wall", "-Wno-psabi"],
        )
    ]
)
