"""Sample quality: `evaluate` (fpdm.eval.evaluation) scores samples, image folders or a model against a reference
with torch-fidelity's FID/KID/precision-recall, on Inception-v3 or fpdm's offline Fashion-MNIST CNN features."""
