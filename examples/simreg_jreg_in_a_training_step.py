"""Add SimReg and JREG to any PyTorch training step (no Megatron needed).

    python examples/simreg_jreg_in_a_training_step.py
"""

import torch
import torch.nn as nn

from megatron_simreg import JRegConfig, SimRegConfig, jreg_penalty, layer_angular_distances, simreg_loss

torch.manual_seed(0)
vocab, hidden, layers, b, s = 100, 64, 3, 4, 32
embed = nn.Embedding(vocab, hidden)
blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()) for _ in range(layers))
final_norm, head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab)
params = [p for m in (embed, blocks, final_norm, head) for p in m.parameters()]
opt = torch.optim.AdamW(params, lr=1e-3)
simreg, jreg = SimRegConfig(weight=0.1), JRegConfig(weight=3.0)

tokens = torch.randint(0, vocab, (b, s + 1))
inputs, labels = tokens[:, :-1], tokens[:, 1:]            # labels [b, s]: the next token
for step in range(5):
    x = embed(inputs)                                      # [b, s, h]
    states = [x]                                           # h_0: input of the first layer
    for block in blocks:
        x = x + block(x)
        states.append(x)                                   # h_l: output of layer l
    final = final_norm(x)                                  # what the LM head classifies
    lm = nn.functional.cross_entropy(head(final).flatten(0, 1), labels.flatten())
    reg_s = simreg_loss(final, labels, temperature=simreg.temperature)
    reg_j = jreg_penalty(layer_angular_distances(states), jreg.weighting, jreg.power)
    loss = lm + simreg.weight * reg_s + jreg.weight * reg_j
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: lm {lm.item():.4f}  simreg {reg_s.item():.4f}  jreg {reg_j.item():.4f}")
