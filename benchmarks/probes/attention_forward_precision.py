"""How far lowbit's 8-bit attention forward is from float attention, per forward spec.

The recipes quantize Q, K, V and the probabilities P̃ per tensor (one scale for every
head): P̃'s scale is set by its largest entry (1 in a causal mask's first row), so a
head's small probabilities round to zero. Per-row activation scales (one per batch,
head and query token) avoid that. Relative error ‖O − O_float‖ / ‖O_float‖ on random
(2, 4, 128, 64) causal inputs, 1 thread.

    python benchmarks/probes/attention_forward_precision.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lowbit
from lowbit import FQTConfig, OperandSpec

torch.set_num_threads(1)
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 128, 64) for _ in range(3))
ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
for label, cfg in (("fqt-psq-8 (activation per tensor)", FQTConfig.from_recipe("fqt-psq-8")),
                   ("fqt-psq-8, activation=OperandSpec(8, 'row')",
                    FQTConfig.from_recipe("fqt-psq-8", activation=OperandSpec(8, "row")))):
    out = lowbit.functional.scaled_dot_product_attention(q, k, v, is_causal=True, state=cfg)
    print(f"{label}: relative error vs float {float((out - ref).norm() / ref.norm()):.4f}")
