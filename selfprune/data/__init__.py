"""Token data: the calibration and test corpora, and the embedded offline demo (model and corpus)."""
