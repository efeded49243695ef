"""Builds the pybind11 search extension; all other metadata lives in setup.cfg."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

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
