"""The text embedder for task keys and routing: all-MiniLM-L6-v2, 384-d, shipped in a package."""
from __future__ import annotations

import os

import numpy as np

from .paths import text_embedder_dir

TEXT_DIM = 384


class TextEmbedder:
    def __init__(self, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach for a hub
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(text_embedder_dir()), device=device)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Texts -> float32 [N, 384], L2-normalised."""
        if not texts:
            return np.zeros((0, TEXT_DIM), dtype=np.float32)
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)  # not one bar per request in the log
