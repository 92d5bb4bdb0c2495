"""The residual key/value branch (IKI) and its injection into a frozen open_clip model.

In each chosen attention layer, with Q_e, K_e, V_e the frozen projections of the tokens:

    O = softmax(Q_e K_e^T / sqrt(d_h)) V_e  +  w * softmax(Q_e K_r^T / sqrt(d_h)) V_r

followed by the frozen ``out_proj``. K_r, V_r (l x d, per task) live directly in the projected
space and are split into heads like the frozen K, V; the two softmaxes are separate, so the
frozen attention is untouched and no new queries or tokens are added. The branch ignores the
text tower's causal mask (as the authors' code does). V_r starts at zero (the model is then
exactly the frozen CLIP); K_r starts uniform in (-1, 1) so that its gradient is not blocked.

The injection follows peft's pattern: each target ``nn.MultiheadAttention`` is replaced in
place by a ``ResidualKVAttention`` that keeps the original as ``base_layer`` (open_clip's
``ResidualAttentionBlock`` calls ``attn(q, k, v, need_weights=False, attn_mask=...)``, and
``nn.MultiheadAttention`` never calls ``out_proj.forward``, so the whole attention is wrapped).
Per-task parameters sit in ``nn.ParameterList``s, so the pool grows as tasks arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

TOWERS = ("vision", "text")
# "residual": DIKI's separate-softmax branch. "prefix": the same tokens prepended to the frozen keys
# and values inside one softmax (prefix tuning / L2P-style prompting), kept as a baseline: it is
# the interference DIKI removes, since the prompts then reshape the frozen attention itself.
BRANCH_MODES = ("residual", "prefix")


@dataclass
class Route:
    """Which task's branch each sample uses, and with which gate.

    ``task`` and ``gate`` are either scalars (one task / one gate for the whole batch) or 1-D
    tensors with one entry per sample. A route of ``None`` (see ``RoutingState``) means the
    branch is off and the frozen attention runs alone, bit for bit.
    """

    task: int | torch.Tensor
    gate: float | torch.Tensor = 1.0
    _groups: tuple[list[int], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def groups(self) -> tuple[list[int], torch.Tensor]:
        """(distinct task indices, per-sample position in that list); computed once per forward."""
        if self._groups is None:
            uniq, inverse = torch.unique(self.task, return_inverse=True)
            self._groups = ([int(t) for t in uniq.tolist()], inverse)
        return self._groups


@dataclass
class RoutingState:
    """Shared by every wrapped layer of one model: the active route of each tower."""

    routes: dict[str, Route | None] = field(default_factory=lambda: {t: None for t in TOWERS})


class ResidualKVAttention(nn.Module):
    """Drop-in replacement for a self-attention ``nn.MultiheadAttention`` with a task pool."""

    def __init__(
        self,
        base_layer: nn.MultiheadAttention,
        tower: str,
        prompt_length: int,
        state: RoutingState,
        mode: str = "residual",
    ) -> None:
        super().__init__()
        if mode not in BRANCH_MODES:
            raise ValueError(f"unknown branch mode {mode!r}; choose one of {BRANCH_MODES}")
        self.mode = mode
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(base_layer).__name__}")
        if not base_layer._qkv_same_embed_dim or base_layer.in_proj_weight is None:
            raise TypeError("only self-attention with a packed in_proj (q, k, v of one width) can be injected")
        self.base_layer = base_layer
        self.tower = tower
        self.prompt_length = prompt_length
        self.embed_dim = base_layer.embed_dim
        self.num_heads = base_layer.num_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.batch_first = base_layer.batch_first
        self.keys = nn.ParameterList()
        self.values = nn.ParameterList()
        # Plain attribute, not a submodule: every layer of a model shares the same object.
        self.__dict__["_state"] = state

    @property
    def num_tasks(self) -> int:
        return len(self.keys)

    def add_task(self, generator: torch.Generator | None = None) -> None:
        ref = self.base_layer.in_proj_weight
        key = torch.empty(self.prompt_length, self.embed_dim, dtype=torch.float32)
        key.uniform_(-1.0, 1.0, generator=generator)
        value = torch.zeros(self.prompt_length, self.embed_dim, dtype=torch.float32)
        # Frozen until a training run unfreezes the one task it learns.
        self.keys.append(nn.Parameter(key.to(ref.device), requires_grad=False))
        self.values.append(nn.Parameter(value.to(ref.device), requires_grad=False))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        route = self._state.routes.get(self.tower)
        if route is None or self.num_tasks == 0 or need_weights or key_padding_mask is not None:
            return self.base_layer(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                **kwargs,
            )
        x = query if self.batch_first else query.transpose(0, 1)  # (B, N, D)
        bsz, n_tok, dim = x.shape
        base = self.base_layer
        q, k, v = F.linear(x, base.in_proj_weight, base.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (
            t.view(bsz, n_tok, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )  # (B, h, N, dh)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention: True = masked; SDPA: True = attend
        elif attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        kr, vr = self._gather(route, bsz, q.dtype)  # (B or 1, h, l, dh)
        if self.mode == "prefix":
            out = self._prefix_attention(q, k, v, kr, vr, attn_mask)
            out = out.transpose(1, 2).reshape(bsz, n_tok, dim)
            out = F.linear(out, base.out_proj.weight, base.out_proj.bias)
            return (out if self.batch_first else out.transpose(0, 1)), None
        frozen = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

        residual = F.scaled_dot_product_attention(q, kr.expand(bsz, -1, -1, -1), vr.expand(bsz, -1, -1, -1))
        gate = route.gate
        if isinstance(gate, torch.Tensor):
            gate = gate.to(device=q.device, dtype=q.dtype).view(-1, 1, 1, 1)
        out = frozen + gate * residual
        out = out.transpose(1, 2).reshape(bsz, n_tok, dim)
        out = F.linear(out, base.out_proj.weight, base.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _prefix_attention(self, q, k, v, kr, vr, attn_mask):
        bsz = q.shape[0]
        k_all = torch.cat([k, kr.expand(bsz, -1, -1, -1)], dim=2)
        v_all = torch.cat([v, vr.expand(bsz, -1, -1, -1)], dim=2)
        if attn_mask is not None:
            # Every token may attend to the prompts: pad the mask's key axis.
            fill = True if attn_mask.dtype == torch.bool else 0.0
            attn_mask = F.pad(attn_mask, (0, self.prompt_length), value=fill)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask)

    def _gather(self, route: Route, bsz: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        task = route.task
        if isinstance(task, torch.Tensor) and task.ndim > 0:
            if task.numel() != bsz:
                raise ValueError(f"route has {task.numel()} task indices for a batch of {bsz}")
            idx, inverse = route.groups()
            self._check(idx)
            inverse = inverse.to(self.keys[0].device)
            keys = torch.stack([self.keys[i] for i in idx])[inverse]  # (B, l, D)
            values = torch.stack([self.values[i] for i in idx])[inverse]
        else:
            t = int(task)
            self._check([t])
            keys, values = self.keys[t][None], self.values[t][None]  # (1, l, D)
        split = (keys.shape[0], self.prompt_length, self.num_heads, self.head_dim)
        return (
            keys.to(dtype).view(split).transpose(1, 2),
            values.to(dtype).view(split).transpose(1, 2),
        )

    def _check(self, idx: list[int]) -> None:
        for t in idx:
            if not 0 <= t < self.num_tasks:
                raise IndexError(f"task index {t} out of range: this layer holds {self.num_tasks} tasks")


def _tower_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The residual-attention blocks of both towers of an open_clip model, or a clear error."""
    import open_clip

    visual = getattr(model, "visual", None)
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        raise TypeError("the image tower is a ModifiedResNet: the residual K/V branch needs a ViT image tower")
    if visual is None or not isinstance(getattr(visual, "transformer", None), open_clip.transformer.Transformer):
        kind = type(visual).__name__ if visual is not None else "missing"
        raise TypeError(f"unsupported image tower ({kind}): expected open_clip's VisionTransformer")
    text_transformer = getattr(model, "transformer", None)
    if not isinstance(text_transformer, open_clip.transformer.Transformer):
        text = getattr(model, "text", None)
        kind = type(text).__name__ if text is not None else type(text_transformer).__name__
        raise TypeError(
            f"unsupported text tower ({kind}): expected open_clip's own text transformer "
            "(Hugging Face text towers are not supported)"
        )
    return {"vision": visual.transformer.resblocks, "text": text_transformer.resblocks}


