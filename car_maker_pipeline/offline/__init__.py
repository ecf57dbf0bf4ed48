"""The offline demo profile: a generated Stanford-Cars-shaped source and tiny random LFM2-VL models.

Nothing in the real pipeline imports this package except through the demo profile's resources:
the generated folder and the saved model directories are read by exactly the code that reads the
Hub dataset and the LiquidAI checkpoints (`datasets.load_dataset`, `from_pretrained`).
"""
