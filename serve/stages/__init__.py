"""The three pipeline stages as plain classes (no Ray): deployments wrap them."""

from serve.stages.decoder import Decoder, to_uint8
from serve.stages.denoiser import DenoiseJob, Denoiser, guidance_enabled
from serve.stages.text_encoder import TextEncoder

__all__ = ["DenoiseJob", "Decoder", "Denoiser", "TextEncoder", "guidance_enabled", "to_uint8"]
