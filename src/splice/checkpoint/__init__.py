"""Reading and writing Hugging Face model folders, tensor by tensor."""

from .reader import ModelSource, open_model
from .side_files import SideFiles

__all__ = ["ModelSource", "SideFiles", "open_model"]
