"""DiffuApriel for Hugging Face Transformers. Importing this package registers the model type "diffuapriel" with
`AutoConfig`, `AutoModel` and `AutoModelForMaskedLM`. `DiffusionTextGenerationPipeline` is its text-generation
pipeline (saved model folders name it in config.json, for `pipeline("text-generation", model=folder,
trust_remote_code=True)`)."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .modeling.configuration_diffuapriel import DiffuAprielConfig, preset_config
from .modeling.generation import DiffusionGenerationConfig
from .modeling.modeling_diffuapriel import DiffuAprielForMaskedLM, DiffuAprielModel, DiffuAprielPreTrainedModel
from .modeling.pipeline_diffuapriel import DiffusionTextGenerationPipeline
from .modeling.presets import PRESETS
from .shipped import default_model_path
from .training.data import DataCollatorForMaskedDiffusion
from .training.evaluation import ELBOEvaluationSet, ELBOMetricsCallback

AutoConfig.register(DiffuAprielConfig.model_type, DiffuAprielConfig, exist_ok=True)
AutoModel.register(DiffuAprielConfig, DiffuAprielModel, exist_ok=True)
AutoModelForMaskedLM.register(DiffuAprielConfig, DiffuAprielForMaskedLM, exist_ok=True)
# save_pretrained then also writes the source files and config.json's auto_map (Hub remote code, see hub.py).
DiffuAprielConfig.register_for_auto_class()
DiffuAprielModel.register_for_auto_class("AutoModel")
DiffuAprielForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")

__version__ = "0.1.0"
__all__ = [
    "DataCollatorForMaskedDiffusion",
    "DiffuAprielConfig",
    "DiffuAprielModel",
    "DiffuAprielForMaskedLM",
    "DiffuAprielPreTrainedModel",
    "DiffusionGenerationConfig",
    "DiffusionTextGenerationPipeline",
    "ELBOEvaluationSet",
    "ELBOMetricsCallback",
    "PRESETS",
    "default_model_path",
    "preset_config",
]
