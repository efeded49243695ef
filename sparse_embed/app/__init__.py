"""Face identification for people: a gallery of enrolled people, `identify`, calibrated thresholds.

The application uses the library and nothing in the library imports it. Its
command line is `python -m sparse_embed.app` (`__main__`), documented on the
App page (`docs/app.md`):

- `store`: `DenseIndex`, the exact dense store with `MutableIndex`'s interface
  (NumPy brute force, persisted as `.npy`), for models whose embeddings are dense;
- `embedder`: a Keras run directory or an exported `.tflite` model as one
  embedder (detect, align, embed with flip); with `.tflite` no TensorFlow is imported;
- `gallery`: the gallery directory (manifest, people, index, calibration),
  changed atomically, refusing a model other than its own;
- `identify`: per-person matching, one-to-one assignment of the faces of an
  image, the report and the annotated images.
- `video`: videos: an IoU tracker across frames, one identity per track (no
  person twice in a frame), the annotated video and the timeline.
- `live`: what the HTTP service keeps between requests: the gallery as immutable
  snapshots swapped in by one writer at a time, request statistics, upload checks;
- `serve`: the HTTP service and its web page (the one FastAPI import).
"""
