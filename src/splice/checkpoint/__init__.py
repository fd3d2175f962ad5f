"""Reading and writing Hugging Face model folders, tensor by tensor."""

from .reader import ModelSource, open_model
from .writer import CheckpointWriter

__all__ = ["ModelSource", "open_model", "CheckpointWriter"]
