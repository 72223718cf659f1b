"""The model graph: loading, preparation, layers and the sub-models cut from it."""
