"""What the model sees: the chat prompt and the prepared image, shared by evaluation and training.

Training teaches exactly the answer the evaluator scores, on images prepared the same way, so both
import them from here (and nothing here imports either of them).
"""
