"""Stable Diffusion 1.x: CLIP ViT-L/14's last hidden state, a UNet with 8 heads per block and
1x1-conv attention projections, the KL VAE (scale 0.18215), epsilon prediction at 512 px."""

from ..models import ldm_layout
from .sd import CLIP_L, StableDiffusion

LAYOUT = ldm_layout.SingleFileLayout(
    "sd1", "SD 1.x", f"CLIP ViT-L ({ldm_layout.CLIP_L}*)", "1x1-conv attention projections",
    (ldm_layout.EncoderLayout(ldm_layout.CLIP_L, "CLIP ViT-L", open_clip=False),),
    linear_projection=False, unet_heads=8,
)

# OpenAI CLIP's activation (transformers' config: quick_gelu); the tanh GELUs of some exports too.
FAMILY = StableDiffusion("sd1", "SD 1.x", (CLIP_L,), LAYOUT, ("quick_gelu", "gelu_new", "gelu_pytorch_tanh"))
