"""EquiAV model: encoders, augmentation encoder, transformation predictor,
projection heads (SPEC 2-6) and the fine-tuning classifier (SPEC 11).

Paper: Kim et al., "EquiAV: Leveraging Equivariance for Audio-Visual
Contrastive Learning", ICML 2024. Read top to bottom it follows the paper's
ladder: PatchEmbed -> Attention -> MLP -> Block -> ViTEncoder (f_m),
AugEncoder (e_m) -> TransformationPredictor (u_m), ProjectionHead (g_m),
EquiAV (the pretraining forward), EquiAVClassifier. Loading the authors' and
MAE checkpoints (SPEC 10) is convert.py's job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import AUDIO_DIM, VISUAL_DIM, audio_identity, visual_identity

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Sizes of every module. Defaults are the paper's ViT-B/16 model."""

    audio_length: int = 1024   # T, spectrogram frames (10 ms each)
    mel_bins: int = 128        # F, mel filterbank bins
    image_size: int = 224      # H = W of the frame
    patch_size: int = 16
    embed_dim: int = 768       # D
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    aug_hidden: int = 256      # width of the augmentation encoder e_m (SPEC 3)
    pred_heads: int = 8        # cross-attention heads of the predictor u_m (SPEC 4)
    pred_head_dim: int = 64
    proj_hidden: int = 2048    # projection heads g_m (SPEC 5)
    proj_dim: int = 512
    drop_path: float = 0.0     # stochastic depth, maximum rate (last block)

    def __post_init__(self):
        p = self.patch_size
        for name in ("audio_length", "mel_bins", "image_size"):
            if getattr(self, name) % p:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} is not a multiple "
                                 f"of patch_size={p}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim={self.embed_dim} must be a multiple of 4 for the 2-D "
                             "sin-cos position embedding (SPEC 2)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path} must be in [0, 1)")

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(rows, cols) = (frequency patches, time patches) of the audio encoder."""
        return self.mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def visual_grid(self) -> tuple[int, int]:
        """(rows, cols) of the visual encoder's patch grid."""
        return self.image_size // self.patch_size, self.image_size // self.patch_size


