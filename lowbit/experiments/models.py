"""Plain ``nn.Module`` models for the experiments.

Every GEMM is an ordinary ``nn.Linear`` or ``nn.Conv2d`` so that the library can swap them for
quantized versions afterwards; normalisation layers are the stock BatchNorm/LayerNorm.
"""

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.attention_modules import ScaledDotProductAttention

# --------------------------------------------------------------------------- digits (1×8×8)


class DigitsMLP(nn.Module):
    """64 → hidden → hidden → 10 multilayer perceptron with ReLU, for 8×8 digits."""

    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, 1, 8, 8) or (N, 64) -> (N, num_classes)


class DigitsCNN(nn.Module):
    """Small conv net for 1×8×8 digits: two 3×3 convs, 2×2 max-pool, one 3×3 conv, GAP, linear."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *block(1, width),  # (N, w, 8, 8)
            *block(width, 2 * width),  # (N, 2w, 8, 8)
            nn.MaxPool2d(2),  # (N, 2w, 4, 4)
            *block(2 * width, 2 * width),  # (N, 2w, 4, 4)
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (N, 2w)
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, num_classes)


# --------------------------------------------------------------------------- pre-activation ResNet


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 with a parameter-free shortcut.

    When the block downsamples or widens, the shortcut subsamples with stride and zero-pads
    the extra channels (option A of He et al., 2016, as in the CIFAR ResNet-20/56), so every
    weighted layer of the network is counted by its depth.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"widths must not decrease, got {c_in} -> {c_out}")
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.stride, self.extra_channels = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (N, C_in, ceil(H/s), ceil(W/s))
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # (N, C_out, H', W')
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))  # (N, C_out, H', W')
        out = self.conv2(F.relu(self.bn2(out)))  # (N, C_out, H', W')
        return out + self.shortcut(x)


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet of depth ``6n + 2`` (20 → n=3, 56 → n=9).

    A 3×3 stem conv, three stages of ``n`` :class:`PreActBlock` with stride 2 between stages,
    a final BN-ReLU, global average pooling and a linear head: ``6n + 1`` convs plus one linear
    layer make the depth. Works for any input size ≥ 8 (e.g. 28×28 and 32×32).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 56, ...), got {depth}")
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(n):
                blocks.append(PreActBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))  # (N, widths[2], H/4, W/4)
        out = F.relu(self.bn(out)).mean(dim=(2, 3))  # (N, widths[2])
        return self.head(out)  # (N, num_classes)


def preact_resnet20(**kw: Any) -> PreActResNet:
    """Pre-activation ResNet-20 (n = 3); keyword arguments go to :class:`PreActResNet`."""
    return PreActResNet(20, **kw)


def preact_resnet56(**kw: Any) -> PreActResNet:
    """Pre-activation ResNet-56 (n = 9); keyword arguments go to :class:`PreActResNet`."""
    return PreActResNet(56, **kw)


# --------------------------------------------------------------------------- TinyGPT


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``nn.Linear`` for q, k, v and one for the output;
    the attention itself through a :class:`~lowbit.attention_modules.ScaledDotProductAttention`
    (``F.scaled_dot_product_attention`` as a module, no parameters), which ``lowbit.convert``
    swaps for its low-bit version."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)
        self.sdpa = ScaledDotProductAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).split(c, dim=2)  # 3 × (B, T, C)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = self.sdpa(  # (B, nh, T, hs)
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.resid_drop(self.proj(y))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class TinyGPT(nn.Module):
    """Decoder-only byte-level transformer (GPT-2 style, pre-LayerNorm, untied head).

    ``forward(idx, targets=None)`` returns ``(logits, loss)``; ``loss`` is the mean next-token
    cross-entropy when ``targets`` is given and ``None`` otherwise.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = idx.shape  # (B, T)
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(b * t, -1).float(), targets.reshape(b * t))
        return logits, loss


# --------------------------------------------------------------------------- registry

_BUILDERS: dict[str, dict[str, Callable[..., nn.Module]]] = {
    "digits": {"mlp": DigitsMLP, "cnn": DigitsCNN},
    "fashion-mnist": {"preact-resnet20": preact_resnet20, "preact-resnet56": preact_resnet56},
    "text": {"gpt": TinyGPT},
}
MODELS: dict[str, tuple[str, ...]] = {task: tuple(names) for task, names in _BUILDERS.items()}
DEFAULT_MODEL: dict[str, str] = {
    "digits": "mlp",
    "fashion-mnist": "preact-resnet20",
    "text": "gpt",
}


