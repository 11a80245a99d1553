"""Benchmarks (a leaf: the library never imports it): the ops against baselines and the device's ceilings
(`ops`), end-to-end time to first token (`e2e`), the model shapes they run at (`shapes`), the timing loops
(`timing`) and what every recorded result carries (`provenance`). Entry point: `semshare bench ops|e2e`."""
