"""Backbones, SimSiam heads, and the encoder that index/search/explain load.

The encoder is the backbone up to global average pooling; its config (backbone, image size,
windows) travels with the weights in ``model.json`` so every consumer preprocesses identically.

Example:
    >>> cfg = ModelConfig(backbone="tiny", image_size=64)
    >>> enc = build_encoder(cfg)
    >>> import torch
    >>> enc(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 128])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ctsearch.backbones import BACKBONES, get_backbone
from ctsearch.config import ENCODER_FILE, MODEL_JSON, ModelConfig
from ctsearch.errors import CTSearchInputError
from ctsearch.preprocess import eval_transform
from ctsearch.store import (
    ENCODER_SHA_KEY,
    atomic_write,
    atomic_write_json,
    content_hash,
    read_model_config,
    verify_encoder,
)


def build_encoder(config: ModelConfig) -> nn.Module:
    """Backbone with its classifier replaced by identity: [n, 3, S, S] -> [n, D]."""
    net = get_backbone(config.backbone).build()
    net.ctsearch_backbone = config.backbone  # the registry entry, for set_residual_bn
    return net


def set_residual_bn(encoder: nn.Module, gamma: float) -> nn.Module:
    """Set the weight of each residual block's last BatchNorm to ``gamma``, in place; returns ``encoder``.

    ``build_encoder`` zero-initialises it (``zero_init_residual``, as SimSiam's code does), which makes
    every residual block an identity at initialisation: a randomly initialised encoder is then only
    its stem and the 1x1 downsampling convolutions, and its embeddings are nearly collinear.
    ``gamma=1`` is torchvision's default initialisation, a full-depth random network
    (docs/synthetic.md, "The untrained baseline"). Loaded weights override either.

    Example:
        >>> enc = set_residual_bn(build_encoder(ModelConfig(backbone="tiny", image_size=64)), 1.0)
        >>> float(enc.layer1[0].bn2.weight.min())
        1.0
    """
    with torch.no_grad():
        for bn in get_backbone(encoder.ctsearch_backbone).residual_bns(encoder):
            bn.weight.fill_(gamma)
    return encoder


def save_encoder(encoder: nn.Module, config: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write ``encoder.safetensors`` and ``model.json`` atomically into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(out / ENCODER_FILE, lambda tmp: save_file(state, tmp))
    # model.json records the weights' sha256, so replaced or damaged weights are refused on load.
    atomic_write_json(
        {**config.to_json(), ENCODER_SHA_KEY: content_hash(out / ENCODER_FILE)}, out / MODEL_JSON
    )
    return out


def load_encoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", expected_sha256: str | None = None
) -> tuple[nn.Module, ModelConfig]:
    """Load an encoder from a run directory (or the folder holding model.json), in eval mode.

    The weights are checked against ``expected_sha256`` (an index's record) or model.json's
    ``encoder_sha256`` first (``store.verify_encoder``); weights that do not fit model.json's
    backbone or cannot be read are a one-line error naming the file.
    """
    from safetensors.torch import load_file

    from ctsearch import storage

    p = storage.model_folder(path)  # a run URI: a local copy of its model files
    config = read_model_config(p)
    verify_encoder(p, expected_sha256, "index.json" if expected_sha256 else "")
    encoder = build_encoder(config)
    try:
        encoder.load_state_dict(load_file(str(p / ENCODER_FILE)))
    except Exception as e:  # noqa: BLE001 - safetensors header errors and key/shape mismatches alike
        why = " ".join(str(e).split())[:200]
        raise CTSearchInputError(
            p / ENCODER_FILE,
            f"not a {config.backbone} encoder as {MODEL_JSON} says ({type(e).__name__}: {why})",
        ) from None
    return encoder.to(device).eval(), config


def grey_input(encoder: nn.Module) -> nn.Module | None:
    """A copy of ``encoder`` that takes grey slices [n, 1, S, S] and returns what ``encoder``
    returns on their pseudo-RGB stack ``to_rgb(x)`` [n, 3, S, S]; None if there is none.

    Three equal channels through the first convolution give the convolution of the one channel
    with the weights summed over their input channels, so the stack need not be made: it is a
    copy of every input (3x its bytes), which costs an embedding actor as much as a cheap model.
    Equal up to float rounding (~1e-6). An encoder that says it reads grey input as it is
    (``takes_grey``: the ``null`` benchmark encoder) is returned itself; one whose first layer is
    not a convolution of three channels gives None (feed it ``to_rgb``).

    Example:
        >>> from ctsearch.preprocess import to_rgb
        >>> enc = build_encoder(ModelConfig(backbone="tiny", image_size=32)).eval()
        >>> x = torch.rand(2, 1, 32, 32)
        >>> torch.allclose(grey_input(enc)(x), enc(to_rgb(x)), atol=1e-5)
        True
    """
    import copy

    if getattr(encoder, "takes_grey", False):
        return encoder
    first = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.in_channels != 3 or first.groups != 1:
        return None
    grey = copy.deepcopy(encoder)
    conv = next(m for m in grey.modules() if isinstance(m, nn.Conv2d))
    conv.weight = nn.Parameter(conv.weight.detach().sum(dim=1, keepdim=True), requires_grad=False)
    conv.in_channels = 1
    return grey


def fold_batchnorm(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` (in eval mode) with every BatchNorm folded into the convolution
    before it: the same function (equal to ~1e-6) without a BatchNorm pass over each activation,
    and under bf16 autocast without converting each activation to float32 and back for it
    (ResNet50, bf16, on a 2-core CPU: 1.10x; docs/benchmarks.md, RELAX).

    An encoder in training mode, with no BatchNorm, compiled (``torch.compile``) or that
    torch.fx cannot trace is returned as it is: folding only saves time.

    Example:
        >>> enc = build_encoder(ModelConfig(backbone="tiny", image_size=32)).eval()
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.allclose(fold_batchnorm(enc)(x), enc(x), atol=1e-5)
        True
    """
    from torch.fx.experimental.optimization import fuse

    if encoder.training or hasattr(encoder, "_orig_mod"):
        return encoder
    if not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules()):
        return encoder
    try:
        return fuse(encoder)
    except torch.fx.proxy.TraceError:  # control flow on tensor values: keep the layers as they are
        return encoder


# ---------------------------------------------------------------------------------------------
# SimSiam heads (Chen & He 2021, as in the reference code; reference-facts.md)


def simsiam_dims(backbone: str) -> tuple[int, int]:
    """(projection dim, predictor bottleneck dim): 2048/512 for ResNet50, D and D/4 otherwise."""
    dim = get_backbone(backbone).dim
    return dim, max(dim // 4, 1)


def projection_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN(affine=False): three layers, as in SimSiam."""
    mlp = nn.Sequential(
        nn.Linear(in_dim, in_dim, bias=False),
        nn.BatchNorm1d(in_dim),
        nn.ReLU(inplace=True),
        nn.Linear(in_dim, in_dim, bias=False),
        nn.BatchNorm1d(in_dim),
        nn.ReLU(inplace=True),
        nn.Linear(in_dim, dim),
        nn.BatchNorm1d(dim, affine=False),
    )
    # The bias of the last linear layer is cancelled by the BN that follows it; SimSiam freezes it.
    mlp[6].bias.requires_grad = False
    return mlp


def prediction_mlp(dim: int, pred_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: the bottleneck predictor h."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False),
        nn.BatchNorm1d(pred_dim),
        nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim),
    )


class SimSiam(nn.Module):
    """Encoder f (backbone up to global pooling) + projector g + predictor h.

    ``forward(x1, x2)`` returns ``p1, p2, z1, z2`` with the targets z detached (stop-gradient).
    Only ``encoder`` is kept after training (``save_encoder(model.encoder, ...)``).

    Example:
        >>> m = SimSiam(ModelConfig(backbone="tiny", image_size=64))
        >>> p1, p2, z1, z2 = m(torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64))
        >>> p1.shape, z2.requires_grad
        (torch.Size([4, 128]), False)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, pred_dim = simsiam_dims(config.backbone)
        self.encoder = build_encoder(config)
        self.projector = projection_mlp(config.embedding_dim, dim)
        self.predictor = prediction_mlp(dim, pred_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()


# ---------------------------------------------------------------------------------------------
# Initial weights: never downloaded. ImageNet weights come from a file the user names or from
# the local torch cache, where torchvision itself would have put them.

IMAGENET_FILES = {b.name: b.imagenet_file for b in BACKBONES.values() if b.imagenet_file}
IMAGENET_URLS = {name: f"https://download.pytorch.org/models/{f}" for name, f in IMAGENET_FILES.items()}


def torch_cache_dir() -> Path:
    """Where torchvision keeps downloaded weights: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_imagenet_weights(backbone: str, weights: str | os.PathLike | None = None) -> Path:
    """The ImageNet weight file for ``backbone``: ``weights`` if given, else the torch cache.

    In the cache, the exact torchvision V1 file (the one the reference code used) is preferred;
    any other ``<backbone>-*.pth`` there (e.g. torchvision's V2 weights) is taken otherwise.
    """
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise CTSearchInputError(
                p, "no such weight file (pass a torchvision ImageNet .pth for --weights)"
            )
        return p
    if backbone not in IMAGENET_FILES:
        raise CTSearchInputError(
            None, f"--init imagenet needs {' or '.join(IMAGENET_FILES)}, not backbone {backbone!r}"
        )
    cache = torch_cache_dir()
    exact = cache / IMAGENET_FILES[backbone]
    if exact.is_file():
        return exact
    others = sorted(cache.glob(f"{backbone}-*.pth"))
    if others:
        return others[0]
    raise CTSearchInputError(
        exact,
        f"ImageNet weights for {backbone} not found and ctsearch never downloads; fetch "
        f"{IMAGENET_URLS[backbone]} on a machine with network and put it at this path "
        f"(or pass --weights FILE, or use --init random)",
    )


def _encoder_state(state: dict, classifier: str) -> dict[str, torch.Tensor]:
    """Backbone weights from a state dict in any common layout, without the classifier.

    Accepts torchvision files (``conv1.weight``, ``<classifier>.*``), SimSiam checkpoints
    (``{"state_dict": {"module.encoder.conv1.weight", ...}}``) and ctsearch checkpoints
    (``encoder.*``, ``projector.*``, ``predictor.*``).
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = key.removeprefix("module.")
        if k.startswith(("projector.", "predictor.")):
            continue
        k = k.removeprefix("encoder.")
        if k.startswith(classifier + "."):
            continue
        out[k] = value
    return out


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file, loaded without executing code."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user input problem
        raise CTSearchInputError(p, f"unreadable weight file ({type(e).__name__}: {e})") from None


def initial_encoder_state(
    init: str, config: ModelConfig, weights: str | os.PathLike | None = None
) -> dict[str, torch.Tensor] | None:
    """Encoder weights to start training from, or None for ``init == "random"``.

    ``init`` is ``imagenet`` (torchvision weights, see ``find_imagenet_weights``), ``random``,
    or a path: a run directory (``model.json`` + ``encoder.safetensors``) or a weight file.
    The result always matches ``build_encoder(config)`` key for key and shape for shape.
    """
    if init == "random":
        if weights is not None:
            raise CTSearchInputError(weights, "--weights is only used with --init imagenet")
        return None
    if init == "imagenet":
        path = find_imagenet_weights(config.backbone, weights)
    else:
        from ctsearch import storage

        path = Path(init)
        if storage.is_remote(init):  # a run or weight file in a store: a local copy of it
            remote_dir = storage.is_dir(init)
            path = (
                storage.cached_copy(init, [MODEL_JSON, ENCODER_FILE])
                if remote_dir
                else storage.local_file(init)
            )
        if path.is_dir():
            if (path / MODEL_JSON).is_file():
                other = read_model_config(path).backbone
                if other != config.backbone:
                    raise CTSearchInputError(
                        path, f"holds a {other} encoder, but --backbone is {config.backbone}"
                    )
            path = path / ENCODER_FILE
        if not path.is_file():
            raise CTSearchInputError(
                path,
                "no such run directory or weight file for --init (expected imagenet, random, a run dir or a file)",
            )
    state = _encoder_state(read_weights(path), get_backbone(config.backbone).classifier)
    expected = build_encoder(config).state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch at {wrong[:3]}"
        raise CTSearchInputError(path, f"weights do not fit a {config.backbone} encoder ({what})")
    return {k: state[k] for k in expected}


@dataclass(frozen=True)
class EncoderSpec:
    """Where an encoder comes from, small enough to send to every worker that loads it.

    ``kind``: ``run`` (a trained run directory, ``path``), ``random`` (a seeded full-depth random
    network of ``config``) or ``imagenet`` (``config``'s backbone with local ImageNet ``weights``).

    Example:
        >>> spec = EncoderSpec.baseline("random", ModelConfig(backbone="tiny", image_size=32))
        >>> encoder, config = spec.load()
        >>> encoder(torch.zeros(1, 3, 32, 32)).shape, config.backbone
        (torch.Size([1, 128]), 'tiny')
    """

    kind: Literal["run", "random", "imagenet"]
    path: str | None = None
    config: ModelConfig | None = None
    seed: int = 0
    weights: str | None = None
    # {store root: filesystem} resolved on the driver for a run URI: a worker loads the model
    # through them, whatever endpoint and keys its own environment has (storage.adopt).
    filesystems: dict | None = field(default=None, compare=False, repr=False)

    @classmethod
    def run(cls, model_dir: str | os.PathLike) -> EncoderSpec:
        """A trained run directory, checked here (loaded where the spec is used).

        A run URI stays a URI: each worker that loads it fetches its own copy."""
        from ctsearch import storage

        local = storage.model_folder(model_dir)
        if storage.is_remote(model_dir):
            return cls("run", path=os.fspath(model_dir), filesystems=storage.filesystems([model_dir]))
        return cls("run", path=str(local))

    @classmethod
    def baseline(
        cls, kind: str, config: ModelConfig, seed: int = 0, weights: str | None = None
    ) -> EncoderSpec:
        """An untrained baseline; ``imagenet`` finds its local weight file now, so a missing one fails early."""
        if kind not in ("random", "imagenet"):
            raise CTSearchInputError(None, f"--baseline must be random or imagenet, got {kind!r}")
        if kind == "imagenet":
            weights = str(find_imagenet_weights(config.backbone, weights))
        return cls(kind, config=config, seed=seed, weights=weights)

    def load(self, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
        """(encoder in eval mode on ``device``, its ModelConfig)."""
        if self.kind == "run":
            from ctsearch import storage

            storage.adopt(self.filesystems)
            return load_encoder(self.path, device)
        torch.manual_seed(self.seed)
        encoder = build_encoder(self.config)
        if self.kind == "random":
            # A full-depth random network (torchvision's init), not SimSiam's zero-initialised residuals,
            # which leave only the stem and collapse the embeddings (docs/synthetic.md).
            set_residual_bn(encoder, 1.0)
        else:
            encoder.load_state_dict(initial_encoder_state("imagenet", self.config, self.weights))
        return encoder.to(device).eval(), self.config


@torch.no_grad()
def embed(
    encoder: nn.Module, hu, config: ModelConfig, batch_size: int = 64, device: str | torch.device = "cpu"
):
    """HU slices [n, y, x] -> float32 numpy embeddings [n, D] through ``eval_transform``.

    The encoder's train/eval mode is restored afterwards, so this can run mid-training.
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(hu), batch_size):
        x = eval_transform(hu[start : start + batch_size], config).to(device)
        out.append(encoder(x).float().cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, config.embedding_dim), np.float32)
