"""A whole training step of a GPT-2-shaped transformer, without and with each EMA.

On a GPU: GPT-2 small (12 layers, width 768, 50,257 tokens, 124M parameters),
batch 8 x 1,024 tokens under bf16 autocast. On a CPU, where that step takes
minutes, the same widths and vocabulary with 2 layers (54M parameters), batch
2 x 128 tokens, float32. The base optimizer is AdamW, fused where this torch
has it for the device, foreach otherwise. Each variant gets its own copy of
the model, from the same seed, and runs the same batch; steps are timed in turn,
one of each per round, and the EMA's share of a step is (step - step without
EMA) / step (a captured step's, against the captured step without EMA).

A variant is a name and a function ``(model, base optimizer) -> step
function``. On a GPU two more of ours run: ``overlap=True`` (the update on a
side stream, beside the next forward), and the whole step captured in a CUDA
graph and replayed, beside the same step captured without EMA (the base
optimizer then ``capturable=True``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import EMAOptimizer

MOMENTUM = 1e-3  # decay 0.999


@dataclass(frozen=True)
class Config:
    name: str
    layers: int
    width: int
    heads: int
    vocab: int
    ctx: int
    batch: int
    seq: int


CONFIGS = {
    "gpt2-small": Config("gpt2-small", 12, 768, 12, 50257, 1024, 8, 1024),
    "gpt2-small-2layers": Config("gpt2-small-2layers", 2, 768, 12, 50257, 1024, 2, 128),
    "tiny-gpt": Config("tiny-gpt", 1, 32, 2, 64, 16, 2, 16),  # checks the machinery, measures nothing
}


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.fc_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.attn(self.ln_1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2's layout: token and position embeddings, pre-norm blocks, a head tied to the embedding."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(cfg.vocab, cfg.width), nn.Embedding(cfg.ctx, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def base_optimizer(params, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has it for ``device``, else foreach."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=capturable)
    except RuntimeError:
        return torch.optim.AdamW(params, lr=1e-4, foreach=True, capturable=capturable)


def timm_ema_v3() -> type | str:
    """timm's ModelEmaV3, loaded from its file alone (timm's package imports torchvision);
    or why it is absent."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return "timm is not installed (pip install --no-deps timm)"
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    if not path.is_file():
        return f"timm has no {path.name}"
    module_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    if module_spec is None or module_spec.loader is None:
        return f"timm's {path.name} cannot be loaded as a module"
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelEmaV3


# --- variants: (model, base optimizer) -> what runs after the base step, or the wrapper to step ---

Variant = Callable[[nn.Module, torch.optim.Optimizer], tuple[torch.optim.Optimizer, Callable[[], None]]]


def _none(model, base):
    return base, lambda: None


def _triton_ema(model, base):
    return EMAOptimizer(base, momentum=MOMENTUM), lambda: None


def _triton_ema_overlap(model, base):
    return EMAOptimizer(base, momentum=MOMENTUM, overlap=True), lambda: None


def _triton_ema_captured(model, base):
    return EMAOptimizer(base, momentum=MOMENTUM, capturable=True), lambda: None


def _foreach_lerp(model, base):
    params = [p.detach() for p in model.parameters()]
    shadows = [p.clone() for p in params]
    return base, lambda: torch._foreach_lerp_(shadows, params, MOMENTUM)


def _nemo(model, base):  # NeMo's EMAOptimizer: two foreach passes
    params = [p.detach() for p in model.parameters()]
    shadows = [p.clone() for p in params]

    def after():
        torch._foreach_mul_(shadows, 1 - MOMENTUM)
        torch._foreach_add_(shadows, params, alpha=MOMENTUM)
    return base, after


def _timm(model, base):
    ema = timm_ema_v3()(model, decay=1 - MOMENTUM)
    return base, lambda: ema.update(model)


CAPTURED = " (captured)"  # the suffix of the variants whose step is captured in a CUDA graph and replayed


def variants() -> dict[str, tuple[Variant, str | None]]:
    """Name -> (variant, why it cannot run here or None); the step without EMA first."""
    timm = timm_ema_v3()
    gpu = None if torch.cuda.is_available() else "needs a CUDA device"
    return {
        "no EMA": (_none, None),
        "triton-ema": (_triton_ema, None),
        "triton-ema overlap": (_triton_ema_overlap, gpu),
        "foreach_lerp after step": (_foreach_lerp, None),
        "foreach mul_+add_ (NeMo)": (_nemo, None),
        "timm ModelEmaV3": (_timm, timm if isinstance(timm, str) else None),
        "no EMA" + CAPTURED: (_none, gpu),
        "triton-ema" + CAPTURED: (_triton_ema_captured, gpu),
    }


def make_step(variant: Variant, cfg: Config, device: torch.device,
              captured: bool = False) -> tuple[Callable[[], None], list[Tensor]]:
    """One training step of a fresh model (seed 0) on a fixed batch, with ``variant``'s EMA;
    and the model's parameters. ``captured``: the step is a CUDA graph's replay."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt, after = variant(model, base_optimizer(model.parameters(), device, capturable=captured))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        after()
        opt.zero_grad(set_to_none=not captured)  # a captured step keeps its grads' memory
    return (capture(step) if captured else step), list(model.parameters())


def capture(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph after three warm-up steps on a side stream (as
    ``torch.cuda.graphs`` asks); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def default_config(device: torch.device, tiny: bool) -> Config:
    return CONFIGS["tiny-gpt" if tiny else "gpt2-small" if device.type == "cuda" else "gpt2-small-2layers"]


def train_rows(cfg: Config, device: torch.device, reps: int, measure, interleaved, median) -> tuple[list[dict], dict]:
    """Rows of median step times and EMA shares, and the variants absent here with why."""
    found = variants()
    absent = {name: why for name, (_, why) in found.items() if why}
    names = [name for name in found if name not in absent]
    steps, params = zip(*(make_step(found[name][0], cfg, device, captured=name.endswith(CAPTURED)) for name in names))
    times = interleaved(list(steps), reps, measure)
    dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
    rows = [{"job": "train", "workload": cfg.name, "tensors": len(params[0]), "numel": sum(p.numel() for p in params[0]),
             "dtype": dtype, "shadow": "float32",
             "provider": name, "median_ms": median(t) * 1e3, "gbps": None, "peak_extra_mb": None}
            for name, t in zip(names, times)]
    base = {row["provider"]: row["median_ms"] for row in rows}
    for row in rows:  # a captured step against the captured step without EMA
        without = base["no EMA" + CAPTURED if row["provider"].endswith(CAPTURED) else "no EMA"]
        row["ema_share"] = (row["median_ms"] - without) / row["median_ms"]
    return rows, absent
