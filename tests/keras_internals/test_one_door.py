"""The Keras / TensorFlow / keras_hub behaviour `keras_qlora.internals`
uses: No private Keras/TF/keras_hub name is used outside keras_qlora/internals/.

One test per function; each failure names the behaviour that changed and
the function of keras_qlora/internals/ to update.
"""

import ast
import inspect
import io
import pathlib
import re
import tokenize

import keras
import numpy as np

from keras_qlora import internals

from ._support import built_sgd
from ._support import functional

_PACKAGE = pathlib.Path(internals.__file__).parents[1]
_INTERNALS = pathlib.Path(internals.__file__).parent

# -- one door -----------------------------------------------------------------


def test_every_internal_has_a_test():
    names = [
        name
        for name, value in vars(internals).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == internals.__name__
        and name != "KerasInternalsChanged"
    ]
    tests = set(globals())
    snake = [re.sub(r"(?<!^)([A-Z])", r"_\1", n).lower() for n in names]
    missing = [n for n in snake if f"test_{n}" not in tests]
    assert not missing, f"internals without a test here: {missing}"


# Private Keras/TF/keras_hub attributes the package used before they moved
# into internals/, and other private names of the objects it handles.
_PRIVATE_NAMES = frozenset(
    {
        "_backend_update_step",
        "_compute_loss",
        "_deferred_initialize",
        "_distributed_tf_update_step",
        "_distribution_strategy",
        "_flatten_layers",
        "_functional",
        "_get_variable_index",
        "_inbound_nodes",
        "_inputs",
        "_jit_compile",
        "_keras_history",
        "_keras_mask",
        "_keras_variable",
        "_layers",
        "_learning_rate",
        "_load_backbone_weights",
        "_loss_tracker",
        "_maybe_rebuild",
        "_maybe_symbolic_build",
        "_nodes",
        "_nodes_by_depth",
        "_non_trainable_variables",
        "_num_workers",
        "_operations",
        "_operations_by_depth",
        "_outbound_nodes",
        "_outputs",
        "_parent_path",
        "_overwrite_variable_with_gradient",
        "_remat_mode",
        "_seed_generators",
        "_self_unconditional_checkpoint_dependencies",
        "_self_unconditional_dependency_names",
        "_tf_trackable",
        "_tracker",
        "_trainable_variables",
        "_value",
        "_variables",
    }
)
_PRIVATE_MODULES = ("keras.src", "tensorflow.python", "keras_hub.src")


def _keras_private_names():
    """Private attributes of the Keras objects the package handles, beyond
    `_PRIVATE_NAMES`: a new use of any of them belongs in internals/."""
    model, _ = functional()
    optimizer = built_sgd(keras.Variable(np.zeros((2,), "float32")))
    objects = (model, keras.Sequential([]), keras.layers.Dense(1), optimizer)
    names = set()
    for obj in objects:
        names.update(n for n in dir(obj) if n.startswith("_") and n[1] != "_")
    return names


def _private_uses(path, private):
    """`(line, text)` of each private Keras/TF name used in `path`: imports
    of private modules, `.name` attribute access, `"name"` strings (getattr),
    and methods named like a Keras private method (overrides)."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                modules = [first.value]
        for module in modules:
            if module.startswith(_PRIVATE_MODULES):
                found.append((node.lineno, module))
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if (
                    isinstance(method, ast.FunctionDef)
                    and method.name in private
                ):
                    found.append((method.lineno, f"def {method.name}"))
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for before, token in zip(tokens, tokens[1:], strict=False):
        is_attr = before.string == "." and token.type == tokenize.NAME
        if is_attr and token.string in private:
            found.append((token.start[0], f".{token.string}"))
        if token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):
                continue
            if value in private:
                found.append((token.start[0], repr(value)))
    return found


# The package's own private names that Keras objects happen to have too.
_OWN_NAMES = frozenset()


def test_no_private_keras_names_outside_internals():
    private = (_PRIVATE_NAMES | _keras_private_names()) - _OWN_NAMES
    uses = []
    for path in sorted(_PACKAGE.rglob("*.py")):
        if path.parent == _INTERNALS:
            continue
        for line, what in _private_uses(path, private):
            uses.append(f"{path.relative_to(_PACKAGE.parent)}:{line}: {what}")
    assert not uses, (
        "Private Keras/TF/keras_hub names used outside "
        "keras_qlora/internals/ (add a function there instead):\n"
        + "\n".join(uses)
    )


def test_private_name_scan_finds_uses(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(
        "from keras.src.ops.node import KerasHistory\n"
        "x = layer._inbound_nodes\n"
        "y = getattr(strategy.extended, '_num_workers', 1)\n"
        "class M:\n"
        "    def _maybe_symbolic_build(self):\n"
        "        pass\n"
        "z = layer._own_thing  # '_inbound_nodes' in a comment is fine\n"
    )
    lines = [line for line, _ in _private_uses(path, _PRIVATE_NAMES)]
    assert lines == [1, 5, 2, 3]


def test_parent_path():
    layer = keras.layers.Dense(2, name="d")
    assert internals.parent_path(layer) is None, (
        "Keras/TF behaviour changed: Layer._parent_path is no longer None "
        "before the layer opens its name scope. Update "
        "keras_qlora.internals.parent_path"
    )
    with keras.name_scope("outer"):
        layer(np.ones((1, 3), "float32"))
    assert internals.parent_path(layer) == "outer", (
        "Keras/TF behaviour changed: Layer._parent_path no longer records "
        "the scope a layer was first called in. Update "
        "keras_qlora.internals.parent_path"
    )


def test_set_parent_path():
    layer = keras.layers.Dense(2, name="d")
    internals.set_parent_path(layer, "block_0/attention")
    layer.build((None, 3))
    assert layer.kernel.path == "block_0/attention/d/kernel", (
        "Keras/TF behaviour changed: a layer no longer creates its variables "
        "under Layer._parent_path. Update keras_qlora.internals."
        "set_parent_path"
    )
