"""The Elastic-MoT masked-diffusion model: config, modeling, tokenizers, samplers, pipeline."""
