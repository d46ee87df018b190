"""Data: shard I/O (tar + Parquet -> canonical Ray Datasets), image decode/augment, the synthetic world."""