# --------------------------------------------------------------------------- constructor arguments
# Each settable argument: (check, what it must be). A check returns the value to use
# (ints given for floats become floats) or None when the value is not allowed.


def _int_at_least(low: int) -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> Any:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= low else None
    return check, f"an integer ≥ {low}"


def _probability() -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> Any:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
        return float(v) if ok else None
    return check, "a number in [0, 1)"


def _fixed(value: Any, why: str) -> tuple[Callable[[Any], Any], str]:
    """An argument the task decides (its class count, channels, vocabulary)."""
    return (lambda v: v if type(v) is type(value) and v == value else None), f"{value!r} ({why})"


def _widths() -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> Any:
        v = tuple(v) if isinstance(v, list) else v  # a config.json holds a list
        ok = (isinstance(v, tuple) and len(v) == 3 and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in v)
            and v[0] <= v[1] <= v[2])
        return v if ok else None
    return check, "3 non-decreasing integers ≥ 1, comma-separated (e.g. 16,32,64)"


_TEN_CLASSES = _fixed(10, "the task's class count")
_PREACT = {"num_classes": _TEN_CLASSES, "in_channels": _fixed(1, "grayscale images"),
           "widths": _widths()}
MODEL_ARGS: dict[str, dict[str, dict[str, tuple[Callable[[Any], Any], str]]]] = {
    "digits": {"mlp": {"hidden": _int_at_least(1), "num_classes": _TEN_CLASSES},
               "cnn": {"width": _int_at_least(1), "num_classes": _TEN_CLASSES}},
    "fashion-mnist": {"preact-resnet20": _PREACT, "preact-resnet56": _PREACT},
    "text": {"gpt": {"vocab_size": _fixed(256, "byte-level: 256 symbols"),
                     "block_size": _int_at_least(1), "n_layer": _int_at_least(1),
                     "n_head": _int_at_least(1), "n_embd": _int_at_least(1),
                     "dropout": _probability()}},
}


def check_model_args(task: str, name: str, kw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check keyword arguments of model ``name`` of ``task`` against its constructor:
    known names (:data:`MODEL_ARGS`), types, ranges, and the values the task decides
    (``num_classes``, ``in_channels``, ``vocab_size`` may only be given as the task's).

    Returns the arguments to pass (ints given for float arguments become floats).
    Raises ``ValueError`` whose one line starts with ``prefix`` + the argument's name.
    """
    allowed = MODEL_ARGS[task][name]
    out = {}
    for key, value in kw.items():
        if key not in allowed:
            raise ValueError(f"{prefix}{key} is not an argument of model {name!r}; "
                             f"allowed: {', '.join(allowed)}")
        check, what = allowed[key]
        out[key] = check(value)
        if out[key] is None:
            raise ValueError(f"{prefix}{key} must be {what} for model {name!r}, got {value!r}")
    if name == "gpt":
        defaults = inspect.signature(TinyGPT).parameters
        n_embd = out.get("n_embd", defaults["n_embd"].default)
        n_head = out.get("n_head", defaults["n_head"].default)
        if n_embd % n_head:
            raise ValueError(f"{prefix}n_embd ({n_embd}) must be divisible by n_head ({n_head}) "
                             f"for model {name!r}")
    return out


def build_model(task: str, name: str | None = None, **kw: Any) -> nn.Module:
    """Build model ``name`` for ``task`` (``DEFAULT_MODEL[task]`` when ``name`` is None).

    Allowed names per task are in :data:`MODELS`; keyword arguments go to the constructor
    after :func:`check_model_args`. Raises ``ValueError`` listing the allowed tasks or
    names, or naming the bad argument.
    """
    if not isinstance(task, str) or task not in _BUILDERS:  # (a list: unhashable)
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(_BUILDERS)}")
    name = DEFAULT_MODEL[task] if name is None else name
    if not isinstance(name, str) or name not in _BUILDERS[task]:
        raise ValueError(
            f"unknown model {name!r} for task {task!r}; allowed: {', '.join(MODELS[task])}"
        )
    return _BUILDERS[task][name](**check_model_args(task, name, kw, "model argument "))
