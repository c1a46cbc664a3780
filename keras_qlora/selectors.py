"""Layer selectors: which layers of a model an argument names.

`apply()`'s `target_modules` / `quantize_modules` / `exclude_modules` /
`modules_to_save` and gradient checkpointing's `blocks` all take the same
selectors, matched against the `(path, layer)` pairs of `surgery.walk`:
- a list/tuple of strings: exact layer name, exact path or path suffix;
- a single string: a regular expression, full-matched against the path or
  the layer name;
- a compiled `re.Pattern` (full match on paths);
- a callable `(path, layer) -> bool`;
- `"all-linear"` (where linear layers are selected): every Dense /
  EinsumDense except output heads sized to a vocabulary.
"""

import re
from collections.abc import Callable

import keras
import numpy as np

from keras_qlora.convert import convertible
from keras_qlora.layers.einsum_plan import plan_einsum

ALL_LINEAR = "all-linear"


def select(selector, entries, vocab_sizes=frozenset(), arg="selector") -> set:
    """ids of the layers of `entries` (`surgery.Found`) that `selector`
    matches; `vocab_sizes` are the output sizes `"all-linear"` leaves out;
    `arg` is the argument's name as the caller spelled it (for messages).

    Raises:
        TypeError / ValueError: a malformed selector, or a callable that
            raised or returned something other than a bool.
    """
    if selector is None:
        return set()
    if isinstance(selector, str) and selector == ALL_LINEAR:
        return {
            id(f.layer)
            for f in entries
            if convertible(f.layer) and _output_size(f.layer) not in vocab_sizes
        }
    match = matcher(selector, arg)
    return {id(f.layer) for f in entries if match(f.path, f.layer)}


def matcher(selector, arg="selector") -> Callable:
    """`selector` as a function `(path, layer) -> bool`; `arg` names the
    argument in messages.

    Raises:
        TypeError: not a selector; ValueError: an invalid regex. The
            function raises ValueError when a callable selector raises, and
            TypeError when it returns something other than a bool.
    """
    if isinstance(selector, re.Pattern):
        return lambda path, layer: selector.fullmatch(path) is not None
    if isinstance(selector, str):
        try:
            pattern = re.compile(selector)
        except re.error as e:
            raise ValueError(
                f"{arg}={selector!r} is not a valid regular expression "
                f"({e}). Pass a list of names for exact/suffix matching."
            ) from None
        return lambda path, layer: (
            pattern.fullmatch(path) is not None
            or pattern.fullmatch(layer.name) is not None
        )
    if callable(selector):
        return _checked_callable(selector, arg)
    if isinstance(selector, (list, tuple, set, frozenset)):
        names = list(selector)
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"{arg}: a list of layer names must hold non-empty "
                    f"strings. Received: {name!r} in {arg}={selector!r}"
                )
        return lambda path, layer: any(
            layer.name == n or path == n or path.endswith("/" + n)
            for n in names
        )
    raise TypeError(
        f"{arg}: a module selector must be a list of names, a regex string, "
        "a re.Pattern, a callable (path, layer) -> bool, 'all-linear' or "
        f"None. Received: {arg}={selector!r}"
    )


def _checked_callable(selector, arg):
    """A callable selector whose failures name `arg` and the layer."""
    name = describe(selector)

    def match(path, layer):
        try:
            result = selector(path, layer)
        except Exception as err:  # noqa: BLE001 - the user's code
            raise ValueError(
                f"{arg}: the selector {name}(path, layer) raised "
                f"{type(err).__name__} on layer '{path}': {err}"
            ) from err
        if not isinstance(result, (bool, np.bool_)):
            raise TypeError(
                f"{arg}: the selector {name}(path, layer) must return True "
                f"or False. Received: {result!r} for layer '{path}'"
            )
        return bool(result)

    return match


def unmatched(selector, entries) -> list:
    """Names in a list selector that match no layer of `entries`."""
    if not isinstance(selector, (list, tuple, set, frozenset)):
        return []
    return [
        name
        for name in selector
        if not any(matcher([name])(f.path, f.layer) for f in entries)
    ]


def describe(selector) -> str:
    """A selector as error messages show it."""
    if callable(selector) and not isinstance(selector, str):
        return getattr(selector, "__name__", repr(selector))
    return repr(selector)


def exact_paths(paths) -> Callable:
    """A selector matching exactly `paths` (no suffixes, no names)."""
    wanted = frozenset(paths)

    def select_paths(path, layer):
        return path in wanted

    return select_paths


def _output_size(layer):
    """N of the layer's `[K, N]` matmul (all output features), or None."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None or len(kernel.shape) == 0:
        return None
    if isinstance(layer, keras.layers.EinsumDense):
        try:
            return plan_einsum(layer.equation, tuple(kernel.shape)).n
        except ValueError:
            return None
    return int(kernel.shape[-1])
