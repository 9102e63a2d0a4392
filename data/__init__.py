"""Data: shards, multi-crop augmentation, masks, the streaming loader, the embedded data set.

Imports neither `trainer` nor `models`; configuration arrives as plain values or as objects with
the attributes of `trainer.config.DataConfig`.
"""
