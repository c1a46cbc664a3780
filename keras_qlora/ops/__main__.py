"""`python -m keras_qlora.ops [--info | --build]`: which NF4 matmul runs.

--info (default) prints the active path (fused C++ op or pure TensorFlow)
and why, whether the op library has CUDA kernels (built with nvcc, or CPU
kernels only and why), and the GPUs TensorFlow sees; --build compiles the
op library into the cache now and prints the compiler's error if that
fails.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_qlora.ops")
    parser.add_argument("--info", action="store_true", help="show the path")
    parser.add_argument(
        "--build", action="store_true", help="build the op library now"
    )
    args = parser.parse_args(argv)

    from keras_qlora import ops
    from keras_qlora.ops import build
    from keras_qlora.ops import loader

    if args.build:
        try:
            path = build.find_or_build()
        except Exception as err:
            print(f"build failed: {err}", file=sys.stderr)
            return 1
        print(f"built: {path}")
    try:
        name, reason = ops.active_path()
    except ValueError as err:  # a bad setting (KERAS_QLORA_CPU_ISA)
        name, reason = "none", str(err)
    print(f"active path: {name}")
    print(f"reason:      {reason}")
    print(f"cuda kernels: {loader.cuda_status()}")
    print(f"gpus:        {_visible_gpus()}")
    try:
        print(f"sources:     {build.source_dir()}")
        print(f"cache:       {build.cache_dir()}")
    except FileNotFoundError as err:
        print(f"sources:     missing ({err})")
    return 0 if name == "fused" or not args.build else 1


def _visible_gpus() -> str:
    """The GPUs TensorFlow sees (the CUDA kernels run only on those)."""
    try:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    except Exception as err:  # report, never fail --info
        return f"unknown ({type(err).__name__}: {err})"
    if not gpus:
        return "none visible to TensorFlow"
    return ", ".join(gpu.name for gpu in gpus)


if __name__ == "__main__":
    sys.exit(main())
