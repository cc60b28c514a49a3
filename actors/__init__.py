"""The Ray runtime of Forgetless: scheduler, trainer group, MLflow sink, CLI.

The only package that imports ray or mlflow.
"""