def resolve_layers(
    requested: tuple[int, ...] | None, num_layers: int, default_count: int, tower: str
) -> tuple[int, ...]:
    if requested is None:
        return tuple(range(min(default_count, num_layers)))
    layers = tuple(sorted(set(int(i) for i in requested)))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{tower} tower has {num_layers} layers; cannot inject into layers {bad}")
    return layers


def inject_residual_kv(
    model: nn.Module,
    prompt_length: int,
    vision_layers: tuple[int, ...] | None = None,
    text_layers: tuple[int, ...] | None = None,
    default_layer_count: int = 8,
    mode: str = "residual",
) -> tuple[RoutingState, dict[str, dict[int, ResidualKVAttention]]]:
    """Replace the attention of the chosen blocks of both towers in place; freeze the base.

    Returns the shared routing state and the injected layers, by tower and block index.
    """
    blocks = _tower_blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    state = RoutingState()
    injected: dict[str, dict[int, ResidualKVAttention]] = {}
    for tower, requested in (("vision", vision_layers), ("text", text_layers)):
        resblocks = blocks[tower]
        layers = resolve_layers(requested, len(resblocks), default_layer_count, tower)
        injected[tower] = {}
        for i in layers:
            block = resblocks[i]
            attn = getattr(block, "attn", None)
            if isinstance(attn, ResidualKVAttention):
                raise ValueError(f"{tower} block {i} already carries a residual K/V branch")
            if not isinstance(attn, nn.MultiheadAttention) or getattr(block, "ln_1_kv", None) is not None:
                raise TypeError(
                    f"{tower} block {i} has an unsupported attention ({type(attn).__name__}); "
                    "expected open_clip's ResidualAttentionBlock with nn.MultiheadAttention"
                )
            wrapped = ResidualKVAttention(attn, tower, prompt_length, state, mode)
            block.attn = wrapped
            injected[tower][i] = wrapped
    return state, injected
