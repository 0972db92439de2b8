"""Similarity-based share planning (the README's "The methods"): representations, angular distance, share sets."""
from .distance import RepresentationError, angular_distance
from .heatmap import similarity_heatmap
from .representations import iter_layer_representations, layer_representations
from .share_sets import share_sets
from .sweep import SweepPoint, sweep_thresholds

__all__ = ["layer_representations", "iter_layer_representations", "angular_distance", "RepresentationError",
           "share_sets", "sweep_thresholds", "SweepPoint", "similarity_heatmap"]
