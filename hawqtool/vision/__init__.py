"""Vision models for hawqtool: timm model loading, the embedded EfficientNet-Lite0 default,
BatchNorm folding and calibration images. Needs the `vision` extra (timm, scikit-image);
import `hawqtool` before timm or torchvision (see `hawqtool._compat`).
"""
