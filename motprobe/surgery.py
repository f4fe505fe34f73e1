"""Turn a loaded vision-language model into its Mixture-of-Transformer (MoT) probe, in place.

In every decoder block, the linears whose role (read from the model's family record) is q, k, v,
gate, up or down — o on request — become a
:class:`ModalityRoutedLinear`: a text copy and a visual copy of the same weights, each token
going to its modality's copy. Attention, norms, residuals and positions stay shared. The
per-token modality is the (batch, seq) visual mask of ``atv_prune.capture.current_visual_mask()``:
the pruning engine sets it for every block it replays, and the probe's forward hooks set it from
``input_ids`` (through ``atv_prune.families``) for every ordinary forward and ``generate()`` step.

Until a pathway is pruned its copy holds the original weight Parameter itself, so an unpruned
probe costs no memory and moving or casting the model keeps the copies shared.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from atv_prune.errors import AtvPruneError, UnsupportedModelError
from atv_prune.model.capture import current_visual_mask, visual_mask_context
from atv_prune.model.families import ATTENTION_INPUT_ROLES, MLP_INPUT_ROLES
from atv_prune.model.layout import ModelLayout, resolve

Pathway = Literal["text", "visual"]
PATHWAYS: tuple[str, ...] = ("text", "visual")

#: Linear roles routed by modality (a fused qkv_proj or gate_up_proj is routed whole); the
#: attention output projection ``o`` joins only with ``include_o_proj``.
ROUTED_ROLES: tuple[str, ...] = (*ATTENTION_INPUT_ROLES, *MLP_INPUT_ROLES, "down")
OUTPUT_ROLE = "o"


class ProbeError(AtvPruneError):
    """Misuse of the MoT probe (no modality mask, probe built twice, restoring a pruned probe)."""


def _copy_of(linear: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` holding ``linear``'s own weight and bias Parameters (no allocation)."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    copy.weight = linear.weight
    if linear.bias is not None:
        copy.bias = linear.bias
    return copy


class ModalityRoutedLinear(nn.Module):
    """A linear whose visual tokens use ``visual`` and whose text tokens use ``text``.

    The token modality is read from :func:`atv_prune.capture.current_visual_mask`. Each modality's
    rows are gathered and sent through their copy only (one matmul's worth of compute in all); a
    single-modality input goes whole through its copy, so text-only inputs never touch ``visual``.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.text = _copy_of(linear)
        self.visual = _copy_of(linear)

    def copy(self, pathway: Pathway) -> nn.Linear:
        """The ``text`` or ``visual`` copy."""
        if pathway not in PATHWAYS:
            raise ProbeError(f"unknown pathway '{pathway}': choose 'text' or 'visual'")
        return self.text if pathway == "text" else self.visual

    @property
    def shares_weights(self) -> bool:
        """Whether both copies still hold the very same weight and bias Parameters."""
        return self.text.weight is self.visual.weight and self.text.bias is self.visual.bias

    @torch.no_grad()
    def materialise(self, pathway: Pathway) -> nn.Parameter:
        """Give ``pathway``'s copy its own weight (a clone) if it still shares the other copy's,
        so that masking it in place leaves the other copy alone; returns that weight."""
        copy = self.copy(pathway)
        other = self.visual if copy is self.text else self.text
        if copy.weight is other.weight:
            copy.weight = nn.Parameter(copy.weight.detach().clone(), requires_grad=copy.weight.requires_grad)
        return copy.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = current_visual_mask()
        if mask is None:
            raise ProbeError(
                "the MoT probe routes each token by modality and needs the visual-token mask: call the "
                "top-level model with input_ids (its hook sets the mask), or wrap the call in "
                "atv_prune.capture.visual_mask_context(mask)"
            )
        rows = x.reshape(-1, self.in_features)
        visual = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        if visual.numel() != rows.shape[0]:
            raise ProbeError(
                f"the visual mask covers {visual.numel()} tokens but this linear sees {rows.shape[0]}: "
                "the mask must be that of the tokens being processed"
            )
        n_visual = int(visual.sum())
        if n_visual == 0:
            return self.text(x)
        if n_visual == visual.numel():
            return self.visual(x)
        visual_out = self.visual(rows[visual])
        out = visual_out.new_empty(rows.shape[0], self.out_features)
        out[visual] = visual_out
        out[~visual] = self.text(rows[~visual])
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, shared={self.shares_weights}"


def probe_linears(model: nn.Module) -> dict[str, ModalityRoutedLinear]:
    """Every routed linear of a probe, by its module path in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModalityRoutedLinear)}


def _input_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``input_ids`` of a top-level forward call (keyword, else first positional)."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


class _MaskHooks:
    """Forward hooks on the top-level model that set the visual mask from the call's ``input_ids``
    for the duration of each forward (each ``generate()`` step included: a cached decode step
    carries only its new tokens, and so does the mask)."""

    def __init__(self, model: nn.Module, layout: ModelLayout) -> None:
        self.layout = layout
        self._open: list[AbstractContextManager[None]] = []
        self._handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = _input_ids(args, kwargs)
        context = nullcontext() if ids is None else visual_mask_context(self.layout.visual_mask(ids))
        context.__enter__()
        self._open.append(context)

    def _exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class ProbeHandle:
    """A probe made by :func:`make_probe`: the original linears it replaced and its mask hooks."""

    model: nn.Module
    layout: ModelLayout
    include_o_proj: bool
    originals: dict[str, nn.Linear]
    _hooks: _MaskHooks | None = field(repr=False, default=None)

    def remove(self) -> None:
        """Remove the top-level mask hooks (routed linears then need an explicit mask context)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def restore(self) -> None:
        """Put the original linears back and remove the hooks; refused once a copy has its own
        weight (a pruned pathway), since that would silently drop the pruning."""
        routed = probe_linears(self.model)
        for name, original in self.originals.items():
            module = routed.get(name)
            if module is None or not (module.shares_weights and module.text.weight is original.weight):
                raise ProbeError(f"{name} is no longer an unpruned probe linear: the probe cannot be "
                                 "restored")
        for name, original in self.originals.items():
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, original)
        self.remove()


