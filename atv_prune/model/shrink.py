"""Removing attention heads and MLP channels from decoder blocks for real, and a config that says so.

Heads go by whole key/value groups: removing group g removes its key and value heads (rows of
``k_proj``/``v_proj``) and the query heads that read them (rows of ``q_proj``, columns of
``o_proj``), so ``num_attention_heads / num_key_value_heads`` stays the same integer and
``head_dim`` (hence every rotary table, M-RoPE included) is untouched. A channel is a row of
``gate_proj`` and ``up_proj`` and a column of ``down_proj``. Which linear plays which role comes
from the family record; fused ``qkv_proj`` / ``gate_up_proj`` linears are refused.

Every block loses the same number of units, so the result is described by the decoder config
alone (``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` written out,
``intermediate_size``, and the family's bias flags when FLAP's compensation gives ``o_proj`` or
``down_proj`` a bias): :func:`plan_config` checks, on a meta-device model built from the new config,
that a plain ``from_pretrained`` will rebuild exactly the pruned shapes — before any weight is touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..algorithms.structured import kept_units, removal_count, unit_columns_of
from ..errors import ConfigError, UnsupportedModelError, one_line
from .engine import PruneTarget
from .families import ATTENTION_INPUT_ROLES, MLP_INPUT_ROLES
from .layout import ModelLayout
from .structured import Cut, StructureUnits

HEAD_ROLES: tuple[str, ...] = (*ATTENTION_INPUT_ROLES, "o")
CHANNEL_ROLES: tuple[str, ...] = (*MLP_INPUT_ROLES, "down")


def decoder_config(config: Any) -> Any:
    """The language-model decoder's config inside a VLM config (``text_config`` for most families),
    the one place that knows where it is: transformers' own ``get_text_config(decoder=True)``."""
    return config.get_text_config(decoder=True)


@dataclass(frozen=True)
class DecoderGeometry:
    """Head and channel counts of the decoder, from its config."""

    model_type: str
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, model: nn.Module) -> DecoderGeometry:
        text = decoder_config(model.config)
        model_type = getattr(text, "model_type", type(text).__name__)
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        intermediate = getattr(text, "intermediate_size", None)
        if not all(isinstance(v, int) and v > 0 for v in (heads, kv_heads, intermediate)) or heads % kv_heads:
            raise UnsupportedModelError(
                f"the {model_type} decoder config has no single num_attention_heads / num_key_value_heads / "
                "intermediate_size for every block: structured pruning needs uniform blocks; use --sparsity")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(model_type, heads, kv_heads, head_dim, intermediate)


@dataclass(frozen=True)
class Removal:
    """Units removed in every block: key/value groups and MLP channels, with notes on rounding."""

    kv_groups: int
    channels: int
    notes: tuple[str, ...] = ()


def removal_for(geometry: DecoderGeometry, structure: str, ratio: float) -> Removal:
    """How many key/value groups and channels each block loses at ``ratio``: floor(ratio · count),
    the same in every block. A positive ratio that removes nothing of a structure asked for alone is
    refused (one line); under ``both`` it is noted and only the other structure is cut."""
    groups = removal_count(geometry.kv_heads, ratio) if structure in ("heads", "both") else 0
    channels = removal_count(geometry.intermediate, ratio) if structure in ("channels", "both") else 0
    if ratio == 0:
        return Removal(0, 0)
    groups_text = "group" if geometry.kv_heads == 1 else "groups"
    head_note = (f"ratio {ratio:g} removes no attention head: floor({ratio:g} × {geometry.kv_heads} key/value "
                 f"{groups_text} of {geometry.group_size} query heads) = 0")
    channel_note = (f"ratio {ratio:g} removes no MLP channel: floor({ratio:g} × {geometry.intermediate}) = 0")
    if structure == "heads" and not groups:
        fix = ("its heads cannot be removed without removing attention; use --structure channels"
               if geometry.kv_heads == 1 else f"pass --ratio {1 / geometry.kv_heads:.3g} or more")
        raise ConfigError(f"{head_note}: {fix}")
    if structure == "channels" and not channels:
        raise ConfigError(f"{channel_note}: pass --ratio {1 / geometry.intermediate:.3g} or more")
    if structure == "both":
        if not groups and not channels:
            raise ConfigError(f"{head_note} and no MLP channel: pass a larger --ratio")
        notes = tuple(note + "; only the other structure is cut" for note, cut in
                      ((head_note, groups), (channel_note, channels)) if not cut)
        return Removal(groups, channels, notes)
    return Removal(groups, channels)


