"""Layer 0, the core: settings, image decoding, data samples and splits, threshold calibration, the
version format and store, logging. Imports no torch and nothing else of axx_backend."""
