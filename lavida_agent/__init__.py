"""lavida-agent: a unified masked-diffusion model (Lavida-O style) run as a LangGraph agent.

    >>> from lavida_agent import LavidaAgent
    >>> agent = LavidaAgent.from_pretrained()          # the embedded ShapesWorld model
    >>> result = agent.generate("a red circle left of a blue square", seed=1)
    >>> result.save("out.png"); result.trace_path       # the image and its trace

Importing this package is light: torch and the model load on first use.
"""

__version__ = "0.1.0"

from lavida_agent.api import (
    AskResult,
    CritiqueResult,
    EditResult,
    GenerateResult,
    GroundResult,
    LavidaAgent,
    RunResult,
    Session,
)
from lavida_agent.errors import (
    BusyError,
    GenerationCancelled,
    InvalidInputError,
    LavidaError,
    ModelLoadError,
    NotFoundError,
    WorkflowError,
)
from lavida_agent.settings import Settings

__all__ = [
    "AskResult",
    "BusyError",
    "CritiqueResult",
    "EditResult",
    "GenerateResult",
    "GenerationCancelled",
    "GroundResult",
    "InvalidInputError",
    "LavidaAgent",
    "LavidaError",
    "ModelLoadError",
    "NotFoundError",
    "RunResult",
    "Session",
    "Settings",
    "WorkflowError",
    "__version__",
]