@dataclass
class BlockParts:
    """A block's linears by role (q, k, v, o, gate, up, down), with their names inside the block."""

    linears: dict[str, nn.Linear]
    names: dict[str, str]


def block_parts(layout: ModelLayout, block: nn.Module, prefix: str, roles: tuple[str, ...]) -> BlockParts:
    """The linears carrying ``roles`` in ``block``, one per role; fused or missing ones are refused."""
    linears: dict[str, nn.Linear] = {}
    names: dict[str, str] = {}
    for name, module in layout.block_linears(block, roles).items():
        carried = layout.family.roles_of(name.rpartition(".")[2])
        if len(carried) > 1:
            raise UnsupportedModelError(
                f"{prefix}.{name} is a fused linear ({', '.join(carried)}): structured pruning needs separate "
                "q/k/v and gate/up linears; use unstructured --sparsity for this model")
        role = carried[0]
        if role in linears:
            raise UnsupportedModelError(f"{prefix} has two {role} linears ({names[role]}, {name}): structured "
                                        "pruning needs one linear per role")
        linears[role], names[role] = module, name
    missing = [role for role in roles if role not in linears]
    if missing:
        raise UnsupportedModelError(
            f"{prefix} has no linear with role {', '.join(missing)}: structured pruning needs the "
            f"{', '.join(roles)} projections (family '{layout.family.name}')")
    return BlockParts(linears, names)


@torch.no_grad()
def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Shrink ``linear`` in place to the output ``rows`` given (and their bias entries)."""
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = rows.numel()


@torch.no_grad()
def keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    """Shrink ``linear`` in place to the input ``columns`` given."""
    columns = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone(),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features = columns.numel()


@torch.no_grad()
def add_to_bias(linear: nn.Linear, shift: torch.Tensor) -> None:
    """Add ``shift`` to ``linear``'s output bias, giving it one (zeros) first if it has none."""
    weight = linear.weight
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
    linear.bias.add_(shift.to(linear.bias.device, linear.bias.dtype))


