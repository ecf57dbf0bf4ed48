"""Scoring: the model's answers to pictures. `classifier.py` batches pictures and prompts (and scores
one batch under several adapters); `inputs.py` holds the input side (stored pictures read lazily,
pixel-bounded batches, batches prepared ahead in threads); `answers.py` makes the makers' answer
tokens and scores every maker's whole answer (and the greedy trie decoder), in one pass over their
trie that `answer_tree.py` runs; `throughput.py` counts
what the evaluator computed; `reference.py` is the earlier generate-based decoder, kept as the
tests' oracle."""
