"""The ML side of Forgetless: tasks, models, tokenizers, training and evaluation loops, metrics.

Imports torch, transformers, deepspeed and ``storage``; never ray or mlflow (see ``actors``).
"""
