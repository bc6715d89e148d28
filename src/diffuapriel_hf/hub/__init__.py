"""Conversion from other checkpoint formats and publishing on the Hugging Face Hub."""

from .publish import AUTO_MAP, evaluation_results, model_card, push_folder, remote_code_files, save_for_hub

__all__ = ["AUTO_MAP", "evaluation_results", "model_card", "push_folder", "remote_code_files", "save_for_hub"]