def _heads_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Rows (of q_proj, or of k/v_proj with one head per group) of the given key/value groups."""
    return unit_columns_of(groups, heads_per_group * head_dim)


@dataclass
class ConfigPlan:
    """What the decoder config must say after pruning, checked against a model built from it."""

    values: dict[str, Any]
    #: Paths (in the model) of linears the new config gives a bias they lack now (zeros), e.g. q/k/v
    #: when ``attention_bias`` is switched on for o_proj's compensation.
    zero_biases: list[str] = field(default_factory=list)


class ShrinkSurgery:
    """The :class:`~.structured.Surgery` that removes heads and channels physically, then writes
    the config (:func:`plan_config` has checked it can be expressed, with a bias on the reading
    linears when ``compensate``)."""

    def __init__(self, model: nn.Module, layout: ModelLayout, structure: str, ratio: float,
                 compensate: bool) -> None:
        self.layout = layout
        self.geometry = DecoderGeometry.of(model)
        self.removal = removal_for(self.geometry, structure, ratio)
        self.roles = (HEAD_ROLES if structure in ("heads", "both") else ()) + (
            CHANNEL_ROLES if structure in ("channels", "both") else ())
        for index, block in enumerate(layout.blocks(model)):
            self._check_widths(block_parts(layout, block, f"{layout.block_path}.{index}", self.roles),
                               f"{layout.block_path}.{index}")
        self.config_plan = plan_config(model, layout, self.geometry, self.removal, compensate, self.roles)
        self.parameters_before = _count(model)

    def _check_widths(self, parts: BlockParts, prefix: str) -> None:
        g = self.geometry
        expected = {"o": g.heads * g.head_dim, "down": g.intermediate}
        for role, width in expected.items():
            linear = parts.linears.get(role)
            if linear is not None and linear.in_features != width:
                raise UnsupportedModelError(
                    f"{prefix}.{parts.names[role]} reads {linear.in_features} inputs where the config says {width}: "
                    "structured pruning needs every block as the config describes it")

    def units(self, block: nn.Module, prefix: str) -> list[StructureUnits]:
        parts = block_parts(self.layout, block, prefix, self.roles)
        found = []
        if self.removal.kv_groups:
            o = parts.linears["o"]
            found.append(StructureUnits("heads", PruneTarget(f"{prefix}.{parts.names['o']}", o, o.weight),
                                        self.geometry.group_size * self.geometry.head_dim, self.removal.kv_groups))
        if self.removal.channels:
            down = parts.linears["down"]
            found.append(StructureUnits("channels", PruneTarget(f"{prefix}.{parts.names['down']}", down, down.weight),
                                        1, self.removal.channels))
        return found

    def apply(self, block: nn.Module, prefix: str, cuts: list[Cut]) -> dict[str, tuple[int, int]]:
        """Cut the block; the sizes cover every linear of the block (untouched ones remove 0)."""
        parts = block_parts(self.layout, block, prefix, self.roles)
        linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        before = {name: linear.weight.numel() for name, linear in linears.items()}
        g = self.geometry
        for cut in cuts:
            if cut.kind == "heads":
                self._cut_heads(parts, cut, g)
            else:
                self._cut_channels(parts, cut, g)
        return {f"{prefix}.{name}": (before[name] - linear.weight.numel(), before[name])
                for name, linear in linears.items()}

    @staticmethod
    def _cut_heads(parts: BlockParts, cut: Cut, g: DecoderGeometry) -> None:
        kept = kept_units(g.kv_heads, cut.removed)
        o = parts.linears["o"]
        if cut.bias_shift is not None:
            add_to_bias(o, cut.bias_shift)
        keep_rows(parts.linears["q"], _heads_rows(kept, g.group_size, g.head_dim))
        keep_rows(parts.linears["k"], _heads_rows(kept, 1, g.head_dim))
        keep_rows(parts.linears["v"], _heads_rows(kept, 1, g.head_dim))
        keep_columns(o, _heads_rows(kept, g.group_size, g.head_dim))

    @staticmethod
    def _cut_channels(parts: BlockParts, cut: Cut, g: DecoderGeometry) -> None:
        kept = kept_units(g.intermediate, cut.removed)
        down = parts.linears["down"]
        if cut.bias_shift is not None:
            add_to_bias(down, cut.bias_shift)
        keep_rows(parts.linears["gate"], kept)
        keep_rows(parts.linears["up"], kept)
        keep_columns(down, kept)

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Write the new counts (and bias flags) into every copy of the decoder config, give the
        linears the new flags reach a zero bias, and check the result against a model built from
        the config; returns the report's ``structure`` summary."""
        apply_config(model, self.config_plan)
        check_rebuilds(model)
        g = self.geometry
        heads_after = (g.kv_heads - self.removal.kv_groups) * g.group_size
        return {
            "heads": {"before": g.heads, "after": heads_after, "key_value_heads_before": g.kv_heads,
                      "key_value_heads_after": g.kv_heads - self.removal.kv_groups,
                      "query_heads_per_group": g.group_size, "head_dim": g.head_dim},
            "channels": {"before": g.intermediate, "after": g.intermediate - self.removal.channels},
            "parameters": {"before": self.parameters_before, "after": _count(model)},
            "config": self.config_plan.values,
            "notes": list(self.removal.notes),
        }


def shrink_surgery(model: nn.Module, layout: ModelLayout, structure: str, ratio: float,
                   compensate: bool) -> ShrinkSurgery:
    """The default :data:`~.structured.SurgeryFactory`: physical removal, config written after."""
    return ShrinkSurgery(model, layout, structure, ratio, compensate)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers(remove_duplicate=False)})
    return shapes


