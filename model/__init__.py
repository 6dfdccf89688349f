"""The Elastic-MoT masked-diffusion model: config, modeling, tokenizers, samplers, pipeline.

Importing this package imports torch and transformers; the rest of `lavida_agent` imports it
lazily.
"""

from transformers import AutoConfig, AutoModel

from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
from lavida_agent.model.configuration_vq import VQConfig
from lavida_agent.model.modeling_lavida import ConditionCache, LavidaForMaskedDiffusion, LavidaOutput
from lavida_agent.model.modeling_vq import VQImageTokenizer
from lavida_agent.model.pipeline_lavida import LavidaPipeline, PipelineInterrupted, StepInfo
from lavida_agent.model.sampling_image import ImageMaskSampler
from lavida_agent.model.sampling_text import TextMaskSampler

# Registered here so that `AutoModel.from_pretrained(folder)` works in a fresh process
# (MACHINE_NOTES §4: an unregistered model type fails to load).
AutoConfig.register(LavidaConfig.model_type, LavidaConfig, exist_ok=True)
AutoModel.register(LavidaConfig, LavidaForMaskedDiffusion, exist_ok=True)

__all__ = [
    "PRESETS",
    "ConditionCache",
    "ImageMaskSampler",
    "LavidaConfig",
    "LavidaForMaskedDiffusion",
    "LavidaOutput",
    "LavidaPipeline",
    "PipelineInterrupted",
    "StepInfo",
    "TextMaskSampler",
    "VQConfig",
    "VQImageTokenizer",
]