PRESETS = {
    "base": ModelConfig(),
    # For CPU runs and tests; its input sizes match data.py's toy dataset.
    "tiny": ModelConfig(audio_length=256, mel_bins=64, image_size=96, embed_dim=128, depth=3,
                        num_heads=4, aug_hidden=128, pred_heads=4, pred_head_dim=32,
                        proj_hidden=512, proj_dim=128),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """Preset `name` with some fields replaced, e.g. get_config("tiny", drop_path=0.1)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------
# Initialisation helpers (SPEC 2)
# ---------------------------------------------------------------------------


def _init_linear_and_norm(m: nn.Module) -> None:
    """xavier-uniform Linear weights, zero biases, LayerNorm weight 1 / bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def sincos_pos_embed_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE convention, SPEC 2).

    Returns (rows * cols, dim), tokens in row-major order (n = r * cols + c).
    Channels [0, dim/2) encode the column index c, [dim/2, dim) the row index r;
    each half is [sin(pos * w_i)]_{i<dim/4} then [cos(pos * w_i)]_{i<dim/4},
    w_i = 10000^(-i / (dim/4)). For audio, rows are frequency and cols time.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # (N,) r of token n
    col = torch.arange(cols, dtype=torch.float64).repeat(rows)             # (N,) c of token n

    def encode(pos):  # (N,) -> (N, dim/2)
        angle = pos[:, None] * omega[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


# ---------------------------------------------------------------------------
# Encoders f_a, f_v (SPEC 2)
# ---------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                        # (B, D, rows, cols)
        return x.flatten(2).transpose(1, 2)     # (B, N, D), row-major over (rows, cols)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)   # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)       # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    """D -> hidden -> D with exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (SPEC 2) with per-sample drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class ViTEncoder(nn.Module):
    """One modality's ViT f_m (SPEC 2): patches + fixed 2-D sin-cos position
    embedding + learned modality embedding, `depth` blocks, final LayerNorm.

    Audio input (B, T, F) is laid out as a 1-channel image (B, 1, F, T): rows
    are frequency, cols are time, so grid = (F/p, T/p). Visual input is
    (B, 3, H, W), ImageNet-normalized. Original inputs end in `norm`,
    augmented ones in `norm_aug` (same blocks; SPEC 2). `with_aug_norm=False`
    drops `norm_aug` (the fine-tuning classifier never uses it).
    """

    def __init__(self, cfg: ModelConfig, in_chans: int, grid: tuple[int, int],
                 with_aug_norm: bool = True):
        super().__init__()
        D, p = cfg.embed_dim, cfg.patch_size
        self.grid = tuple(grid)
        self.image_hw = (grid[0] * p, grid[1] * p)
        self.patch_embed = PatchEmbed(in_chans, D, p)
        # A buffer, not a constant: it is saved in checkpoints and a loaded
        # (e.g. converted) table replaces the computed one (SPEC 2, 10).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, *grid)[None])  # (1, N, D)
        self.modality_embed = nn.Parameter(torch.zeros(1, 1, D))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()  # deeper blocks drop more
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, cfg.mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(D)
        self.norm_aug = nn.LayerNorm(D) if with_aug_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(_init_linear_and_norm)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv viewed as a (D, C*p*p) matrix
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.modality_embed, std=0.02)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the blocks, before the final norm: (B, N, D)."""
        if x.ndim == 3:
            x = x.transpose(1, 2).unsqueeze(1)  # (B, T, F) -> (B, 1, F, T): rows freq, cols time
        if tuple(x.shape[-2:]) != self.image_hw:
            raise ValueError(f"encoder expects inputs laid out as (B, C, {self.image_hw[0]}, "
                             f"{self.image_hw[1]}) (audio: (B, T, F) with F = rows), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed + self.modality_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, aug: bool = False) -> torch.Tensor:
        """h_m (B, N, D); `aug=True` uses the augmented-input norm `norm_aug`."""
        x = self.forward_blocks(x)
        return self.norm_aug(x) if aug else self.norm(x)

    def forward_pair(self, x: torch.Tensor, x_aug: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, h') for an original and an augmented batch in ONE pass through
        the shared blocks (a 2B batch), then the two separate final norms."""
        n = x.shape[0]
        tokens = self.forward_blocks(torch.cat([x, x_aug], dim=0))  # (2B, N, D)
        return self.norm(tokens[:n]), self.norm_aug(tokens[n:])


# ---------------------------------------------------------------------------
# Augmentation encoder e_m and transformation predictor u_m (SPEC 3, 4)
# ---------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AugEncoder(nn.Module):
    """e_m (SPEC 3): t (..., d_t) -> (..., hidden); three Linear layers, QuickGELU between."""

    def __init__(self, d_t: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_t, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.act = QuickGELU()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(t)))))


