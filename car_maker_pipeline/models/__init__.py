"""Model domain: loading LFM2-VL models and processors, and the tiny random-weight LFM2-VL models of the offline demo."""
