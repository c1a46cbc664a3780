"""Build script; metadata lives in setup.cfg.

`build_py` also ships the C++ / CUDA sources of the fused op inside the
package (`keras_qlora/_custom_ops`; without `custom_ops/testing/`, the CPU
stand-ins for CUDA that only the tests and the GPU harness build) and, when
TensorFlow is importable in the build environment (e.g. `pip install
--no-build-isolation .`), compiles the op library into the package: with
its CUDA kernels when nvcc is found (set KERAS_QLORA_CUDA=0 to skip them,
KERAS_QLORA_CUDA_ARCHS to choose the GPU architectures), CPU kernels only
otherwise. Otherwise, or when it is built
for another TensorFlow or toolchain, the library is compiled on first use
into a cache (see keras_qlora/ops/build.py).
"""

import importlib.util
import pathlib
import sys

import setuptools
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildPyWithOps(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return  # the source tree is used in place
        package = pathlib.Path(self.build_lib) / "keras_qlora"
        # ops/build.py imports only the standard library: load it by path,
        # without the package (and Keras) around it.
        spec = importlib.util.spec_from_file_location(
            "_kq_build", package / "ops" / "build.py")
        library = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(library)
        library.copy_sources(ROOT / "custom_ops", package / "_custom_ops")
        if importlib.util.find_spec("tensorflow") is None:
            print("keras_qlora: TensorFlow not importable at build time; the "
                  "fused op will be compiled on first use.", file=sys.stderr)
            return
        try:
            path = library.write_prebuilt(package / "ops")
            print(f"keras_qlora: built {path} (CUDA kernels: "
                  f"{library.cuda_status()})", file=sys.stderr)
        except Exception as err:  # leave it to the first-use build
            print(f"keras_qlora: could not prebuild the fused op ({err}); "
                  "it will be compiled on first use.", file=sys.stderr)


setuptools.setup(cmdclass={"build_py": BuildPyWithOps})
