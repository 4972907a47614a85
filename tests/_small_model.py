"""A small, fast sentence-transformers model for the corpus tests: all-MiniLM-L6-v2 cut to
its first encoder layer(s) and a short maximum length (real tokenizer, real weights)."""
import json
import os

import numpy as np


def make_small_model(dst, layers=1, max_seq_length=32):
    """Write the model to directory ``dst`` and return its path (str)."""
    from safetensors.numpy import load_file, save_file

    from normcy.sentence import default_model_path

    src = default_model_path()
    dst = os.fspath(dst)
    os.makedirs(os.path.join(dst, "1_Pooling"), exist_ok=True)
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if os.path.isfile(p) and name not in ("model.safetensors", "config.json",
                                               "sentence_bert_config.json"):
            os.symlink(p, os.path.join(dst, name))
    os.symlink(os.path.join(src, "1_Pooling", "config.json"),
               os.path.join(dst, "1_Pooling", "config.json"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = layers
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(dst, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)
    w = load_file(os.path.join(src, "model.safetensors"))
    keep = {k: np.ascontiguousarray(v) for k, v in w.items()
            if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < layers}
    save_file(keep, os.path.join(dst, "model.safetensors"))
    return dst
