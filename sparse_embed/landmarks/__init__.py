"""The `landmarks` task: five facial points from a face crop (Landnet, `sparse_embed.models.landnet`).

    python -m sparse_embed.data.synthetic --output=runs/landmarks/data --identities=200 \\
        --images_per_identity=10 --test_identities=20 --write_landmarks
    python -m sparse_embed.landmarks train --config=synthetic_landnet \\
        --data_dir=runs/landmarks/data --model_dir=runs/landmarks/landnet
    python -m sparse_embed.landmarks compress --model_dir=runs/landmarks/landnet \\
        --output=results/landnet.json
    python -m sparse_embed.landmarks real --model_dir=runs/landmarks/landnet

A landmark network maps a crop to points, not an embedding, so it has its own
small config (config.py), data (data.py: the synthetic faces' `landmarks.csv`
and CelebA's landmark and box lists), loss (losses.py: wing or L1) and metric
(metrics.py: the mean point error over the inter-ocular distance, the
failure rate at 0.1). Compression reuses `sparse_embed.compression` (TF-MOT QAT
and pruning, the TFLite converter). Importing this package does not import
TensorFlow.
"""
