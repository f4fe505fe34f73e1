"""Synthetic Qwen2-VL calibration samples shared by the engine and out-of-core benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atv_prune.model.calibration import CalibrationSet


def qwen2_vl_samples(config: Any, n: int, n_text: int, grid: int) -> CalibrationSet:
    """``n`` seeded samples: ``n_text`` random text ids around one image of ``grid x grid`` patches,
    with the vision start/end and image token ids of ``config`` (a Qwen2-VL config)."""
    import torch  # imported here so that the out-of-core benchmark's parent process stays light

    from atv_prune.model.calibration import CalibrationSample, CalibrationSet

    g = torch.Generator().manual_seed(1234)
    vision = config.vision_config
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    n_image = grid * grid // vision.spatial_merge_size ** 2
    made = []
    for index in range(n):
        text = torch.randint(0, config.image_token_id - 10, (n_text,), generator=g)
        ids = torch.cat([text[:8], torch.tensor([config.vision_start_token_id]),
                         torch.full((n_image,), config.image_token_id),
                         torch.tensor([config.vision_end_token_id]), text[8:]]).unsqueeze(0)
        made.append(CalibrationSample({
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(grid * grid, patch_dim, generator=g),
            "image_grid_thw": torch.tensor([[1, grid, grid]]),
        }, f"synthetic:{index}"))
    return CalibrationSet(made, "synthetic", n, 0)
