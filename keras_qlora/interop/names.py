"""The one table mapping keras_hub layer paths to Hugging Face module names.

Each naming lists rules `(our layer path, HF module, piece)`. Paths are
those of `QLoRAModel.qlora_layers()`; a rule matches the end of a path, so
a backbone nested in a task model (`bert_backbone/transformer_layer_0/...`)
maps too. HF names are relative to the bare HF model (`BertModel`,
`GPT2Model`); task models keep that model under a root attribute (`bert.`,
`transformer.`), which callers add or detect.

Layouts: for every rule, the layer's 2-D kernel view `[K, N]` (see
`einsum_plan`) is the HF `torch.nn.Linear` weight `[out, in]` transposed,
as in keras_hub's own converters (`transpose_and_reshape` for BERT's query
kernel `(hidden, heads, head_dim)`). GPT-2's fused `c_attn` (a Conv1D,
weight `[in, 3 * hidden]`) holds query, key and value side by side along
its output: piece `p` of `pieces` is the slice `[p * hidden, (p + 1) *
hidden)` of its outputs.

With `naming=None` a layer's module name is its path with "/" -> ".".
"""

import dataclasses
import re

# A transformer block of keras_hub's backbones; `i` is its index.
BLOCK_INDEX = r"(?P<i>\d+)"
_BLOCK = f"transformer_layer_{BLOCK_INDEX}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One layer kind: `path` (a regex on the end of our layer path, group
    `i` the block index) -> `module` (`{i}` filled in); `piece` of `pieces`
    when several of our layers share one HF module's outputs."""

    path: str
    module: str
    piece: int = 0
    pieces: int = 1


@dataclasses.dataclass(frozen=True)
class Naming:
    """A model family: its rules, the root attribute HF task models keep
    the base model under, and whether its HF linears are `Conv1D`s
    (PEFT's `fan_in_fan_out`)."""

    name: str
    root: str
    fan_in_fan_out: bool
    rules: tuple


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one of our layers lives in the HF model."""

    module: str
    piece: int = 0
    pieces: int = 1


NAMINGS = {
    "hf-bert": Naming(
        name="hf-bert",
        root="bert.",
        fan_in_fan_out=False,
        rules=(
            Rule(
                f"{_BLOCK}/self_attention_layer/query",
                "encoder.layer.{i}.attention.self.query",
            ),
            Rule(
                f"{_BLOCK}/self_attention_layer/key",
                "encoder.layer.{i}.attention.self.key",
            ),
            Rule(
                f"{_BLOCK}/self_attention_layer/value",
                "encoder.layer.{i}.attention.self.value",
            ),
            Rule(
                f"{_BLOCK}/self_attention_layer/attention_output",
                "encoder.layer.{i}.attention.output.dense",
            ),
            Rule(
                f"{_BLOCK}/feedforward_intermediate_dense",
                "encoder.layer.{i}.intermediate.dense",
            ),
            Rule(
                f"{_BLOCK}/feedforward_output_dense",
                "encoder.layer.{i}.output.dense",
            ),
            Rule("pooled_dense", "pooler.dense"),
        ),
    ),
    "hf-gpt2": Naming(
        name="hf-gpt2",
        root="transformer.",
        fan_in_fan_out=True,
        rules=(
            Rule(f"{_BLOCK}/self_attention/query", "h.{i}.attn.c_attn", 0, 3),
            Rule(f"{_BLOCK}/self_attention/key", "h.{i}.attn.c_attn", 1, 3),
            Rule(f"{_BLOCK}/self_attention/value", "h.{i}.attn.c_attn", 2, 3),
            Rule(
                f"{_BLOCK}/self_attention/attention_output",
                "h.{i}.attn.c_proj",
            ),
            Rule(f"{_BLOCK}/feedforward_intermediate_dense", "h.{i}.mlp.c_fc"),
            Rule(f"{_BLOCK}/feedforward_output_dense", "h.{i}.mlp.c_proj"),
        ),
    ),
}

_COMPILED = {
    key: [(re.compile(rf"(?:.*/)?{r.path}"), r) for r in naming.rules]
    for key, naming in NAMINGS.items()
}


def get_naming(naming) -> Naming | None:
    """The `Naming` called `naming`, or None for `naming=None`.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if naming is None:
        return None
    if not isinstance(naming, str) or naming not in NAMINGS:
        raise ValueError(
            f"naming must be one of {sorted(NAMINGS)} or None (our layer "
            f"paths with '/' -> '.'). Received: naming={naming!r}"
        )
    return NAMINGS[naming]


def target_for(naming: Naming | None, path: str) -> Target | None:
    """Where the layer at `path` lives in the HF model; None if unmapped.

    Example:
    >>> target_for(NAMINGS["hf-gpt2"], "transformer_layer_3/self_attention/key")
    Target(module='h.3.attn.c_attn', piece=1, pieces=3)
    """
    if naming is None:
        return Target(path.replace("/", "."))
    for pattern, rule in _COMPILED[naming.name]:
        match = pattern.fullmatch(path)
        if match:
            module = rule.module.format(**match.groupdict())
            return Target(module, rule.piece, rule.pieces)
    return None


def module_roots(naming: Naming | None) -> tuple:
    """Roots a checkpoint may put before module names, most likely first:
    the HF task model's (`bert.`) and none (the bare HF model)."""
    if naming is None:
        return ("",)
    return (naming.root, "")
