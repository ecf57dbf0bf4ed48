"""Scoring: the model's answers to pictures. `classifier.py` batches pictures and prompts (and scores
one batch under several adapters); `inputs.py` holds the input side (stored pictures read lazily,
pixel-bounded batches); `answers.py` scores every maker's whole answer (and the greedy trie decoder);
`reference.py` is the earlier generate-based decoder, kept as the tests' oracle."""
