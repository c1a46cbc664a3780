"""Reading and writing the two files of a PEFT LoRA adapter.

`adapter_config.json` is PEFT's `LoraConfig` as JSON; the fields that fix
the adapter's math are checked here (`r`, `lora_alpha`, `use_rslora`,
`rank_pattern`, `alpha_pattern`, `target_modules`, `use_dora`,
`peft_type`); the others (dropout, task type, ...) do not change what the
weights compute and are ignored.

`adapter_model.safetensors` holds `base_model.model.<module>.lora_A.weight`
`[r, in]` and `.lora_B.weight` `[out, r]` (PEFT strips the adapter name
when saving). Tensors are read with `safetensors.deserialize`, not its
numpy helper, so that bfloat16 files (common for QLoRA adapters) load;
every float dtype is widened to float32 exactly. No pickle.
"""

import dataclasses
import json
import math
import re

import numpy as np
import safetensors
import safetensors.numpy

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}

# Little-endian, as the safetensors format stores them.
_FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """The checked fields of a PEFT `adapter_config.json`."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    target_modules: object  # list of str, a regex str, or None

    def rank_and_alpha(self, module: str) -> tuple:
        """`(r, alpha)` of `module`, after `rank_pattern` / `alpha_pattern`
        (PEFT's rule: the first key `k` with `(.*\\.)?(k)$` matching)."""
        rank_key = _pattern_key(self.rank_pattern, module)
        alpha_key = _pattern_key(self.alpha_pattern, module)
        r = self.r if rank_key is None else self.rank_pattern[rank_key]
        alpha = (
            self.lora_alpha
            if alpha_key is None
            else self.alpha_pattern[alpha_key]
        )
        return r, alpha

    def scale(self, module: str) -> float:
        """PEFT's multiplier of `B @ A` for `module`."""
        r, alpha = self.rank_and_alpha(module)
        return lora_scale(alpha, r, self.use_rslora)


def lora_scale(alpha, r, use_rslora) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


def parse_config(data: bytes, source: str) -> PeftConfig:
    """Parses and checks an `adapter_config.json`.

    Raises:
        ValueError: not JSON, not a LoRA config, DoRA, or a field of the
            wrong type; the message names the field and its value.
    """
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{source} must hold a JSON object. Received: {type(raw).__name__}"
        )
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(
            f"{source}: only LoRA adapters can be loaded. Received: "
            f"peft_type={peft_type!r}"
        )
    if raw.get("use_dora", False) is not False:
        raise ValueError(
            f"{source}: DoRA adapters (use_dora) have a magnitude vector "
            "keras_qlora layers do not model; only plain LoRA loads. "
            f"Received: use_dora={raw['use_dora']!r}"
        )
    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise ValueError(f"{source} has no field '{field}'.")
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    _check(source, "r", raw["r"], _is_rank, "a positive int")
    _check(source, "lora_alpha", raw["lora_alpha"], _is_number, "a number")
    use_rslora = raw.get("use_rslora", False)
    _check(source, "use_rslora", use_rslora, _is_bool, "true or false")
    _check_pattern(source, "rank_pattern", rank_pattern, _is_rank)
    _check_pattern(source, "alpha_pattern", alpha_pattern, _is_number)
    targets = raw.get("target_modules")
    _check(
        source,
        "target_modules",
        targets,
        lambda v: (
            v is None
            or isinstance(v, str)
            or (isinstance(v, list) and all(isinstance(s, str) for s in v))
        ),
        "a list of strings, a regex string or null",
    )
    return PeftConfig(
        r=raw["r"],
        lora_alpha=float(raw["lora_alpha"]),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        target_modules=targets,
    )


def read_tensors(data: bytes, source: str) -> dict:
    """`{key: float32 array}` of a safetensors file's bytes.

    Raises:
        ValueError: an unreadable (truncated, corrupt) file, or a tensor
            that is not float16 / bfloat16 / float32 / float64.
    """
    try:
        entries = safetensors.deserialize(data)
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{source} is not a readable safetensors file ({err}); it may be "
            "truncated or corrupt."
        ) from None
    out = {}
    for key, entry in entries:
        dtype, shape, raw = entry["dtype"], entry["shape"], entry["data"]
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: widening is exact.
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            value = bits.view(np.float32)
        elif dtype in _FLOAT_DTYPES:
            value = np.frombuffer(raw, dtype=_FLOAT_DTYPES[dtype])
            value = value.astype(np.float32)
        else:
            raise ValueError(
                f"{source}: tensor '{key}' has dtype {dtype}; LoRA weights "
                "must be F16, BF16, F32 or F64."
            )
        out[key] = value.reshape(shape)
    return out


def write_tensors(tensors: dict) -> bytes:
    """Safetensors bytes of `{key: float32 array}` (PEFT's layout)."""
    tensors = {
        k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()
    }
    return safetensors.numpy.save(tensors, metadata={"format": "pt"})


def config_json(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def split_key(key: str):
    """`(module, "A" | "B")` of a PEFT LoRA key, or None for other keys."""
    if not key.startswith(KEY_PREFIX):
        return None
    for suffix, which in LORA_SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(KEY_PREFIX) : -len(suffix)], which
    return None


def lora_key(module: str, which: str) -> str:
    return f"{KEY_PREFIX}{module}.lora_{which}.weight"


def _pattern_key(pattern, module):
    for key in pattern:
        if re.match(_module_pattern(key), module):
            return key
    return None


def _module_pattern(key):
    """A `rank_pattern` / `alpha_pattern` key as PEFT matches it."""
    return rf"(.*\.)?({key})$"


def _check(source, field, value, ok, description):
    if not ok(value):
        raise ValueError(
            f"{source}: '{field}' must be {description}. Received: "
            f"{field}={value!r}"
        )


def _check_pattern(source, field, pattern, ok):
    if not isinstance(pattern, dict) or not all(
        isinstance(k, str) and ok(v) for k, v in pattern.items()
    ):
        raise ValueError(
            f"{source}: '{field}' must map module patterns to "
            f"{'positive ints' if ok is _is_rank else 'numbers'}. "
            f"Received: {field}={pattern!r}"
        )
    for key in pattern:
        try:
            # Compiled as PEFT uses it, inside a larger pattern: a global
            # flag such as "(?i)" is valid alone but not there.
            re.compile(_module_pattern(key))
        except re.error as err:
            raise ValueError(
                f"{source}: '{field}' key {key!r} is not a valid module "
                f"pattern ({err}); it is matched as "
                f"{_module_pattern(key)!r}, so flags must be scoped, e.g. "
                "'(?i:query)' for '(?i)query'."
            ) from None


def _is_rank(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value):
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _is_bool(value):
    return isinstance(value, bool)