class TransformationPredictor(nn.Module):
    """u_m(h, t) (SPEC 4): predicts the embedding of the transformed input
    from the original tokens h (B, N, D) and parameter vectors t.

    Each augmentation vector is one cross-attention query over the tokens, so
    the S queries never interact and the output for S vectors is the mean of
    the S single-vector predictions (the centroid h̄_m of SPEC 4).
    """

    def __init__(self, cfg: ModelConfig, d_t: int):
        super().__init__()
        D, inner = cfg.embed_dim, cfg.pred_heads * cfg.pred_head_dim
        self.num_heads = cfg.pred_heads
        self.aug_encoder = AugEncoder(d_t, cfg.aug_hidden)
        self.norm_aug = nn.LayerNorm(cfg.aug_hidden)
        self.to_q = nn.Linear(cfg.aug_hidden, inner)
        self.to_k = nn.Linear(D, inner)
        self.to_v = nn.Linear(D, inner)
        self.to_out = nn.Linear(inner, D, bias=False)
        self.norm = nn.LayerNorm(D)
        self.mlp = MLP(D, int(D * cfg.mlp_ratio))
        self.apply(_init_linear_and_norm)

    def predict_each(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One prediction per vector: h (B, N, D), t (B, S, d_t) -> y (B, S, D)."""
        B, N, _ = h.shape
        S, H = t.shape[1], self.num_heads
        q = self.to_q(self.norm_aug(self.aug_encoder(t)))        # (B, S, H*hd)
        q = q.view(B, S, H, -1).transpose(1, 2)                  # (B, H, S, hd)
        k = self.to_k(h).view(B, N, H, -1).transpose(1, 2)       # (B, H, N, hd)
        v = self.to_v(h).view(B, N, H, -1).transpose(1, 2)       # (B, H, N, hd)
        a = F.scaled_dot_product_attention(q, k, v)              # (B, H, S, hd), softmax over N
        a = self.to_out(a.transpose(1, 2).reshape(B, S, -1))     # (B, S, D)
        y = h.mean(dim=1, keepdim=True) + a                      # mean_N(h) broadcast to S rows
        return y + self.mlp(self.norm(y))

    def predict_each_without(self, h: torch.Tensor, t: torch.Tensor,
                             drop: torch.Tensor) -> torch.Tensor:
        """predict_each with one token removed from what u reads (the mean over N and
        the keys/values), for every token index i in drop (c,): h (B, N, D), t (B, S,
        d_t) -> (B, c, S, D); row [:, r] equals predict_each(h without token drop[r], t).
        The occlusion of SPEC 13, batched: keys and values are projected once and only
        the softmax over the N - 1 remaining tokens is recomputed per removed token."""
        B, N, _ = h.shape
        S, H, c = t.shape[1], self.num_heads, drop.numel()
        q = self.to_q(self.norm_aug(self.aug_encoder(t)))        # (B, S, H*hd)
        q = q.view(B, S, H, -1).transpose(1, 2)                  # (B, H, S, hd)
        k = self.to_k(h).view(B, N, H, -1).transpose(1, 2)       # (B, H, N, hd)
        v = self.to_v(h).view(B, N, H, -1).transpose(1, 2)       # (B, H, N, hd)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5   # (B, H, S, N)
        gone = torch.zeros(c, N, dtype=torch.bool, device=h.device)
        gone[torch.arange(c, device=h.device), drop] = True      # (c, N): token drop[r] out of row r
        scores = scores.unsqueeze(1).masked_fill(gone[None, :, None, None, :], float("-inf"))
        a = torch.einsum("bchsn,bhnd->bchsd", scores.softmax(dim=-1), v)   # (B, c, H, S, hd)
        a = self.to_out(a.permute(0, 1, 3, 2, 4).reshape(B, c, S, -1))     # (B, c, S, D)
        mean = (h.sum(dim=1, keepdim=True) - h[:, drop]) / (N - 1)         # (B, c, D)
        y = mean.unsqueeze(2) + a
        return y + self.mlp(self.norm(y))

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """h (B, N, D), t (B, d_t) or (B, S, d_t) -> (B, D), the mean over the S rows."""
        if t.ndim == 2:
            t = t.unsqueeze(1)  # (B, 1, d_t)
        return self.predict_each(h, t).mean(dim=1)


# ---------------------------------------------------------------------------
# Projection heads g_intra_m, g_inter_m (SPEC 5)
# ---------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """(..., D) -> (..., proj_dim): 3 Linear layers, each followed by LayerNorm
    (ReLU after the first two). Acts row-wise, so it also maps single tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, hid, out = cfg.embed_dim, cfg.proj_hidden, cfg.proj_dim
        self.fc1, self.norm1 = nn.Linear(D, hid), nn.LayerNorm(hid)
        self.fc2, self.norm2 = nn.Linear(hid, hid), nn.LayerNorm(hid)
        self.fc3, self.norm3 = nn.Linear(hid, out), nn.LayerNorm(out)
        self.apply(_init_linear_and_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.fc1(x)))
        x = F.relu(self.norm2(self.fc2(x)))
        return self.norm3(self.fc3(x))


# ---------------------------------------------------------------------------
# EquiAV (SPEC 6, 13)
# ---------------------------------------------------------------------------


class EquiAVOutput(NamedTuple):
    """The six pretraining embeddings, each (B, proj_dim), NOT L2-normalized."""

    z_inter_a: torch.Tensor  # g_inter_a(centroid of u_a(h_a, T_a))
    z_inter_v: torch.Tensor
    z_equi_a: torch.Tensor   # g_intra_a(u_a(h_a, t_a)), predicted from the original
    z_equi_v: torch.Tensor
    z_aug_a: torch.Tensor    # g_intra_a(mean_N(h'_a)), encoded from the augmented input
    z_aug_v: torch.Tensor


INTER_TARGETS = ("centroid", "original", "augmented", "equivariant")


