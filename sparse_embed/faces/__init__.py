"""Faces: five-point alignment (`align`) and MTCNN detection (`detect`, the one place MTCNN is imported)."""