def _expected_shapes(model: nn.Module, layout: ModelLayout, geometry: DecoderGeometry, removal: Removal,
                     bias_roles: set[str], roles: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The model's parameter and buffer shapes after ``removal`` (and new biases on ``bias_roles``)."""
    shapes = _shapes(model)
    kept_groups = geometry.kv_heads - removal.kv_groups
    kept_channels = geometry.intermediate - removal.channels
    for index, block in enumerate(layout.blocks(model)):
        prefix = f"{layout.block_path}.{index}"
        parts = block_parts(layout, block, prefix, roles)
        for role, name in parts.names.items():
            linear, path = parts.linears[role], f"{prefix}.{name}"
            out_features, in_features = linear.weight.shape
            if role in ATTENTION_INPUT_ROLES:
                out_features = out_features // geometry.kv_heads * kept_groups
            elif role in MLP_INPUT_ROLES:
                out_features = kept_channels
            elif role == "o":
                in_features = in_features // geometry.kv_heads * kept_groups
            else:
                in_features = kept_channels
            shapes[f"{path}.weight"] = (out_features, in_features)
            if linear.bias is not None or role in bias_roles:
                shapes[f"{path}.bias"] = (out_features,)
    return shapes


def _rebuilt(model: nn.Module, config: Any) -> nn.Module:
    """``model``'s class built from ``config`` on the meta device (what ``from_pretrained`` would build)."""
    with torch.device("meta"):
        return type(model)._from_config(config)


def plan_config(model: nn.Module, layout: ModelLayout, geometry: DecoderGeometry, removal: Removal,
                compensate: bool, roles: tuple[str, ...] = HEAD_ROLES + CHANNEL_ROLES) -> ConfigPlan:
    """The decoder-config values after ``removal``, checked on a meta-device model built from them:
    its shapes must be the pruned ones exactly (so ``from_pretrained`` reloads the result), and with
    ``compensate`` the reading linears (o_proj, down_proj) must be able to carry a bias. ``roles``: the
    linears the structures touch. Refuses with one line otherwise (works on a meta skeleton too: only
    shapes are read)."""
    text = decoder_config(model.config)
    values: dict[str, Any] = {}
    if removal.kv_groups:
        values.update(num_attention_heads=(geometry.kv_heads - removal.kv_groups) * geometry.group_size,
                      num_key_value_heads=geometry.kv_heads - removal.kv_groups, head_dim=geometry.head_dim)
    if removal.channels:
        values["intermediate_size"] = geometry.intermediate - removal.channels
    bias_roles: set[str] = set()
    if compensate:
        first = layout.blocks(model)[0]
        parts = block_parts(layout, first, f"{layout.block_path}.0", roles)
        flags = dict(layout.family.bias_flags)
        for role, cut in (("o", removal.kv_groups), ("down", removal.channels)):
            if not cut or parts.linears[role].bias is not None:
                continue
            flag = flags.get(role)
            if flag is None or not hasattr(text, flag):
                raise UnsupportedModelError(
                    f"bias compensation needs a bias on {parts.names[role]}, which a {geometry.model_type} config "
                    f"cannot switch on (no {flag or 'bias'} flag): pass --no-bias-compensation or use "
                    "--method wanda-sp")
            values[flag] = True
            bias_roles.add(role)
    if not values:
        return ConfigPlan(values)
    config = copy.deepcopy(model.config)
    new_text = decoder_config(config)
    for key, value in values.items():
        setattr(new_text, key, value)
    try:
        rebuilt = _rebuilt(model, config)
    except Exception as error:  # noqa: BLE001 - any refusal of the new config is the family's limit
        raise UnsupportedModelError(
            f"a {geometry.model_type} model cannot be built from the pruned config {values} ({one_line(error, 160)}): "
            "use --structure channels or unstructured --sparsity") from None
    expected = _expected_shapes(model, layout, geometry, removal, bias_roles, roles)
    built = _shapes(rebuilt)
    for name, shape in expected.items():
        if built.get(name) != shape:
            found = "no such tensor" if name not in built else f"shape {built[name]}"
            what = "a bias there" if name.endswith(".bias") and name not in built else f"shape {shape}"
            raise UnsupportedModelError(
                f"a {geometry.model_type} config cannot describe the pruned decoder: a model built from {values} has "
                f"{found} for {name}, the pruned one {what} (its attention derives head_dim from hidden_size / "
                "heads, or a bias cannot be switched on): use --structure channels, --no-bias-compensation or "
                "unstructured --sparsity")
    zero_biases = [name[: -len(".bias")] for name in built if name not in expected and name.endswith(".bias")]
    unexpected = [name for name in built if name not in expected and not name.endswith(".bias")]
    if unexpected:
        raise UnsupportedModelError(f"a {geometry.model_type} model built from the pruned config {values} has "
                                    f"{unexpected[0]}, which the pruned one lacks: use unstructured --sparsity")
    return ConfigPlan(values, zero_biases)


def apply_config(model: nn.Module, plan: ConfigPlan) -> None:
    """Set ``plan``'s values on every copy of the decoder config in ``model`` and give the listed
    linears zero biases."""
    text = decoder_config(model.config)
    configs = {id(text): text}
    configs.update({id(m.config): m.config for m in model.modules()
                    if type(getattr(m, "config", None)) is type(text)})
    for config in configs.values():
        for key, value in plan.values.items():
            setattr(config, key, value)
    for path in plan.zero_biases:
        linear = model.get_submodule(path)
        if linear.bias is None:
            add_to_bias(linear, torch.zeros(linear.out_features))


def check_rebuilds(model: nn.Module) -> None:
    """Refuse (as an internal error) a pruned model that its own config would not rebuild."""
    expected, built = _shapes(model), _shapes(_rebuilt(model, copy.deepcopy(model.config)))
    differing = sorted(name for name in expected.keys() | built.keys() if expected.get(name) != built.get(name))
    if differing:
        name = differing[0]
        raise RuntimeError(f"the pruned model does not match its config at {name}: "
                           f"{expected.get(name)} vs {built.get(name)}")
