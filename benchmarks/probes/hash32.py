"""Probe (docs/benchmarks.md, "Predictions and outcomes" item 2): the counter-based
noise hash written with int64 and with int32 arithmetic (the same 32-bit function, so
the same codes: checked) inside a compiled per-row quantizer of a (128, 12544) float32
operand; medians of 15 calls, 1 thread.

    python benchmarks/probes/hash32.py
"""

import time

import torch

torch.set_num_threads(1)
M32 = 0xFFFFFFFF


def u64(shape: tuple[int, ...], seed: torch.Tensor) -> torch.Tensor:
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.int64).view(shape)
    x = ((x * 0x27D4EB2D) & M32) ^ seed
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (x >> 16) ^ x
    return (x >> 8).to(torch.float32) * (2.0**-24)


def u32(shape: tuple[int, ...], seed: torch.Tensor) -> torch.Tensor:
    s = seed.to(torch.int32)  # low 32 bits, two's complement
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.int32).view(shape)
    x = (x * 0x27D4EB2D) ^ s
    x = (((x >> 16) & 0xFFFF) ^ x) * 0x45D9F3B  # logical shift = arithmetic shift, masked
    x = (((x >> 16) & 0xFFFF) ^ x) * 0x45D9F3B
    x = ((x >> 16) & 0xFFFF) ^ x
    return ((x >> 8) & 0xFFFFFF).to(torch.float32) * (2.0**-24)


def quantizer(noise):  # noqa: ANN001, ANN201
    def run(y: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = y.abs().amax(dim=1, keepdim=True) / 127
        return torch.floor(y / s + noise(y.shape, seed)).clamp(-127, 127).to(torch.int8), s
    return run


y = torch.randn(128, 16 * 784)
seed = torch.tensor(0xDEADBEEF, dtype=torch.int64)
a, b = torch.compile(quantizer(u64)), torch.compile(quantizer(u32))
print("equal noise eager", torch.equal(u64((1000003,), seed), u32((1000003,), seed)))
print("equal codes compiled", torch.equal(a(y, seed)[0], b(y, seed)[0]))
for fn, name in ((a, "int64"), (b, "int32"), (a, "int64"), (b, "int32")):
    ts = []
    for _ in range(15):
        start = time.perf_counter()
        fn(y, seed)
        ts.append(time.perf_counter() - start)
    print(name, round(sorted(ts)[7] * 1e3, 2), "ms")
