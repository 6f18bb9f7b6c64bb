"""Official TD-MPC2 state dicts <-> our params: key maps (old and new format), architecture inference.

Old format (2023 releases, TD-MPC-Opt): `_Qs.params.0..9` stacked ensemble tensors.
New format (tdmpc2 HEAD): `_Qs.params.<layer>.<name>`, `_detach_Qs_params.*`, `_target_Qs_params.*`
plus buffers `_action_masks`, `log_std_min`, `log_std_dif`.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from tdmpc_jax import networks
from tdmpc_jax.checkpoints.errors import CheckpointError
from tdmpc_jax.checkpoints.torch_reader import QuantizedTensor, TorchSize
from tdmpc_jax.config import MODEL_SIZES, TASK_SETS, ModelConfig, official_task_dim

TARGET = "target_qs"
_LAYER_NAMES = ("weight", "bias", "ln.weight", "ln.bias")
_PARAM_NAMES = {"weight": ("dense", "kernel"), "bias": ("dense", "bias"),
                "ln.weight": ("ln", "scale"), "ln.bias": ("ln", "bias")}

# (torch module prefix, our params key, number of hidden layers fn, last layer has LN)
_HEADS = (("_encoder.state", "encoder", True), ("_dynamics", "dynamics", True),
          ("_reward", "reward_head", False), ("_pi", "pi_head", False))

Entry = Tuple[str, Tuple[str, ...], bool]  # torch key, param path, is_kernel (transpose)


def _mlp_entries(prefix: str, path: Tuple[str, ...], n_hidden: int, last_normed: bool) -> List[Entry]:
    out = []
    for i in range(n_hidden + 1):
        names = _LAYER_NAMES if (i < n_hidden or last_normed) else _LAYER_NAMES[:2]
        for n in names:
            sub = _PARAM_NAMES[n] if (i < n_hidden or last_normed) else (_PARAM_NAMES[n][1],)
            out.append((f"{prefix}.{i}.{n}", path + (f"layer_{i}",) + sub, n == "weight"))
    return out


def key_map(cfg: ModelConfig, fmt: str) -> List[Entry]:
    """Every tensor of an official state dict for `cfg` in format 'old' or 'new', in official order."""
    if fmt not in ("old", "new"):
        raise ValueError(f"unknown state-dict format {fmt!r}")
    entries: List[Entry] = []
    if cfg.multitask:
        entries.append(("_task_emb.weight", ("task_emb", "embedding"), False))
    for prefix, key, last_normed in _HEADS:
        n_hidden = len(cfg.enc_hidden) if key == "encoder" else 2
        entries += _mlp_entries(prefix, (key,), n_hidden, last_normed)
    q_layers = _mlp_entries("q", (), 2, False)
    groups = [("_Qs", ("qs", "ensemble"))] + ([("_detach_Qs", None)] if fmt == "new" else []) + \
             [("_target_Qs", (TARGET, "ensemble"))]
    for mod, path in groups:
        for n, (qkey, sub, is_kernel) in enumerate(q_layers):
            name = f"{mod}.params.{n}" if fmt == "old" else f"{mod}_params.{qkey[2:]}"
            if fmt == "new" and mod == "_Qs":
                name = f"_Qs.params.{qkey[2:]}"
            entries.append((name, None if path is None else path + sub, is_kernel))
    return entries


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _torch_shape(shape, is_kernel):
    shape = tuple(shape)
    return shape[:-2] + (shape[-1], shape[-2]) if is_kernel else shape


def expected_shapes(cfg: ModelConfig, fmt: str) -> Dict[str, Tuple[int, ...]]:
    """Torch-layout shapes of every tensor for `cfg`, computed from shapes alone (no allocation)."""
    params, target = jax.eval_shape(lambda k: networks.init_params(cfg, k), jax.random.PRNGKey(0))
    tree = dict(params, **{TARGET: target})
    shapes = {}
    for key, path, is_kernel in key_map(cfg, fmt):
        src = path if path is not None else ("qs",) + _q_path_of(key)
        shapes[key] = _torch_shape(_get(tree, src).shape, is_kernel)
    return shapes


def _q_path_of(detach_key):
    # `_detach_Qs_params.<i>.<name>` -> ("ensemble", "layer_i", ...) mirrors the online Qs
    rest = detach_key.split("_detach_Qs_params.")[1]
    i, name = rest.split(".", 1)
    sub = _PARAM_NAMES[name] if int(i) < 2 else (_PARAM_NAMES[name][1],)
    return ("ensemble", f"layer_{i}") + sub


def detect_format(keys) -> str:
    keys = set(keys)
    if "_Qs.params.0.weight" in keys or "_detach_Qs_params.0.weight" in keys:
        return "new"
    if "_Qs.params.0" in keys:
        return "old"
    raise ValueError("no TD-MPC2 Q-ensemble keys (_Qs.params.*) found: not a TD-MPC2 world-model state dict")


def _shape(v):
    return tuple(v.shape) if hasattr(v, "shape") else None


def infer_config(shapes: Mapping[str, Tuple[int, ...]], *, task_set: Optional[str] = None,
                 tasks: Optional[Tuple[str, ...]] = None, action_dims: Optional[Tuple[int, ...]] = None,
                 **overrides) -> ModelConfig:
    """ModelConfig from tensor shapes alone (key -> shape). Explicit arguments override inference."""
    fmt = detect_format(shapes)

    def need(key):
        if key not in shapes or shapes[key] is None:
            raise ValueError(f"missing key {key!r}")
        return shapes[key]

    emb = shapes.get("_task_emb.weight")
    num_tasks, task_dim = (emb if emb is not None else (0, 0))
    enc_idx = sorted(int(k.split(".")[2]) for k in shapes
                     if k.startswith("_encoder.state.") and k.endswith(".weight") and not k.endswith("ln.weight"))
    if not enc_idx:
        raise ValueError("missing key '_encoder.state.0.weight'")
    enc0 = need("_encoder.state.0.weight")
    latent = need(f"_encoder.state.{enc_idx[-1]}.weight")[0]
    dyn0 = need("_dynamics.0.weight")
    q0 = need("_Qs.params.0" if fmt == "old" else "_Qs.params.0.weight")
    kw = dict(obs_dim=enc0[1] - task_dim, action_dim=dyn0[1] - latent - task_dim, latent_dim=latent,
              enc_dim=enc0[0], mlp_dim=dyn0[0], num_enc_layers=len(enc_idx), num_q=q0[0],
              task_dim=task_dim, num_bins=need("_reward.2.weight")[0])
    if num_tasks:
        if tasks is None:
            cands = [ts for ts in TASK_SETS.values() if len(ts.tasks) == num_tasks
                     and ts.obs_dim == kw["obs_dim"] and ts.action_dim == kw["action_dim"]]
            ts = TASK_SETS[task_set] if task_set else (cands[0] if cands else None)
            if ts is None:
                raise ValueError(f"cannot infer the task set of a {num_tasks}-task model with obs dim "
                                 f"{kw['obs_dim']} and action dim {kw['action_dim']}: pass task_set or tasks")
            if len(ts.tasks) != num_tasks:
                raise ValueError(f"task set {ts.name} has {len(ts.tasks)} tasks but the checkpoint has {num_tasks}")
            kw.update(tasks=ts.tasks, obs_dims=ts.obs_dims, action_dims=ts.action_dims,
                      episode_lengths=ts.episode_lengths, task_set=ts.name)
        else:
            if len(tasks) != num_tasks:
                raise ValueError(f"{len(tasks)} task names given for a {num_tasks}-task checkpoint")
            if action_dims is None:
                raise ValueError("custom task lists need action_dims")
            kw.update(tasks=tuple(tasks), action_dims=tuple(action_dims),
                      obs_dims=tuple(overrides.pop("obs_dims", (kw["obs_dim"],) * num_tasks)),
                      episode_lengths=tuple(overrides.pop("episode_lengths", (500,) * num_tasks)))
    kw["model_size"] = _match_size(kw, kw.get("task_set"))
    kw.update(overrides)
    return ModelConfig(**kw)


def _match_size(kw, task_set):
    for size, spec in MODEL_SIZES.items():
        latent = 512 if (task_set == "mt30" and size == 19) else spec.latent_dim
        if (kw["enc_dim"], kw["mlp_dim"], kw["latent_dim"], kw["num_enc_layers"], kw["num_q"]) == \
                (spec.enc_dim, spec.mlp_dim, latent, spec.num_enc_layers, spec.num_q) and \
                (task_set is None or kw["task_dim"] == official_task_dim(task_set, size)):
            return size
    return None


def _to_float32(key, value, path, report):
    if isinstance(value, QuantizedTensor):
        arr = value.dequantize()
        report["quantized"].append(key)
        report["zeros"] += int(np.sum(arr == 0))
        report["qsize"] += arr.size
        return arr
    if not isinstance(value, np.ndarray):
        raise CheckpointError(path, f"{key} is a {type(value).__name__}, not a tensor")
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        raise CheckpointError(path, f"{key} has non-float dtype {value.dtype}")
    report["dtypes"].add(value.dtype.name)
    return value.astype(np.float32)


def state_dict_to_params(sd: Mapping, cfg: ModelConfig, path="<state dict>"):
    """Validated conversion -> (params, target_qs, info). Raises CheckpointError naming the problem."""
    fmt = detect_format(sd)
    expected = expected_shapes(cfg, fmt)
    report = {"quantized": [], "zeros": 0, "qsize": 0, "dtypes": set()}
    params: Dict = {}
    for key, p, is_kernel in key_map(cfg, fmt):
        if key not in sd:
            raise CheckpointError(path, f"missing key {key!r} ({fmt} format)")
        val = sd[key]
        if _shape(val) != expected[key]:
            raise CheckpointError(path, f"{key} has shape {_shape(val)}, expected {expected[key]}")
        if p is None:
            continue  # _detach_Qs_params: a view of the online Qs
        arr = _to_float32(key, val, path, report)
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(path, f"{key} contains NaN or Inf values")
        if is_kernel:
            arr = np.swapaxes(arr, -1, -2)
        _set(params, p, np.ascontiguousarray(arr))
    if fmt == "new" and "_action_masks" in sd and cfg.multitask:
        masks = np.asarray(sd["_action_masks"], np.float32)
        want = np.asarray(networks.action_masks(cfg))
        if masks.shape != want.shape or not np.array_equal(masks, want):
            raise CheckpointError(path, "_action_masks disagree with the task set's action dims")
    if report["quantized"]:
        frac = report["zeros"] / max(report["qsize"], 1)
        warnings.warn(f"{path}: {len(report['quantized'])} quantized tensors dequantized; "
                      f"{frac:.1%} of their values are exactly 0 (per-tensor scale quantization "
                      f"destroys small weights)", stacklevel=2)
    target = params.pop(TARGET)
    info = {"format": fmt, "dtypes": sorted(report["dtypes"]),
            "quantized_tensors": len(report["quantized"]),
            "quantized_zero_fraction": report["zeros"] / report["qsize"] if report["qsize"] else None}
    return params, target, info


def params_to_state_dict(params, target_qs, cfg: ModelConfig, fmt: str = "new", dtype=np.float32):
    """Our params -> an official state dict (dict of np arrays) in the given format."""
    tree = dict(params, **{TARGET: target_qs})
    sd = {}
    if fmt == "new":
        sd["_action_masks"] = np.asarray(networks.action_masks(cfg), np.float32) if cfg.multitask else None
        if sd["_action_masks"] is None:
            del sd["_action_masks"]
        sd["log_std_min"] = np.asarray(int(cfg.log_std_min), np.int64)
        sd["log_std_dif"] = np.asarray(int(cfg.log_std_max - cfg.log_std_min), np.int64)
    for key, p, is_kernel in key_map(cfg, fmt):
        src = p if p is not None else ("qs",) + _q_path_of(key)
        arr = np.asarray(_get(tree, src), dtype)
        sd[key] = np.ascontiguousarray(np.swapaxes(arr, -1, -2) if is_kernel else arr)
    if fmt == "new":
        for mod in ("_Qs.params", "_detach_Qs_params", "_target_Qs_params"):
            sd[f"{mod}.__batch_size"] = TorchSize((cfg.num_q,))
            sd[f"{mod}.__device"] = None
    return sd
