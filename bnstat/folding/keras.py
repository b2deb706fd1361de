"""A Keras model_config: the layer classes, epsilons, activations and the graph."""

from __future__ import annotations

from bnstat.folding.layers import KERAS, Layer

# ---- a Keras model_config: classes, epsilon, the graph -----------------------------------

_KERAS_CLASS_KINDS = {"Dense": "dense", "DepthwiseConv1D": "depthwise", "DepthwiseConv2D": "depthwise",
                      "SeparableConv1D": "separable", "SeparableConv2D": "separable",
                      "Conv1DTranspose": "conv_transpose", "Conv2DTranspose": "conv_transpose",
                      "Conv3DTranspose": "conv_transpose", "Convolution2DTranspose": "conv_transpose",
                      "Conv1D": "conv", "Conv2D": "conv", "Conv3D": "conv",
                      "Convolution1D": "conv", "Convolution2D": "conv", "Convolution3D": "conv"}
_BN_CLASSES = {"BatchNormalization", "SyncBatchNormalization"}


def _inbound_names(layer: dict) -> list[str]:
    """The layers feeding a layer of a Keras functional config (Keras 2 and 3 formats)."""
    names: list[str] = []

    def walk(obj):
        if isinstance(obj, dict):
            hist = (obj.get("config") or {}).get("keras_history") \
                if obj.get("class_name") == "__keras_tensor__" else None
            if isinstance(hist, list) and hist and isinstance(hist[0], str):
                names.append(hist[0])
                return
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
                names.append(obj[0])  # Keras 2: [name, node_index, tensor_index, kwargs]
                return
            for v in obj:
                walk(v)

    walk(layer.get("inbound_nodes") or [])
    return names


def keras_graph(config: dict) -> dict[str, dict]:
    """``{layer name: {"class", "config", "inputs", "consumers"}}`` from a Keras model_config.

    Sequential models feed each layer from the one before it; functional
    models from their inbound nodes; nested models are walked too.
    """
    graph: dict[str, dict] = {}

    def visit(model: dict) -> None:
        cfg = model.get("config") if isinstance(model.get("config"), dict) else {}
        layers = cfg.get("layers")
        if not isinstance(layers, list):
            return
        sequential = model.get("class_name") == "Sequential"
        prev = None
        for ly in layers:
            if not isinstance(ly, dict):
                continue
            lcfg = ly.get("config") if isinstance(ly.get("config"), dict) else {}
            name = lcfg.get("name") or ly.get("name")
            if not isinstance(name, str):
                continue
            inputs = ([prev] if prev else []) if sequential else _inbound_names(ly)
            graph[name] = {"class": ly.get("class_name"), "config": lcfg, "inputs": inputs,
                           "consumers": []}
            prev = name
            visit(ly)
    visit(config)
    for name, node in graph.items():
        for src in node["inputs"]:
            if src in graph:
                graph[src]["consumers"].append(name)
    return graph


def apply_keras_config(layers: list[Layer], graph: dict[str, dict]) -> None:
    """Give Keras layers the kind, groups, epsilon and activation their config states."""
    for ly in layers:
        if ly.convention != KERAS:
            continue
        node = graph.get(ly.keras_name)
        if node is None:
            continue
        cfg = node["config"]
        if ly.role == "bn":
            eps = cfg.get("epsilon")
            if isinstance(eps, int | float) and not isinstance(eps, bool) and eps >= 0:
                ly.eps = float(eps)
        elif ly.role == "weighted":
            kind = _KERAS_CLASS_KINDS.get(node["class"])
            ly.module_type = node["class"]
            if kind is not None and ly.weight_param == "kernel" and kind in ("conv", "conv_transpose",
                                                                             "dense", "depthwise"):
                ly.kind_hint, ly.kind_source = kind, "graph"
            groups = cfg.get("groups")
            if isinstance(groups, int) and groups > 1 and kind == "conv":
                ly.groups = groups
            act = cfg.get("activation")
            if isinstance(act, dict):  # a serialized activation object
                act = (act.get("config") or {}).get("name") or act.get("class_name")
            if act not in (None, "linear", "Linear"):
                ly.block = f"{ly.display} applies its activation ({act}) before the BN"


