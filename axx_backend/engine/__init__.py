"""Layer 1, the engine (the science): weights, ensemble members, MC statistics and the review decision,
saliency, masks, segmentation heads, the `Annotator` pipeline and the registry of loaded versions.
Imports only `axx_backend.core`; nothing of the web, queue or Label Studio layers."""
