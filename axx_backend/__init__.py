"""axx-backend: image-level labels to pixel-level annotations with an uncertainty-aware CNN ensemble.

The science (ensemble, uncertainty, saliency, masks, annotator, training) imports nothing
from the web layer, Redis or Label Studio, so it can be used from a notebook or the CLI.
"""

__version__ = "0.1.0"