def make_probe(model: nn.Module, include_o_proj: bool = False) -> ProbeHandle:
    """Turn ``model`` into its MoT probe in place: route the q/k/v, gate/up and down linears (and the
    attention output projection when ``include_o_proj``) of every decoder block by token modality.
    Which linears carry which role comes from the model's family record (fused ones included)."""
    if probe_linears(model):
        raise ProbeError("this model is already a MoT probe")
    layout = resolve(model)
    roles = ROUTED_ROLES + ((OUTPUT_ROLE,) if include_o_proj else ())
    replacements: dict[str, nn.Linear] = {}
    for index, block in enumerate(layout.blocks(model)):
        found = layout.block_linears(block, roles)
        for name, module in found.items():
            if type(module) is not nn.Linear:
                raise UnsupportedModelError(
                    f"block {index}'s {name} is a {type(module).__name__}, not a plain nn.Linear "
                    "(quantised?): the probe needs a model loaded in a floating dtype"
                )
        covered = {role for name in found for role in layout.family.roles_of(name.rpartition(".")[2])}
        missing = [role for role in roles if role not in covered]
        if missing:
            raise UnsupportedModelError(
                f"block {index} has no linear with role {', '.join(missing)}: the probe routes the "
                f"{', '.join(roles)} projections of a dense decoder (family '{layout.family.name}' names "
                f"{', '.join(leaf for leaf, _ in layout.family.linears)})"
            )
        replacements.update({f"{layout.block_path}.{index}.{name}": module for name, module in found.items()})
    for path, linear in replacements.items():
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ModalityRoutedLinear(linear))
    return ProbeHandle(model, layout, include_o_proj, replacements, _MaskHooks(model, layout))
