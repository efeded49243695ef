"""Builds the pybind11 search extension; all other metadata lives in setup.cfg."""

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# The five sources compile side by side (one per core; SPARSE_EMBED_BUILD_JOBS caps it).
ParallelCompile("SPARSE_EMBED_BUILD_JOBS").install()

ext_modules = [
    Pybind11Extension(
        "sparse_embed._search",
        [
            "search/sparse_index.cpp",
            "search/format.cpp",
            "search/build.cpp",
            "search/query_engine.cpp",
            "search/bindings.cpp",
        ],
        include_dirs=["search"],
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread"],
        # The index answers query batches on std::threads.
        extra_link_args=["-pthread"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
