"""Models: diffusion denoisers (diffusers), classifiers (timm) and the base classifiers built from them.

Nothing here knows about Ray or about how samples are batched.
"""

from .adapter import as_classifier, from_module, user_base_classifier
from .base import (
    BaseClassifier,
    DenoiseThenClassify,
    DiffSmoothBase,
    LinearBase,
    OneStepBase,
    PlainBase,
    check_base_config,
    create_base_classifier,
    list_base_classifiers,
    model_sections,
    register_base_classifier,
)
from .classifier import ClassifierConfig, InputContract, NormalizedClassifier, load_classifier, save_classifier
from .denoiser import DenoiserConfig, DiffusionDenoiser, load_denoiser
from .onestep import NoiseConditionedClassifier, OneStepConfig, load_onestep, save_onestep
from .schedule import alphas_cumprod, cosine_betas, linear_betas, schedule_from_config, timestep_for_sigma

__all__ = [
    "as_classifier",
    "from_module",
    "model_sections",
    "save_classifier",
    "save_onestep",
    "schedule_from_config",
    "user_base_classifier",
    "BaseClassifier",
    "ClassifierConfig",
    "DenoiseThenClassify",
    "DenoiserConfig",
    "DiffSmoothBase",
    "DiffusionDenoiser",
    "InputContract",
    "LinearBase",
    "NoiseConditionedClassifier",
    "NormalizedClassifier",
    "OneStepBase",
    "OneStepConfig",
    "PlainBase",
    "alphas_cumprod",
    "cosine_betas",
    "check_base_config",
    "create_base_classifier",
    "linear_betas",
    "list_base_classifiers",
    "load_classifier",
    "load_denoiser",
    "load_onestep",
    "register_base_classifier",
    "timestep_for_sigma",
]
