"""A residual MLP for low-dimensional (2-D toy) data."""

import torch.nn.functional as F
from torch import Tensor, nn

from zoo.config.schema import MLPConfig
from zoo.models.base import RowTangentModel
from zoo.models.dual import Value
from zoo.models.embeddings import (
    GuidanceInputs,
    LabelEmbedding,
    embed_conditions,
    time_and_guidance_embeddings,
)
from zoo.models.layers import Linear, SiLU


class ResidualBlock(nn.Module):
    """x + W2 silu(W1 silu(x) + E emb): the time/label embedding enters every block, so the
    velocity can change shape with t (a single input concatenation is too weak for this)."""

    def __init__(self, hidden: int, emb_dim: int) -> None:
        super().__init__()
        self.act = SiLU()
        self.fc1 = Linear(hidden, hidden)
        self.emb = Linear(emb_dim, hidden)
        self.fc2 = Linear(hidden, hidden)

    def forward(self, x: Value, emb: Value) -> Value:
        h = self.fc1(self.act(x)) + self.emb(emb)
        return x + self.fc2(self.act(h))


class MLP(RowTangentModel):
    """u(z, t, r, y) for data of shape (dim,): input projection, `depth` residual blocks, output.

    With cfg.v_head = k the last k blocks and the output layer are duplicated into a v-head."""

    def __init__(self, cfg: MLPConfig, data_shape: tuple[int, ...] = (2,), num_classes: int = 0) -> None:
        super().__init__(data_shape, num_classes)
        if len(self.data_shape) != 1:
            raise ValueError(
                f"MLP models vectors of shape (dim,), got data_shape={self.data_shape}; "
                "use model.arch='unet' or 'dit' for images"
            )
        dim, emb_dim = self.data_shape[0], cfg.time_embed_dim
        self.time_embed, self.guidance_embed = time_and_guidance_embeddings(
            cfg, emb_dim, emb_dim, num_classes
        )
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes else None
        self.input = Linear(dim, cfg.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(cfg.hidden, emb_dim) for _ in range(cfg.depth))
        self.act = SiLU()
        self.output = Linear(cfg.hidden, dim)
        self.shared = cfg.depth - cfg.v_head  # blocks before the heads split
        if cfg.v_head:
            self.v_blocks = nn.ModuleList(ResidualBlock(cfg.hidden, emb_dim) for _ in range(cfg.v_head))
            self.v_output = Linear(cfg.hidden, dim)

    @property
    def has_v_head(self) -> bool:
        return self.shared < len(self.blocks)

    def condition(
        self, t: Tensor, r: Tensor, y: Tensor | None, guidance: GuidanceInputs | None = None
    ) -> Tensor:
        emb = embed_conditions(
            self.time_embed, self.label_embed, t, r, y, self.num_classes, self.guidance_embed, guidance
        )
        return F.silu(emb)

    def trunk(self, z: Value, emb: Value) -> Value:
        x = self.input(z)
        for block in self.blocks[: self.shared]:
            x = block(x, emb)
        return x

    def head(self, x: Value, emb: Value, name: str) -> Value:
        blocks, output = (
            (self.blocks[self.shared :], self.output) if name == "u" else (self.v_blocks, self.v_output)
        )
        for block in blocks:
            x = block(x, emb)
        return output(self.act(x))
