"""Trained models outside training: final.pt, any checkpoint as a model, the export directory, generation."""

from psm_train.pretrained.export_dir import export_pretrained, load_pretrained
from psm_train.pretrained.model_files import load_checkpoint, save_checkpoint
from psm_train.pretrained.text_tokenizer import TextTokenizer

__all__ = ["TextTokenizer", "export_pretrained", "load_checkpoint", "load_pretrained", "save_checkpoint"]
