"""Analysis of (virtual) EM volumes: image-quality metrics, later segmentation."""
