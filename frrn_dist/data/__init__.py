"""The data pipeline: the label table, reading shard folders, the recipes and the two loaders (DALI, PyTorch).

Imports: nothing (import the submodules by name; loaders.build_loader is the entry point).
"""
