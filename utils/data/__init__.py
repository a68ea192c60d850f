"""Data: the MGSV-EC annotation CSVs (annotations.py), the frozen-feature stores (features.py for
per-id files, read by tensorfile.py; packed.py; store.py chooses), the dataset and its batches
(dataset.py) and training batches held on the device (resident.py)."""
