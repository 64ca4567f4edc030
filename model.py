"""The EquiAV model (method.md §2-6), after Kim et al., "EquiAV: Leveraging Equivariance for
Audio-Visual Contrastive Learning", ICML 2024.

Read top to bottom it follows the paper's ladder: PatchEmbed -> Attention -> MLP -> Block ->
ViTEncoder (f_m), AugEncoder (e_m) -> the transformation predictor u_m in three kinds
(TransformationPredictor, the paper's attention one; LinearPredictor and
HypernetworkPredictor, our forms of its ablation), centroid (h̄_m), ProjectionHead (g_m),
EquiAV (the pretraining forward, with ĥ_m and h̄_m named). The fine-tuning classifier
(method.md §11) is in finetune.py, localization maps (§13) in localize.py, checkpoint
loading (§10) in convert.py. Needs only torch: copy it out alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Configuration ----

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
    audio_aug_dim: int = 24    # d_t, the length of an audio augmentation vector (method.md §8)
    visual_aug_dim: int = 18   # d_t of a visual one
    aug_hidden: int = 256      # width of the augmentation encoder e_m (method.md §3)
    pred_heads: int = 8        # cross-attention heads of the predictor u_m (method.md §4)
    pred_head_dim: int = 64
    predictor: str = "attention"   # u_m's kind: attention (the paper's), linear, hypernetwork
    pred_rank: int = 16        # r of the hypernetwork kind's low-rank map (method.md §4.3)
    proj_hidden: int = 2048    # projection heads g_m (method.md §5)
    proj_dim: int = 512
    drop_path: float = 0.0     # stochastic depth, maximum rate (last block)

    def __post_init__(self):
        p = self.patch_size
        for name in ("audio_length", "mel_bins", "image_size"):
            if getattr(self, name) % p:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} is not a multiple "
                                 f"of patch_size={p}")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by "
                             f"num_heads={self.num_heads} "
                             "and by 4 (the 2-D sin-cos position embedding)")
        if self.predictor not in ("attention", "linear", "hypernetwork"):
            raise ValueError(f"predictor={self.predictor!r} must be attention, linear or "
                             "hypernetwork")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path} must be in [0, 1)")

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(rows, cols) = (frequency patches, time patches) of the audio encoder."""
        return self.mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def visual_grid(self) -> tuple[int, int]:  # (rows, cols) of the visual patch grid
        return (self.image_size // self.patch_size,) * 2


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
    fields = sorted(f.name for f in dataclasses.fields(ModelConfig))
    if set(overrides) - set(fields):
        raise ValueError(f"unknown ModelConfig field(s) {sorted(set(overrides) - set(fields))}; "
                         f"valid fields: {fields}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---- Initialisation helpers (method.md §2) ----

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
    """Fixed 2-D sine-cosine position embedding (MAE convention, method.md §2).

    Returns (rows * cols, dim), tokens in row-major order (n = r * cols + c).
    Channels [0, dim/2) encode the column index c, [dim/2, dim) the row index r;
    each half is [sin(pos * w_i)]_{i<dim/4} then [cos(pos * w_i)]_{i<dim/4},
    w_i = 10000^(-i / (dim/4)). For audio, rows are frequency and cols time.
    """
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


# ---- Encoders f_a, f_v (method.md §2) ----

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
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (method.md §2) with per-sample drop path."""

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
    """One modality's ViT f_m (method.md §2): patches + fixed 2-D sin-cos position embedding +
    learned modality embedding, `depth` blocks, final LayerNorm. Audio (B, T, F) is laid out
    as a 1-channel image (B, 1, F, T): rows frequency, cols time, grid (F/p, T/p). Visual
    input is (B, 3, H, W), ImageNet-normalized. Original inputs end in `norm`, augmented ones
    in `norm_aug` (same blocks); `with_aug_norm=False` drops `norm_aug` (fine-tuning)."""

    def __init__(self, cfg: ModelConfig, in_chans: int, grid: tuple[int, int],
                 with_aug_norm: bool = True):
        super().__init__()
        D, p = cfg.embed_dim, cfg.patch_size
        self.grid = tuple(grid)
        self.image_hw = (grid[0] * p, grid[1] * p)
        self.patch_embed = PatchEmbed(in_chans, D, p)
        # A buffer, not a constant: it is saved in checkpoints and a loaded
        # (e.g. converted) table replaces the computed one (method.md §2, 10).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, *grid)[None])  # (1, N, D)
        self.modality_embed = nn.Parameter(torch.zeros(1, 1, D))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()  # deeper blocks drop more
        self.blocks = nn.ModuleList([Block(D, cfg.num_heads, cfg.mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(D)
        # The augmented views get their own final norm (method.md §2, as the authors' model): their
        # token statistics differ from the originals' (masked, cropped, jittered inputs), and
        # `norm` is what retrieval and fine-tuning read, so the views do not pull on it.
        self.norm_aug = nn.LayerNorm(D) if with_aug_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(_init_linear_and_norm)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv viewed as a (D, C*p*p) matrix
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.modality_embed, std=0.02)

    def forward(self, x: torch.Tensor, aug: bool = False) -> torch.Tensor:
        """h_m (B, N, D); `aug=True` ends in the augmented-input norm `norm_aug`."""
        if x.ndim == 3:
            x = x.transpose(1, 2).unsqueeze(1)  # (B, T, F) -> (B, 1, F, T): rows freq, cols time
        if tuple(x.shape[-2:]) != self.image_hw:
            rows, cols = self.image_hw
            raise ValueError(f"encoder expects inputs laid out as (B, C, {rows}, {cols}) "
                             f"(audio: (B, T, F) with F = rows), got {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed + self.modality_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm_aug(x) if aug else self.norm(x)


# ---- Augmentation encoder e_m and transformation predictor u_m (method.md §3, 4) ----

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks & Gimpel 2016),
    as CLIP uses it; the authors' augmentation encoder is built with it (method.md §3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AugEncoder(nn.Module):
    """e_m (method.md §3): t (..., d_t) -> (..., hidden); three Linears, QuickGELU between."""

    def __init__(self, d_t: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_t, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.act = QuickGELU()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(t)))))


class Predictor(nn.Module):
    """What every kind of u_m shares: predict_each gives one prediction per vector, and
    forward their centroid, so the centroid of S vectors is the mean of the S single
    predictions for every kind (method.md §4)."""

    def predict_each(self, h: torch.Tensor, t: torch.Tensor, keep=None) -> torch.Tensor:
        raise NotImplementedError   # h (B, N, D), t (B, S, d_t) -> (B, S, D)

    def forward(self, h: torch.Tensor, t: torch.Tensor, keep=None) -> torch.Tensor:
        """h (B, N, D) and t (B, d_t) -> ĥ_m = u_m(h, t); t (B, S, d_t) -> h̄_m, the centroid
        of the S predictions. Either way (B, D)."""
        return centroid(self.predict_each(h, t if t.ndim == 3 else t.unsqueeze(1), keep))


class TransformationPredictor(Predictor):
    """u_m(h, t), attention kind (method.md §4.1): predicts the embedding of the transformed input
    from the original tokens h (B, N, D) and parameter vectors t. Each augmentation vector is
    one cross-attention query over the tokens, so the S queries never interact and the
    output for S vectors is the mean of the S single-vector predictions (h̄_m, method.md §4)."""

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

    def queries(self, t: torch.Tensor) -> torch.Tensor:
        """One query per augmentation vector and head: t (B, S, d_t) -> (B, H, S, hd)."""
        return self.split_heads(self.to_q(self.norm_aug(self.aug_encoder(t))))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H*hd) -> (B, H, L, hd)"""
        return x.view(*x.shape[:2], self.num_heads, -1).transpose(1, 2)

    def predict_each(self, h: torch.Tensor, t: torch.Tensor, keep=None) -> torch.Tensor:
        """One prediction per vector: h (B, N, D), t (B, S, d_t) -> y (B, S, D).
        keep (B, N) bool, optional: the tokens u reads (in its mean and as keys/values), as
        if the others were not there; localize.py removes one patch at a time with it."""
        B, S = t.shape[:2]
        q = self.queries(t)                                      # (B, H, S, hd)
        k = self.split_heads(self.to_k(h))                       # (B, H, N, hd)
        v = self.split_heads(self.to_v(h))                       # (B, H, N, hd)
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, N), True = attend
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # (B, H, S, hd): over N
        a = self.to_out(a.transpose(1, 2).reshape(B, S, -1))     # (B, S, D)
        y = mean_tokens(h, keep) + a                             # mean_N(h) broadcast to S rows
        return y + self.mlp(self.norm(y))

    def attention(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Where the queries look: the weights the attention of predict_each applies, the
        softmax over the N tokens, averaged over heads. h (B, N, D), t (B, S, d_t) -> (B, S, N)."""
        q = self.queries(t)                                      # (B, H, S, hd)
        k = self.split_heads(self.to_k(h))                       # (B, H, N, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])   # (B, H, S, N)
        return scores.softmax(dim=-1).mean(dim=1)


class LinearPredictor(Predictor):
    """u_m(h, t), linear kind (method.md §4.2; the paper names it, the form is ours):
    u(h, t) = W [mean_N(h); e_m(t)] + b, one Linear(D + hidden -> D)."""

    def __init__(self, cfg: ModelConfig, d_t: int):
        super().__init__()
        self.aug_encoder = AugEncoder(d_t, cfg.aug_hidden)
        self.fc = nn.Linear(cfg.embed_dim + cfg.aug_hidden, cfg.embed_dim)
        self.apply(_init_linear_and_norm)

    def predict_each(self, h: torch.Tensor, t: torch.Tensor, keep=None) -> torch.Tensor:
        """h (B, N, D), t (B, S, d_t) -> (B, S, D); keep as for the attention kind."""
        e = self.aug_encoder(t)                                         # (B, S, hidden)
        pooled = mean_tokens(h, keep).expand(-1, t.shape[1], -1)        # (B, S, D)
        return self.fc(torch.cat([pooled, e], dim=-1))


class HypernetworkPredictor(Predictor):
    """u_m(h, t), hypernetwork kind (method.md §4.3; the paper names it, the form is ours, after
    SIE, Garrido et al. 2023): e_m(t) generates the weights of the map applied to the pooled
    tokens, u(h, t) = mean_N(h) + U(t) V(t) mean_N(h), with U (D x r) and V (r x D) the two
    halves of one Linear(hidden -> 2 D r) of e_m(t). The rank r (pred_rank) keeps the base
    preset's predictor the size of the attention one."""

    def __init__(self, cfg: ModelConfig, d_t: int):
        super().__init__()
        self.rank = cfg.pred_rank
        self.aug_encoder = AugEncoder(d_t, cfg.aug_hidden)
        self.to_weights = nn.Linear(cfg.aug_hidden, 2 * cfg.embed_dim * cfg.pred_rank)
        self.apply(_init_linear_and_norm)

    def predict_each(self, h: torch.Tensor, t: torch.Tensor, keep=None) -> torch.Tensor:
        """h (B, N, D), t (B, S, d_t) -> (B, S, D); keep as for the attention kind."""
        B, S = t.shape[:2]
        D = h.shape[-1]
        U, V = self.to_weights(self.aug_encoder(t)).chunk(2, dim=-1)   # each (B, S, D r)
        U, V = U.view(B, S, D, self.rank), V.view(B, S, self.rank, D)
        pooled = mean_tokens(h, keep).expand(-1, S, -1).unsqueeze(-1)    # (B, S, D, 1)
        return (pooled + U @ (V @ pooled)).squeeze(-1)                   # (B, S, D)


PREDICTORS = {"attention": TransformationPredictor, "linear": LinearPredictor,
              "hypernetwork": HypernetworkPredictor}


def centroid(y: torch.Tensor) -> torch.Tensor:
    """h̄_m = (1/S) sum_i u_m(h_m, t_i): the mean of S single predictions y (B, S, D) -> (B, D).
    With S = 1 it is the single prediction itself, ĥ_m (method.md §4)."""
    return y.mean(dim=1)


def mean_tokens(h: torch.Tensor, keep=None) -> torch.Tensor:
    """mean_N(h): h (B, N, D) -> (B, 1, D), over the tokens in keep (B, N) when given."""
    if keep is None:
        return h.mean(dim=1, keepdim=True)
    weight = keep.to(h.dtype).unsqueeze(-1)                       # (B, N, 1)
    return (h * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True)


# ---- Projection heads g_intra_m, g_inter_m (method.md §5) ----

class ProjectionHead(nn.Module):
    """(..., D) -> (..., proj_dim): 3 Linear layers, each followed by LayerNorm
    (ReLU after the first two). Acts row-wise, so it also maps single tokens.
    The last LayerNorm is the authors' (method.md §5), in the place SimCLR and MoCo v3 put a
    BatchNorm: each embedding leaves centred and scaled, so the cosine of the losses
    compares directions that no shared offset dominates."""

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


# ---- EquiAV (method.md §6, 13) ----

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
    """The pretraining model (method.md §6). inter_target, what g_inter_m embeds for the
    inter-modal loss (the paper's ablation of the inter-modal target):
      "centroid"     u_m(h_m, T_m), the centroid of S predictions (method.md §6, default);
      "original"     mean_N(h_m) of the original's tokens;
      "augmented"    mean_N(h'_m) of the augmented view's tokens (norm_m_aug);
      "equivariant"  u_m(h_m, t_m), the single prediction of the applied augmentation.
    equivariant=False:  z_equi_m = g_intra_m(mean_N(h_m)) (invariant ablation).
    The predictors are built only when something uses them."""

    def __init__(self, cfg: ModelConfig, inter_target: str = "centroid", equivariant: bool = True):
        super().__init__()
        if inter_target not in INTER_TARGETS:
            raise ValueError(f"inter_target must be one of {INTER_TARGETS}, got {inter_target!r}")
        self.cfg, self.inter_target, self.equivariant = cfg, inter_target, equivariant
        self.audio_encoder = ViTEncoder(cfg, 1, cfg.audio_grid)
        self.visual_encoder = ViTEncoder(cfg, 3, cfg.visual_grid)
        needs_predictor = equivariant or inter_target in ("centroid", "equivariant")
        self.predictor_a = self.predictor_v = None
        if needs_predictor:
            self.predictor_a = PREDICTORS[cfg.predictor](cfg, cfg.audio_aug_dim)
            self.predictor_v = PREDICTORS[cfg.predictor](cfg, cfg.visual_aug_dim)
        self.proj_intra_a, self.proj_intra_v = ProjectionHead(cfg), ProjectionHead(cfg)
        self.proj_inter_a, self.proj_inter_v = ProjectionHead(cfg), ProjectionHead(cfg)

    def forward(self, x_a, x_v, x_a_aug, x_v_aug, t_a, t_v, T_a, T_v) -> EquiAVOutput:
        """x_a, x_a_aug (B, T, F) normalized fbanks; x_v, x_v_aug (B, 3, H, W)
        ImageNet-normalized; t_a (B, 24), t_v (B, 18) the applied augmentations;
        T_a (B, S, 24), T_v (B, S, 18) sampled centroid vectors. t_m may be None
        when nothing uses it, T_m when inter_target is not "centroid"."""
        h_a = self.audio_encoder(x_a)                      # (B, N_a, D), ends in norm_a
        h_a_aug = self.audio_encoder(x_a_aug, aug=True)    # (B, N_a, D), ends in norm_a_aug
        h_v, h_v_aug = self.visual_encoder(x_v), self.visual_encoder(x_v_aug, aug=True)
        z_inter_a = self.proj_inter_a(self.inter_input(self.predictor_a, h_a, h_a_aug, t_a, T_a))
        z_inter_v = self.proj_inter_v(self.inter_input(self.predictor_v, h_v, h_v_aug, t_v, T_v))
        if self.equivariant:   # ĥ_m = u_m(h_m, t_m): the view's embedding, predicted
            h_hat_a, h_hat_v = self.predictor_a(h_a, t_a), self.predictor_v(h_v, t_v)
        else:                  # the invariant ablation: the original's mean token
            h_hat_a, h_hat_v = h_a.mean(dim=1), h_v.mean(dim=1)
        z_equi_a, z_equi_v = self.proj_intra_a(h_hat_a), self.proj_intra_v(h_hat_v)
        z_aug_a = self.proj_intra_a(h_a_aug.mean(dim=1))   # mean_N(h'_m): the view, encoded
        z_aug_v = self.proj_intra_v(h_v_aug.mean(dim=1))
        return EquiAVOutput(z_inter_a, z_inter_v, z_equi_a, z_equi_v, z_aug_a, z_aug_v)

    def inter_input(self, predictor, h, h_aug, t, T, keep=None):
        """What g_inter_m embeds (B, D), by inter_target (method.md §6 and its ablations):
        "centroid" the centroid vectors T, "equivariant" the applied t, "original" and
        "augmented" a mean of tokens. keep: see TransformationPredictor.predict_each."""
        if self.inter_target == "centroid":
            h_bar = predictor(h, T, keep)        # h̄_m = (1/S) sum_i u_m(h_m, T_i)
            return h_bar
        if self.inter_target == "equivariant":
            return predictor(h, t, keep)
        if self.inter_target == "augmented":
            return mean_tokens(h_aug, keep).squeeze(1)
        return mean_tokens(h, keep).squeeze(1)   # "original"

    # -- Evaluation (method.md §13): the inter-modal path of the original inputs alone --

    def inter_tokens(self, m, x):
        """Tokens (B, N, D) of original inputs x of modality m ("a" or "v") as the inter
        path reads them: for "augmented" through norm_m_aug (x is the identity's view)."""
        encoder = self.audio_encoder if m == "a" else self.visual_encoder
        return encoder(x, aug=self.inter_target == "augmented")

    def inter_from_tokens(self, m, h, T=None, keep=None):
        """z_inter_m (B, proj_dim), not normalized, from tokens h (B, N, D). T: for
        "centroid" the fixed evaluation vectors (B, S, d_t); for "equivariant" the identity
        vectors (B, d_t), the prediction of no augmentation. keep (B, N): the tokens read."""
        predictor = self.predictor_a if m == "a" else self.predictor_v
        proj_inter = self.proj_inter_a if m == "a" else self.proj_inter_v
        return proj_inter(self.inter_input(predictor, h, h, T, T, keep))

    @torch.no_grad()
    def embed(self, x_a, x_v, T_a=None, T_v=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval embeddings (method.md §13): z_inter_a, z_inter_v of the originals, normalized,
        each (B, proj_dim); T_a, T_v as for inter_from_tokens (retrieval.centroid_vectors)."""
        z_a = self.inter_from_tokens("a", self.inter_tokens("a", x_a), T_a)
        z_v = self.inter_from_tokens("v", self.inter_tokens("v", x_v), T_v)
        return F.normalize(z_a, dim=-1), F.normalize(z_v, dim=-1)
