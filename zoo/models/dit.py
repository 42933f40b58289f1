"""DiT (Peebles & Xie) with adaLN-Zero blocks, conditioned on t, h = t - r and a class label.

Patchify -> fixed 2-D sin-cos position embedding -> `depth` blocks -> adaLN final layer ->
unpatchify.  The conditioning vector is emb(t) + emb(t - r) + emb(y) (model.time_inputs picks the
times; model.guidance_inputs adds the guidance's embedding); every block regresses
shift/scale/gate triples for its attention and MLP branches from it.  All gates and the output
layer start at zero ("adaLN-Zero"): each block starts as the identity and the model's output
is exactly 0, which DiT found to train best.

With model.v_head = k the last k blocks and the final layer are duplicated into iMF's auxiliary
velocity head (as iMF's DiT does): the first depth - k blocks are shared.
"""

import torch
from torch import Tensor, nn

from zoo.config.schema import DiTConfig
from zoo.models.base import RowTangentModel
from zoo.models.dual import Value
from zoo.models.embeddings import (
    GuidanceInputs,
    LabelEmbedding,
    embed_conditions,
    time_and_guidance_embeddings,
)
from zoo.models.layers import GELU, Attention, Conv2d, LayerNorm, Linear, SiLU

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


def modulate(x: Value, shift: Value, scale: Value) -> Value:
    """x * (1 + scale) + shift, with per-sample (B, hidden) shift and scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden, heads)
        self.norm2 = LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            Linear(hidden, mlp_hidden),
            GELU(approximate="tanh"),
            Linear(mlp_hidden, hidden),
        )
        self.modulation = nn.Sequential(SiLU(), Linear(hidden, 6 * hidden))

    def forward(self, x: Value, c: Value) -> Value:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm = LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Sequential(SiLU(), Linear(hidden, 2 * hidden))
        self.linear = Linear(hidden, out_features)

    def forward(self, x: Value, c: Value) -> Value:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


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
        self.time_embed, self.guidance_embed = time_and_guidance_embeddings(
            cfg, cfg.hidden, TIME_FREQ_DIM, num_classes
        )
        self.label_embed = LabelEmbedding(num_classes, cfg.hidden) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.hidden, p * p * channels)
        self.shared = cfg.depth - cfg.v_head  # blocks before the heads split
        if cfg.v_head:
            self.v_blocks = nn.ModuleList(
                DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.v_head)
            )
            self.v_final = FinalLayer(cfg.hidden, p * p * channels)
        self._init_weights()

    @property
    def has_v_head(self) -> bool:
        return self.shared < len(self.blocks)

    def head_modules(self, name: str) -> tuple[list[DiTBlock], FinalLayer]:
        if name == "u":
            return list(self.blocks[self.shared :]), self.final
        return list(self.v_blocks), self.v_final

    def _init_weights(self) -> None:
        # DiT's initialisation: xavier linears, small embedders, zero modulation and output.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        embedders = self.time_embed.embedders()
        if self.guidance_embed is not None:
            embedders += self.guidance_embed.embedders()
        for embedder in embedders:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        heads = ["u", "v"] if self.has_v_head else ["u"]
        blocks = list(self.blocks) + (list(self.v_blocks) if self.has_v_head else [])
        for block in blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for final in (self.head_modules(name)[1] for name in heads):
            for layer in (final.modulation[-1], final.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Value) -> Value:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        b = x.shape[0]
        p, (gh, gw), c = self.patch_size, self.grid, self.data_shape[0]
        x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)

    def condition(
        self, t: Tensor, r: Tensor, y: Tensor | None, guidance: GuidanceInputs | None = None
    ) -> Tensor:
        return embed_conditions(
            self.time_embed, self.label_embed, t, r, y, self.num_classes, self.guidance_embed, guidance
        )

    def trunk(self, z: Value, c: Value) -> Value:
        x = self.patch_embed(z).flatten(2).transpose(1, 2) + self.pos_embed.to(z.dtype)  # (B, N, hidden)
        for block in self.blocks[: self.shared]:
            x = block(x, c)
        return x

    def head(self, x: Value, c: Value, name: str) -> Value:
        blocks, final = self.head_modules(name)
        for block in blocks:
            x = block(x, c)
        return self.unpatchify(final(x, c))
