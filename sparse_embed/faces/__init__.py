"""Faces: MTCNN detection (`detect`, the one place MTCNN is imported), five-point alignment (`align`),
dataset landmark files (`landmarks`), face choice and whole-tree alignment (`aligner`).

Importing this package does not import TensorFlow; `sparse_embed.faces.detect` does.
"""

from sparse_embed.faces.align import LANDMARK_NAMES, TEMPLATES, align, alignment_matrix
from sparse_embed.faces.aligner import FALLBACKS, POLICIES, align_faces, align_image, align_tree
from sparse_embed.faces.landmarks import LANDMARK_FORMATS, FaceAnnotation, read_landmarks, read_megaface_json

__all__ = [
    "FALLBACKS",
    "LANDMARK_FORMATS",
    "LANDMARK_NAMES",
    "POLICIES",
    "TEMPLATES",
    "FaceAnnotation",
    "align",
    "align_faces",
    "align_image",
    "align_tree",
    "alignment_matrix",
    "read_landmarks",
    "read_megaface_json",
]
