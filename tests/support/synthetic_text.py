"""Deterministic English-like text for end-to-end tests (no third-party text in the repo)."""

import random

SUBJECTS = ["the old sailor", "a young woman", "the captain", "my brother", "the quiet girl", "our neighbour"]
VERBS = ["walked to", "looked at", "spoke with", "wrote to", "waited for", "thought of"]
OBJECTS = ["the harbour", "the garden", "her mother", "the village church", "the long road", "his friend"]
TAILS = ["in the morning.", "before dinner.", "with great care.", "once again.", "without a word.",
         "at last."]


def synthetic_documents(n_docs: int, sentences: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                 f"{rng.choice(TAILS)}"
                 for _ in range(sentences)]
        docs.append(" ".join(parts))
    return docs


def write_corpus(folder, n_files: int = 60, seed: int = 0) -> str:
    """Write one document per .txt file; returns a glob matching them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(synthetic_documents(n_files, seed=seed)):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return str(folder / "*.txt")
