"""Attention recorded beside sdpa equals the model's own eager attention probabilities."""

import pytest
import torch

from atv_prune.model.attention import recording_attention
from atv_prune.model.capture import capture_sample, non_block_modules_on, run_block
from atv_prune.model.layout import resolve
from tiny_models import build_tiny_model, make_inputs


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3"])
@torch.no_grad()
def test_recorded_attention_matches_eager_probabilities(name: str) -> None:
    model = build_tiny_model(name)
    model.set_attn_implementation("eager")  # so the captured masks are explicit, as eager needs them
    layout = resolve(model)
    blocks = layout.blocks(model)
    inputs = layout.prepare_inputs(make_inputs(model, name, seed=1))
    with non_block_modules_on(model, blocks, "cpu"):
        sample = capture_sample(model, layout, inputs, "s", "cpu", "cpu")
    text = ~sample.visual
    for index in (0, len(blocks) - 1):
        with recording_attention(blocks[index], text) as record:
            recorded_output = run_block(blocks[index], sample, index, sample.hidden)
        plain_output = run_block(blocks[index], sample, index, sample.hidden)
        torch.testing.assert_close(recorded_output, plain_output)  # the block output is unchanged (sdpa vs eager)

        eager_weights: list[torch.Tensor] = []
        attention = next(m for n, m in blocks[index].named_modules() if n.endswith("self_attn"))
        hook = attention.register_forward_hook(lambda m, a, out, sink=eager_weights: sink.append(out[1]))
        configs = {id(m.config): m.config for m in blocks[index].modules() if hasattr(m, "config")}
        try:
            run_block(blocks[index], sample, index, sample.hidden)
        finally:
            hook.remove()
        probs = eager_weights[0][0].float()  # (heads, q, k)
        torch.testing.assert_close(record.from_text, probs[:, text].mean(dim=(0, 1)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(record.from_last, probs[:, -1].mean(dim=0), atol=1e-5, rtol=1e-4)
        assert not any(isinstance(c._attn_implementation, str) and "atv" in c._attn_implementation
                       for c in configs.values())


def test_config_is_restored_after_an_error() -> None:
    model = build_tiny_model("llava")
    block = resolve(model).blocks(model)[0]
    before = block.self_attn.config._attn_implementation
    with pytest.raises(RuntimeError):
        with recording_attention(block, torch.ones(3, dtype=torch.bool)):
            raise RuntimeError("boom")
    assert block.self_attn.config._attn_implementation == before


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
@torch.no_grad()
def test_implicit_causal_mask_gives_the_same_record_as_an_explicit_one(name: str) -> None:
    records = []
    for implementation in ("sdpa", "eager"):  # sdpa captures no mask (causal), eager an explicit one
        model = build_tiny_model(name)
        model.set_attn_implementation(implementation)
        layout = resolve(model)
        blocks = layout.blocks(model)
        with non_block_modules_on(model, blocks, "cpu"):
            sample = capture_sample(model, layout, layout.prepare_inputs(make_inputs(model, name, seed=2)),
                                    "s", "cpu", "cpu")
        with recording_attention(blocks[0], ~sample.visual) as record:
            run_block(blocks[0], sample, 0, sample.hidden)
        records.append(record)
    assert records[0].calls == records[1].calls == 1
    torch.testing.assert_close(records[0].from_text, records[1].from_text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(records[0].from_last, records[1].from_last, atol=1e-6, rtol=1e-5)
