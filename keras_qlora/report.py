"""`summary()`: what `apply()` did, and the memory arithmetic, measured."""

from keras_qlora import convert
from keras_qlora import surgery
from keras_qlora.convert import numel
from keras_qlora.layers import QLoRALayerBase
from keras_qlora.wrapper import require_qlora_model


def collect(model) -> dict:
    """Measures a `QLoRAModel`: replaced layers, parameters and bytes.

    Returns:
        A dict with `layers` (path, type, [K, N], rank, base format, bits
            per weight),
        `trainable_params`, `total_params` (an NF4 weight counts once, as
        the float parameter it stands for), `bytes_before` (all variables
        of the float model, measured by `apply()`), `bytes_after` (all
        non-LoRA variables now), `lora_bytes`, `nf4_bits_per_weight` (all
        quantized layers) and `formats` (their base formats: "NF4", or
        e.g. "NF4 + INT8").
    """
    require_qlora_model(model, "summary")
    # A model retired by merge() refuses here, as in its other methods.
    model.qlora_layers()
    layers, nf4_ids, lora_ids = [], set(), set()
    nf4_weights = nf4_bytes = 0
    for entry in surgery.walk(model.base_model):
        layer = entry.layer
        if not isinstance(layer, QLoRALayerBase):
            continue
        k, n = layer.kernel_2d_shape
        storage = _nf4_variables(layer)
        nf4_ids.update(id(v) for v in storage)
        for name in layer.adapter_names:
            lora_ids.update(id(v) for v in layer.adapter_variables(name))
        size = sum(convert.nbytes(v) for v in storage)
        nf4_weights += k * n
        nf4_bytes += size
        layers.append(
            {
                "path": entry.path,
                "type": type(layer).__name__,
                "shape": (k, n),
                "rank": layer.rank,
                "quant_type": layer.quant_type,
                "bits_per_weight": 8.0 * size / (k * n),
            }
        )
    weights = model.weights
    other_params = sum(numel(v) for v in weights if id(v) not in nf4_ids)
    report = model.qlora_report
    return {
        "layers": layers,
        "trainable_params": sum(numel(v) for v in model.trainable_weights),
        "total_params": other_params + nf4_weights,
        "bytes_before": report.get("bytes_before"),
        "bytes_after": convert.variable_bytes(
            model, lambda v: id(v) not in lora_ids
        ),
        "lora_bytes": convert.variable_bytes(
            model, lambda v: id(v) in lora_ids
        ),
        "nf4_bits_per_weight": 8.0 * nf4_bytes / max(nf4_weights, 1),
        "formats": _formats(layers),
        "modules_to_save": list(report.get("modules_to_save", [])),
        "unmatched_targets": list(report.get("unmatched_targets", [])),
        "unmatched_modules_to_save": list(
            report.get("unmatched_modules_to_save", [])
        ),
    }


def summary(model, print_fn=print) -> str:
    """Prints (and returns) what `keras_qlora.apply()` did to `model`.

    Lists every replaced layer, trainable vs total parameters, and the bytes
    of the base weights before and after quantization.

    Args:
        model: a `QLoRAModel` from `keras_qlora.apply()`.
        print_fn: called with the text; None only returns it.

    Raises:
        TypeError: `model` is not a `QLoRAModel`, or `print_fn` is neither
            callable nor None.

    Example:
    >>> text = keras_qlora.summary(model)  # doctest: +SKIP
    """
    if print_fn is not None and not callable(print_fn):
        raise TypeError(
            "print_fn must be a callable or None. Received: "
            f"print_fn={print_fn!r}"
        )
    info = collect(model)
    width = max([len("layer")] + [len(i["path"]) for i in info["layers"]])
    rows = [
        f"keras_qlora summary: {model.name}",
        f"{'layer':<{width}}  {'type':<16} {'[K, N]':>13} {'LoRA':>6} "
        f"{'format':>6} {'bits':>6}",
    ]
    for item in info["layers"]:
        k, n = item["shape"]
        lora = f"r={item['rank']}" if item["rank"] else "-"
        rows.append(
            f"{item['path']:<{width}}  {item['type']:<16} "
            f"{f'[{k}, {n}]':>13} {lora:>6} {item['quant_type']:>6} "
            f"{item['bits_per_weight']:>6.3f}"
        )
    lora = sum(1 for i in info["layers"] if i["rank"])
    total, trainable = info["total_params"], info["trainable_params"]
    formats = info["formats"]
    rows += [
        f"Replaced layers: {len(info['layers'])} {formats} ({lora} with LoRA)",
        f"Trainable params: {trainable:,} of {total:,} "
        f"({100.0 * trainable / max(total, 1):.3f}%)",
    ]
    if info["bytes_before"]:
        ratio = info["bytes_after"] / info["bytes_before"]
        rows.append(
            f"Base weights: {_mb(info['bytes_before'])} before -> "
            f"{_mb(info['bytes_after'])} after ({ratio:.3f}x); "
            f"{formats} layers at {info['nf4_bits_per_weight']:.3f} "
            "bits/weight"
        )
    rows.append(f"LoRA weights: {_mb(info['lora_bytes'])} (float32)")
    if info["modules_to_save"]:
        rows.append(
            "Trainable float modules: " + ", ".join(info["modules_to_save"])
        )
    if info["unmatched_targets"]:
        rows.append(
            "Targets that matched nothing: "
            + ", ".join(info["unmatched_targets"])
        )
    if info["unmatched_modules_to_save"]:
        rows.append(
            "modules_to_save names that matched nothing: "
            + ", ".join(info["unmatched_modules_to_save"])
        )
    text = "\n".join(rows)
    if print_fn is not None:
        print_fn(text)
    return text


def _nf4_variables(layer):
    names = (
        "nf4_packed",
        "nf4_absmax",
        "nf4_absmax_scale",
        "nf4_absmax_offset",
    )
    return [getattr(layer, n) for n in names if getattr(layer, n) is not None]


def _formats(layers) -> str:
    """ "NF4", or "NF4 + INT8" for a model with layers in several formats."""
    names = sorted({item["quant_type"] for item in layers}) or ["nf4"]
    return " + ".join(name.upper() for name in names)


def _mb(num_bytes):
    return f"{num_bytes / 2**20:,.2f} MiB"
