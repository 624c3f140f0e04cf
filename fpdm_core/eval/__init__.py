"""Sample quality: the offline Fashion-MNIST feature extractor and FID/KID/precision-recall via torch-fidelity."""
