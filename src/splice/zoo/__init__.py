"""The model zoo: real corpora, a base model and domain experts built on this machine."""

from .build import TIERS, build_zoo, default_zoo_dir, load_manifest, zoo_paths

__all__ = ["TIERS", "build_zoo", "default_zoo_dir", "load_manifest", "zoo_paths"]
