"""Stable Diffusion 2.x: OpenCLIP ViT-H's text tower (its last block dropped, as SD 2.x's config
says), a UNet with 64-wide heads and linear attention projections, epsilon (512 px base) or
v-prediction (768-v) targets, which a single file cannot tell apart."""

from ..models import ldm_layout
from .base import TextEncoder
from .sd import StableDiffusion

LAYOUT = ldm_layout.SingleFileLayout(
    "sd2", "SD 2.x", f"OpenCLIP ViT-H ({ldm_layout.OPEN_CLIP}*)", "linear attention projections",
    (ldm_layout.EncoderLayout(ldm_layout.OPEN_CLIP, "OpenCLIP ViT-H", open_clip=True, hidden_act="gelu",
                              projection_dim=512, dropped_layers=1, pad="sd2"),),
    linear_projection=True, unet_head_dim=ldm_layout.HEAD_DIM, v_sample_size=96, prediction_unknown=True,
)

# OpenCLIP's erf GELU, which tells an SD 2.x folder from an SD 1.x one (both are StableDiffusionPipeline's).
FAMILY = StableDiffusion("sd2", "SD 2.x", (TextEncoder("text_encoder", "tokenizer", "", "OpenCLIP ViT-H"),),
                         LAYOUT, ("gelu",))
