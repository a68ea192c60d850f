"""Feature extraction from raw media: decoding (media.py), finding files by id (media_paths.py),
AST filterbanks (fbank.py) and the CLIP / AST feature extractors (extract.py)."""
