"""lavida-agent: a unified masked-diffusion model (Lavida-O style) run as a LangGraph agent."""

__version__ = "0.1.0"

__all__ = ["__version__"]
