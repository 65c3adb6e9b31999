"""The SSL déjà vu test (Meehan et al., NeurIPS 2023): splits, crops, training, embedding, figures."""
