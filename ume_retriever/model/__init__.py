"""Checkpoint loading, the UME-R1 prompt, the encoder and its generation backends."""
