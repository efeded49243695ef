"""Edge inference: TFLite models run by the LiteRT interpreter, without TensorFlow.

Everything here imports only NumPy, OpenCV, `ai_edge_litert` and the
project's TensorFlow-free modules, so it runs on a device where TensorFlow
is not installed:

- `model`: loading a `.tflite` file (`load_interpreter`) and the face
  embedding model (`EmbeddingModel`: float or integer-only I/O);
- `mtcnn`: MTCNN face detection through the three networks exported by
  `python -m sparse_embed.faces.mtcnn_tflite` (`TFLiteMTCNN`);
- `preprocess`: decoding, five-point alignment to the model's input size;
- `lfw`: the MLPerf edge protocol on LFW pairs,
  `python -m sparse_embed.edge.lfw --model=model.tflite --pairs=pairs.txt --images=LFW`.
"""
