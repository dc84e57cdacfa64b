"""The task registry: task cards, keys and adapters on disk, and the FAISS router derived from them. No torch here."""
