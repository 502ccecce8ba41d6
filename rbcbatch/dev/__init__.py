"""Development tools: synthetic smears, real-data loaders, training, evaluation and the demo.

Nothing that a run loads imports this package (a contract in pyproject.toml and a test keep it
so); the CLI reaches it only inside its development commands.
"""
