"""Edge inference: TFLite models run by the LiteRT interpreter, without TensorFlow.

The protocol and its commands: docs/compression.md (On the device).

Everything here imports only NumPy, OpenCV, `ai_edge_litert` and the
project's TensorFlow-free modules, so it runs on a device where TensorFlow
is not installed:

- `runtime`: the TFLite runtime, the package's one `ai_edge_litert` import:
  loading and checking a `.tflite` file (`load_interpreter`), a model with
  float or integer-only I/O (`TFLiteModel`, which the export's parity gate
  runs too), the ops that stay float (`float_ops_of`);
- `model`: the face embedding model (`EmbeddingModel`: one face crop in,
  one embedding out);
- `mtcnn`: MTCNN face detection through the three networks exported by
  `python -m sparse_embed.faces.mtcnn_tflite` (`TFLiteMTCNN`);
- `preprocess`: decoding, five-point alignment to the model's input size;
- `lfw`: the MLPerf edge protocol on LFW pairs,
  `python -m sparse_embed.edge.lfw --model=model.tflite --pairs=pairs.txt --images=LFW`.
"""
