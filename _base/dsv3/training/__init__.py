"""Training: tokenizer, data pipeline, optimizer, loss and loop.

Nothing is imported here on purpose: `import dsv3.training.data` should not pull in the optimizer
or the loop, and importing the package has no side effects.
"""
