"""The one place that knows each vision-language model family (declarative, no torch needed).

A :class:`Family` is a record, as GPTQModel's per-architecture ``module_tree``: where the
language-model decoder blocks live, the model without its LM head, which config fields hold the
image/video placeholder token ids, whether it takes video (the kind of video processor its clips
go through), where the vision tower and projector are, the per-token type input some forwards
need, and the *role* of every linear in a block (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``,
``down``; a fused ``qkv_proj`` carries three roles). ``register_family`` adds one
from anywhere. Models of an unregistered family that follow the common transformers layout are
handled by :data:`GENERIC`. :mod:`.layout` resolves a family against a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import Registry

#: Linear roles of a decoder block: attention inputs, attention output, MLP inputs, MLP output.
ATTENTION_INPUT_ROLES = ("q", "k", "v")
MLP_INPUT_ROLES = ("gate", "up")
ROLES: tuple[str, ...] = (*ATTENTION_INPUT_ROLES, "o", *MLP_INPUT_ROLES, "down")

#: (leaf name, roles in output order) for the names transformers' decoders use, fused ones included.
STANDARD_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("q_proj", ("q",)), ("k_proj", ("k",)), ("v_proj", ("v",)), ("qkv_proj", ("q", "k", "v")), ("o_proj", ("o",)),
    ("gate_proj", ("gate",)), ("up_proj", ("up",)), ("gate_up_proj", ("gate", "up")), ("down_proj", ("down",)),
)

#: Attribute paths, relative to the top-level model, tried for unregistered families.
COMMON_BLOCK_PATHS: tuple[str, ...] = (
    "model.language_model.layers",
    "model.text_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
)


@dataclass(frozen=True)
class Family:
    """Where one VLM family keeps its parts and how its tokens are marked."""

    name: str
    model_types: tuple[str, ...]
    block_paths: tuple[str, ...] = ("model.language_model.layers",)
    #: The model without its LM head: the capture runs it (no logits are needed).
    base_model_path: str = "model"
    image_token_fields: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token_fields: tuple[str, ...] = ("video_token_id", "video_token_index")
    #: Name of a per-token type input (0 text, 1 image, 2 video) the forward requires but
    #: some processors do not return; built from the input ids when absent.
    token_type_input: str | None = None
    #: (leaf name, roles) of each decoder-block linear the family knows.
    linears: tuple[tuple[str, tuple[str, ...]], ...] = STANDARD_LINEARS
    #: (role, decoder-config flag) that gives that role's linear a bias (Llama's ``attention_bias``
    #: reaches q/k/v/o, ``mlp_bias`` gate/up/down): structured pruning's bias compensation sets the
    #: flag; a decoder without it (Qwen2's o_proj) cannot be compensated.
    bias_flags: tuple[tuple[str, str], ...] = (("o", "attention_bias"), ("down", "mlp_bias"))
    #: How the family's processor turns a clip into model inputs (a key of
    #: :data:`atv_prune.model.video_processors.VIDEO_PROCESSORS`); None: the family takes no video.
    video_processor: str | None = None
    notes: str = ""

    @property
    def takes_video(self) -> bool:
        """Whether the family's models take video clips (given a video token id in their config)."""
        return self.video_processor is not None

    def roles_of(self, leaf: str) -> tuple[str, ...]:
        """The roles of a block linear named ``leaf`` (empty when the family does not know it)."""
        return dict(self.linears).get(leaf, ())

    def leaves_with(self, roles: tuple[str, ...]) -> tuple[str, ...]:
        """Leaf names of the linears carrying any of ``roles``."""
        return tuple(leaf for leaf, carried in self.linears if set(carried) & set(roles))


FAMILIES: Registry[Family] = Registry("model family")


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Make ``family`` known to every command and API call (matched by its ``model_types``)."""
    taken = {t: f.name for f in FAMILIES.values() if f.name != family.name for t in f.model_types}
    clash = [t for t in family.model_types if t in taken]
    if clash and not replace:
        raise ValueError(f"model_type {clash[0]} belongs to family '{taken[clash[0]]}' already")
    return FAMILIES.register(family.name, family, replace=replace)


for _family in (
    Family("llava", ("llava",), notes="CLIP/SigLIP tower + MLP projector; <image> x patches"),
    Family("llava_next", ("llava_next",),
           notes="anyres tiling: the image-token count depends on image_sizes"),
    Family("llava_next_video", ("llava_next_video",),
           video_processor="llava_next_video", notes="LLaVA-NeXT with pooled video frames; image and video tokens"),
    Family("llava_onevision", ("llava_onevision",),
           video_processor="llava_onevision", notes="SigLIP + Qwen2 decoder; image and video tokens"),
    Family("qwen2_vl", ("qwen2_vl",), token_type_input="mm_token_type_ids",
           video_processor="qwen2_vl", notes="3-D M-RoPE; image_grid_thw"),
    Family("qwen2_5_vl", ("qwen2_5_vl",), token_type_input="mm_token_type_ids",
           video_processor="qwen2_vl", notes="3-D M-RoPE; windowed vision attention"),
    Family("qwen3_vl", ("qwen3_vl",), token_type_input="mm_token_type_ids",
           video_processor="qwen3_vl", notes="deepstack: visual features added after the first blocks"),
    Family("gemma3", ("gemma3",), token_type_input="token_type_ids",
           notes="sliding/full attention alternate; bidirectional image attention"),
    Family("idefics3", ("idefics3", "smolvlm"), block_paths=("model.text_model.layers",),
           notes="Idefics3 and SmolVLM: image split into tiles plus a global image"),
):
    register_family(_family)

GENERIC = Family("generic", (), block_paths=COMMON_BLOCK_PATHS,
                 notes="unregistered family following the common transformers layout")


def supported_families() -> str:
    """Comma-separated model_type values the registry knows, for error messages."""
    return ", ".join(t for family in FAMILIES.values() for t in family.model_types)


def family_for(model_type: str) -> Family | None:
    """The registered family for a config ``model_type``, or None."""
    return next((family for family in FAMILIES.values() if model_type in family.model_types), None)
