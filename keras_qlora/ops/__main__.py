"""`python -m keras_qlora.ops [--info | --build]`: which NF4 matmul runs.

--info (default) prints the active path (fused C++ op or pure TensorFlow)
and why; --build compiles the op library into the cache now and prints the
compiler's error if that fails.
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
    from keras_qlora.ops import _library

    if args.build:
        try:
            path = _library._find_or_build()
        except Exception as err:
            print(f"build failed: {err}", file=sys.stderr)
            return 1
        print(f"built: {path}")
    name, reason = ops.active_path()
    print(f"active path: {name}")
    print(f"reason:      {reason}")
    try:
        print(f"sources:     {_library.source_dir()}")
        print(f"cache:       {_library.cache_dir()}")
    except FileNotFoundError as err:
        print(f"sources:     missing ({err})")
    return 0 if name == "fused" or not args.build else 1


if __name__ == "__main__":
    sys.exit(main())