class EquiAV(nn.Module):
    """The pretraining model (SPEC 6).

    inter_target, what g_inter_m embeds for the inter-modal loss (the paper's
    ablation of the inter-modal target):
      "centroid"     u_m(h_m, T_m), the centroid of S predictions (SPEC 6, default);
      "original"     mean_N(h_m) of the original's tokens (use_centroid=False);
      "augmented"    mean_N(h'_m) of the augmented view's tokens (norm_m_aug);
      "equivariant"  u_m(h_m, t_m), the single prediction of the applied augmentation.
    equivariant=False:  z_equi_m = g_intra_m(mean_N(h_m)) (invariant ablation).
    The predictors are built only when something uses them.
    """

    def __init__(self, cfg: ModelConfig, use_centroid: bool = True, equivariant: bool = True,
                 inter_target: str | None = None):
        super().__init__()
        inter_target = inter_target or ("centroid" if use_centroid else "original")
        if inter_target not in INTER_TARGETS:
            raise ValueError(f"inter_target must be one of {INTER_TARGETS}, got {inter_target!r}")
        self.cfg = cfg
        self.inter_target = inter_target
        self.equivariant = equivariant
        self.audio_encoder = ViTEncoder(cfg, 1, cfg.audio_grid)
        self.visual_encoder = ViTEncoder(cfg, 3, cfg.visual_grid)
        needs_predictor = equivariant or inter_target in ("centroid", "equivariant")
        self.predictor_a = TransformationPredictor(cfg, AUDIO_DIM) if needs_predictor else None
        self.predictor_v = TransformationPredictor(cfg, VISUAL_DIM) if needs_predictor else None
        self.proj_intra_a = ProjectionHead(cfg)
        self.proj_intra_v = ProjectionHead(cfg)
        self.proj_inter_a = ProjectionHead(cfg)
        self.proj_inter_v = ProjectionHead(cfg)

    @property
    def use_centroid(self) -> bool:
        return self.inter_target == "centroid"

    def _parts(self, m):
        """(encoder, predictor, g_inter, g_intra) of modality m ("a" or "v")."""
        if m == "a":
            return self.audio_encoder, self.predictor_a, self.proj_inter_a, self.proj_intra_a
        return self.visual_encoder, self.predictor_v, self.proj_inter_v, self.proj_intra_v

    def _modality(self, m, h, h_aug, t, T):
        """The three embeddings of one modality from its tokens (SPEC 6)."""
        _, predictor, proj_inter, proj_intra = self._parts(m)
        single_needed = self.equivariant or self.inter_target == "equivariant"
        queries = ([t.unsqueeze(1)] if single_needed else []) + ([T] if self.use_centroid else [])
        single = centroid = None
        if queries:
            # One predictor call for [t, T_1..T_S]: the keys/values of h are
            # projected once and shared by the equivariant and centroid paths.
            y = predictor.predict_each(h, torch.cat(queries, dim=1))  # (B, 1+S, D), (B, 1, D) or (B, S, D)
            single = y[:, 0] if single_needed else None
            centroid = y[:, int(single_needed):].mean(dim=1) if self.use_centroid else None
        pooled, pooled_aug = h.mean(dim=1), h_aug.mean(dim=1)
        inter_in = {"centroid": centroid, "original": pooled, "augmented": pooled_aug,
                    "equivariant": single}[self.inter_target]
        equi_in = single if self.equivariant else pooled
        z_inter = proj_inter(inter_in)
        # g_intra is shared by both intra-modal embeddings: run it once on 2B rows.
        z_equi, z_aug = proj_intra(torch.cat([equi_in, pooled_aug], dim=0)).chunk(2, dim=0)
        return z_inter, z_equi, z_aug

    def forward(self, x_a, x_v, x_a_aug, x_v_aug, t_a, t_v, T_a, T_v) -> EquiAVOutput:
        """x_a, x_a_aug (B, T, F) normalized fbanks; x_v, x_v_aug (B, 3, H, W)
        ImageNet-normalized; t_a (B, 24), t_v (B, 18) the applied augmentations;
        T_a (B, S, 24), T_v (B, S, 18) sampled centroid vectors. t_m may be None
        when nothing uses it, T_m when inter_target is not "centroid"."""
        h_a, h_a_aug = self.audio_encoder.forward_pair(x_a, x_a_aug)    # (B, N_a, D) each
        h_v, h_v_aug = self.visual_encoder.forward_pair(x_v, x_v_aug)   # (B, N_v, D) each
        za = self._modality("a", h_a, h_a_aug, t_a, T_a)
        zv = self._modality("v", h_v, h_v_aug, t_v, T_v)
        return EquiAVOutput(za[0], zv[0], za[1], zv[1], za[2], zv[2])

    def inter_tokens(self, m, x):
        """The tokens of original inputs x that the inter-modal path reads, (B, N, D):
        through norm_m_aug for inter_target "augmented" (the view "augmented" by the
        identity), through norm_m otherwise."""
        return self._parts(m)[0](x, aug=self.inter_target == "augmented")

    def inter_from_tokens(self, m, h, T=None):
        """z_inter_m from tokens h, not normalized, (B, proj_dim), the way inter_target
        trained g_inter_m: the centroid of the (fixed-seed) vectors T; the mean-pooled
        tokens ("original", "augmented"); or the prediction for the identity vector."""
        _, predictor, proj_inter, _ = self._parts(m)
        if self.inter_target == "centroid":
            return proj_inter(predictor(h, T))
        if self.inter_target == "equivariant":
            identity = audio_identity if m == "a" else visual_identity
            return proj_inter(predictor(h, identity(h.shape[0], h.device)))
        return proj_inter(h.mean(dim=1))

    def _inter_without(self, m, h, T, drop):
        """inter_from_tokens with token i removed from h, for every i in drop (c,) ->
        (B, c, proj_dim) (see TransformationPredictor.predict_each_without)."""
        _, predictor, proj_inter, _ = self._parts(m)
        if self.inter_target in ("centroid", "equivariant"):
            if self.inter_target == "equivariant":
                identity = audio_identity if m == "a" else visual_identity
                T = identity(h.shape[0], h.device).unsqueeze(1)           # (B, 1, d_t)
            return proj_inter(predictor.predict_each_without(h, T, drop).mean(dim=2))
        return proj_inter((h.sum(dim=1, keepdim=True) - h[:, drop]) / (h.shape[1] - 1))

    def inter_embedding(self, m, x, T=None):
        """z_inter_m of original inputs x, not normalized, (B, proj_dim) (SPEC 13)."""
        return self.inter_from_tokens(m, self.inter_tokens(m, x), T)

    @torch.no_grad()
    def embed(self, x_a, x_v, T_a=None, T_v=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inter-modal embeddings of the originals, L2-normalized, each
        (B, proj_dim) (SPEC 13). The caller supplies fixed-seed centroid vectors."""
        z_a, z_v = self.inter_embedding("a", x_a, T_a), self.inter_embedding("v", x_v, T_v)
        return F.normalize(z_a, dim=-1), F.normalize(z_v, dim=-1)

    @torch.no_grad()
    def intra_embeddings(self, m, x, x_aug, t):
        """The intra-modal embeddings the equivariance measures compare, not normalized,
        each (B, proj_dim): z_equi = g_intra(u(h, t)) predicted from the original,
        z_aug = g_intra(mean_N(h')) encoded from the augmented input x_aug = t(x), and
        z_identity = g_intra(u(h, t_identity)), the prediction told "no augmentation".
        An invariant model (no predictor in the intra path) predicts g_intra(mean_N(h))
        for both."""
        encoder, predictor, _, proj_intra = self._parts(m)
        h, h_aug = encoder.forward_pair(x, x_aug)
        if self.equivariant:
            identity = (audio_identity if m == "a" else visual_identity)(h.shape[0], h.device)
            y = predictor.predict_each(h, torch.stack([t, identity], dim=1))   # (B, 2, D)
            z_equi, z_id = proj_intra(y).unbind(dim=1)
        else:
            z_equi = z_id = proj_intra(h.mean(dim=1))
        return z_equi, proj_intra(h_aug.mean(dim=1)), z_id

    def localize(self, x_a, x_v, T_a=None, T_v=None, method="occlusion",
                 chunk=64) -> torch.Tensor:
        """Sound-source maps over the visual patch grid (SPEC 13) -> (B, rows, cols).

        With s = cos(z_inter_a, z_inter_v) (T_a, T_v: fixed evaluation vectors):
        "occlusion": m_i = s - s_{-i}, s recomputed with patch token i removed from
          the tokens the visual inter path reads (chunk tokens at a time);
        "gradient": m_i = sum_d h_id ds/dh_id on those tokens (gradient x input);
        "token": m_i = cos(z_inter_a, g_inter_v(h_i)), the literal reading, which
          g_inter_v, trained on whole-frame embeddings only, was never fit for.
        """
        if method not in ("occlusion", "gradient", "token"):
            raise ValueError(f"unknown localization method {method!r}: occlusion, gradient, token")
        with torch.no_grad():
            z_a = F.normalize(self.inter_embedding("a", x_a, T_a), dim=-1)    # (B, P)
            h = self.inter_tokens("v", x_v)                                    # (B, N, D)
        if method == "token":
            with torch.no_grad():
                z_tok = F.normalize(self.proj_inter_v(h), dim=-1)             # (B, N, P)
                m = torch.einsum("bp,bnp->bn", z_a, z_tok)
        elif method == "gradient":
            with torch.enable_grad():
                h = h.detach().requires_grad_(True)
                s = F.cosine_similarity(z_a, self.inter_from_tokens("v", h, T_v), dim=-1)
                grad, = torch.autograd.grad(s.sum(), h)   # clips do not interact: one backward
            m = (h.detach() * grad).sum(dim=-1)
        else:
            with torch.no_grad():
                s = F.cosine_similarity(z_a, self.inter_from_tokens("v", h, T_v), dim=-1)
                parts = []
                for drop in torch.arange(h.shape[1], device=h.device).split(chunk):
                    z = self._inter_without("v", h, T_v, drop)                 # (B, c, P)
                    parts.append(s[:, None] - F.cosine_similarity(z_a[:, None], z, dim=-1))
                m = torch.cat(parts, dim=1)
        return m.view(m.shape[0], *self.visual_encoder.grid)                 # (B, rows, cols)


# ---------------------------------------------------------------------------
# Fine-tuning classifier (SPEC 11)
# ---------------------------------------------------------------------------


class EquiAVClassifier(nn.Module):
    """Pretrained encoders (with their final norm_m) + one Linear head on the
    mean-pooled tokens; multimodal concatenates [audio, visual] features."""

    MODES = ("audio", "visual", "multimodal")

    def __init__(self, cfg: ModelConfig, num_classes: int, mode: str = "multimodal",
                 drop_path: float = 0.1):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown classifier mode {mode!r}; choose from {self.MODES}")
        cfg = dataclasses.replace(cfg, drop_path=drop_path)
        self.cfg, self.mode = cfg, mode
        use_a, use_v = mode in ("audio", "multimodal"), mode in ("visual", "multimodal")
        self.audio_encoder = ViTEncoder(cfg, 1, cfg.audio_grid, with_aug_norm=False) if use_a else None
        self.visual_encoder = ViTEncoder(cfg, 3, cfg.visual_grid, with_aug_norm=False) if use_v else None
        self.head = nn.Linear(cfg.embed_dim * (use_a + use_v), num_classes)
        _init_linear_and_norm(self.head)

    @classmethod
    def from_pretrained(cls, equiav: EquiAV, num_classes: int, mode: str = "multimodal",
                        drop_path: float = 0.1) -> "EquiAVClassifier":
        """A classifier whose encoders are copies of `equiav`'s (norm_m_aug left out)."""
        model = cls(equiav.cfg, num_classes, mode, drop_path)
        for name in ("audio_encoder", "visual_encoder"):
            encoder = getattr(model, name)
            if encoder is not None:
                src = getattr(equiav, name).state_dict()
                encoder.load_state_dict({k: v for k, v in src.items() if not k.startswith("norm_aug.")})
        return model.to(next(equiav.parameters()).device)

    def forward_features(self, x_a=None, x_v=None) -> torch.Tensor:
        """(B, D) for one modality or (B, 2D) = [audio, visual] for multimodal."""
        feats = []
        if self.audio_encoder is not None:
            feats.append(self.audio_encoder(x_a).mean(dim=1))
        if self.visual_encoder is not None:
            feats.append(self.visual_encoder(x_v).mean(dim=1))
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def forward(self, x_a=None, x_v=None) -> torch.Tensor:
        """x_a (B, T, F), x_v (B, 3, H, W) (the unused one may be None) -> logits (B, C)."""
        return self.head(self.forward_features(x_a, x_v))

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("head.")]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())
