"""`adapter_config.json`: what an adapter file says about itself.

The config records the LoRA and NF4 settings, the exact layer paths that
carry LoRA, the `modules_to_save` paths, a fingerprint of the frozen base
weights and a checksum of the weights file. `parse` checks every field's
type; `check_compatible` compares a parsed config with a model and names
every difference.
"""

import json

FORMAT = "keras_qlora.adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Field -> kind; a dict is a nested object. Unknown fields are ignored.
_SCHEMA = {
    "format": "str",
    "format_version": "int",
    "adapter_name": "str",
    "rank": "int",
    "alpha": "number",
    "dropout": "number",
    "use_rslora": "bool",
    "target_paths": "str_list",
    "modules_to_save": "str_list",
    "nf4": {
        "block_size": "int",
        "double_quant": "bool",
        "scale_search": "bool",
    },
    "base_model": {"algorithm": "str", "sha256": "str", "layers": "str_dict"},
    "weights_sha256": "str",
}

_KINDS = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": (
        "a number",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    ),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str_list": (
        "a list of strings",
        lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
    ),
    "str_dict": (
        "an object of strings",
        lambda v: (
            isinstance(v, dict) and all(isinstance(s, str) for s in v.values())
        ),
    ),
}

# Settings that must be equal on the model and the adapter: they define the
# shapes, the LoRA scale or the quantized base weights.
_SETTINGS = (
    ("rank", ("rank",)),
    ("alpha", ("alpha",)),
    ("use_rslora", ("use_rslora",)),
    ("block_size", ("nf4", "block_size")),
    ("double_quant", ("nf4", "double_quant")),
    ("scale_search", ("nf4", "scale_search")),
)


def build(name, settings, targets, modules, base_model, weights_sha256):
    """The config dict for an adapter of a model with `settings` (its
    `QLoRASettings`)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "rank": settings.rank,
        "alpha": settings.alpha,
        "dropout": settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_paths": sorted(targets),
        "modules_to_save": sorted(modules),
        "nf4": {
            "block_size": settings.block_size,
            "double_quant": settings.double_quant,
            "scale_search": settings.scale_search,
        },
        "base_model": base_model,
        "weights_sha256": weights_sha256,
    }


def dumps(config) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def parse(data: bytes, source: str) -> dict:
    """Parses and type-checks a config; `source` names the file in errors.

    Raises:
        ValueError: not JSON, a missing field, a field of the wrong type,
            or another format / a newer format version.
    """
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    _check_fields(config, _SCHEMA, source, "")
    if config["format"] != FORMAT:
        raise ValueError(
            f"{source} is not a keras_qlora adapter config: format must be "
            f"{FORMAT!r}. Received: format={config['format']!r}"
        )
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version={config['format_version']}; this "
            f"keras_qlora reads version {FORMAT_VERSION}."
        )
    return config


def check_compatible(saved, expected, source):
    """Raises a ValueError naming every way `saved` does not fit the model
    described by `expected` (a config built from the model)."""
    diffs = [
        f"{label}: adapter {_get(saved, keys)!r}, model "
        f"{_get(expected, keys)!r}"
        for label, keys in _SETTINGS
        if _get(saved, keys) != _get(expected, keys)
    ]
    for field in ("target_paths", "modules_to_save"):
        only_saved = sorted(set(saved[field]) - set(expected[field]))
        only_model = sorted(set(expected[field]) - set(saved[field]))
        if only_saved or only_model:
            diffs.append(
                f"{field}: only in the adapter {only_saved}, only in the "
                f"model {only_model}"
            )
    if diffs:
        raise ValueError(
            f"The adapter in {source} does not fit this model (prepare the "
            "model with the same apply() settings): " + "; ".join(diffs)
        )


def _get(config, keys):
    for key in keys:
        config = config[key]
    return config


def _check_fields(value, schema, source, prefix):
    if not isinstance(value, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ValueError(
            f"{source}: {where} must be a JSON object. Received: "
            f"{type(value).__name__}"
        )
    for key, kind in schema.items():
        field = f"{prefix}{key}"
        if key not in value:
            raise ValueError(f"{source} has no field '{field}'.")
        if isinstance(kind, dict):
            _check_fields(value[key], kind, source, f"{field}.")
            continue
        description, ok = _KINDS[kind]
        if not ok(value[key]):
            raise ValueError(
                f"{source}: '{field}' must be {description}. Received: "
                f"{field}={value[key]!r} ({type(value[key]).__name__})"
            )
