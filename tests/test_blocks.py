"""Block discovery and true-sequential grouping read the model's structure, not its name."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hawqtool.blocks import capture_block_inputs, find_blocks, run_block, sequential_groups
from hawqtool.models import quantizable_layers


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def test_blocks_and_groups_of_a_llama():
    model = tiny()
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 3
    batches = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(3)]
    inputs = capture_block_inputs(model, blocks[0], batches)
    assert len(inputs.hidden) == 3 and inputs.hidden[0].shape == (2, 12, 32)
    assert "position_embeddings" in inputs.kwargs[0]  # rotary cos/sin computed by the model itself
    layers = {n[len("model.layers.1."):]: m for n, m in quantizable_layers(model).items()
              if n.startswith("model.layers.1.")}
    for _ in range(5):  # identity of inputs, not Python ids that can be reused, decides the groups
        groups = sequential_groups(blocks[1], layers, inputs)
        assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_running_blocks_reproduces_the_model():
    model = tiny()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, 64, (2, 10))
    inputs = capture_block_inputs(model, blocks[0], [{"input_ids": ids}])
    with torch.no_grad():
        for b in blocks:
            inputs.hidden = [run_block(b, inputs, 0)]
        ref = model.model(input_ids=ids).last_hidden_state
        ours = model.model.norm(inputs.hidden[0])
    assert torch.allclose(ours, ref, atol=1e-6)
