"""``python -m onnxq`` is the ``onnxq`` command."""

from .cli import main

main()
