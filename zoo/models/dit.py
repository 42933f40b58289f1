"""DiT (Peebles & Xie) with adaLN-Zero blocks, conditioned on t, h = t - r and a class label.

Patchify -> fixed 2-D sin-cos position embedding -> `depth` blocks -> adaLN final layer ->
unpatchify.  The conditioning vector is emb(t) + emb(t - r) + emb(y); every block regresses
shift/scale/gate triples for its attention and MLP branches from it.  All gates and the output
layer start at zero ("adaLN-Zero"): each block starts as the identity and the model's output
is exactly 0, which DiT found to train best.
"""

import torch
from torch import Tensor, nn

from zoo.config.schema import DiTConfig
from zoo.models import dual as D
from zoo.models.base import RowTangentModel
from zoo.models.embeddings import LabelEmbedding, TimeIntervalEmbedding, embed_conditions
from zoo.models.layers import Attention, Conv2d, LayerNorm

TIME_FREQ_DIM = 256  # sinusoid width of DiT's timestep embedder


def sincos_position_embedding(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """(grid_h * grid_w, dim): half the channels encode the row, half the column (row-major)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden % 4 == 0, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(positions: Tensor) -> Tensor:
        angles = positions.to(torch.float64)[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([axis(rows.flatten()), axis(cols.flatten())], dim=1).float()


def modulate(x: D.Value, shift: D.Value, scale: D.Value) -> D.Value:
    """x * (1 + scale) + shift, with per-sample (B, hidden) shift and scale broadcast over tokens."""
    return D.add(D.mul(x, per_token(D.add(scale, 1.0))), per_token(shift))


def per_token(x: D.Value) -> D.Value:
    """(B, hidden) -> (B, 1, hidden), to broadcast over the tokens."""
    return D.lift(lambda a: a[:, None], x)


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden, heads)
        self.norm2 = LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        # forward() applies the Linears of `mlp` and `modulation` itself, through zoo.models.dual
        # ops (SiLU, tanh-GELU); the containers keep DiT's parameter names.

    def forward(self, x: D.Value, c: D.Value) -> D.Value:
        modulation = D.linear(self.modulation[1], D.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = D.chunk(modulation, 6, dim=1)
        h = D.multi_head_attention(self.attn, modulate(D.layer_norm(self.norm1, x), shift_a, scale_a))
        x = D.add(x, D.mul(per_token(gate_a), h))
        h = modulate(D.layer_norm(self.norm2, x), shift_m, scale_m)
        h = D.linear(self.mlp[2], D.gelu_tanh(D.linear(self.mlp[0], h)))
        return D.add(x, D.mul(per_token(gate_m), h))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm = LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: D.Value, c: D.Value) -> D.Value:
        shift, scale = D.chunk(D.linear(self.modulation[1], D.silu(c)), 2, dim=1)
        return D.linear(self.linear, modulate(D.layer_norm(self.norm, x), shift, scale))


class DiT(RowTangentModel):
    """u(z, t, r, y) on images or latents (C, H, W) with H, W divisible by the patch size."""

    def __init__(self, cfg: DiTConfig, data_shape: tuple[int, ...], num_classes: int = 0) -> None:
        super().__init__(data_shape, num_classes)
        if len(self.data_shape) != 3:
            raise ValueError(
                f"DiT models images/latents of shape (channels, height, width), got data_shape="
                f"{self.data_shape}; use model.arch='mlp' for vector data"
            )
        channels, height, width = self.data_shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}")
        self.patch_size = p
        self.grid = (height // p, width // p)
        self.patch_embed = Conv2d(channels, cfg.hidden, kernel_size=p, stride=p)
        self.register_buffer(
            "pos_embed", sincos_position_embedding(cfg.hidden, *self.grid)[None], persistent=False
        )
        self.time_embed = TimeIntervalEmbedding(cfg.hidden, freq_dim=TIME_FREQ_DIM)
        self.label_embed = LabelEmbedding(num_classes, cfg.hidden) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.hidden, p * p * channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialisation: xavier linears, small embedders, zero modulation and output.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for embedder in (self.time_embed.time, self.time_embed.interval):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        b = x.shape[0]
        p, (gh, gw), c = self.patch_size, self.grid, self.data_shape[0]
        x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)

    def condition(self, t: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
        return embed_conditions(self.time_embed, self.label_embed, t, r, y, self.num_classes)

    def body(self, z: D.Value, c: D.Value) -> D.Value:
        x = D.lift(lambda a: a.flatten(2).transpose(1, 2), D.conv2d(self.patch_embed, z))
        x = D.add(x, self.pos_embed.to(D.primal(z).dtype))
        for block in self.blocks:
            x = block(x, c)
        return D.lift(self.unpatchify, self.final(x, c))
